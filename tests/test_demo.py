"""demo(): every stage end to end on the digits at a reduced size; the exported model's test
accuracy is the head's on the cached test features; the tutorial-way estimate is arithmetic on
a measurement; the digits folder; the CLI's wiring and its one plain random-init line.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cache import CacheReader
from cli.main import main
from pipeline.config import DemoConfig
from pipeline.demo import SWEEP, DemoSummary, demo, write_digits
from pipeline.head_file import load_head
from pipeline.report import FIGURES

SMALL = DemoConfig(weights="none", per_class=8, epochs=2, tutorial_steps=1, tutorial_batch=4,
                   progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(summary, printed lines) of one reduced demo: 80 digits, random-init VGG16 at 32 px."""
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    summary = demo(out, SMALL, echo=lines.append)
    yield summary, lines
    Path(summary.export.path).unlink()              # 0.5 GB of VGG16: do not leave it behind


def test_every_stage_ran_on_the_digits(run):
    s, _ = run
    assert sum(s.images.values()) == 80 and s.images["test"] > 0
    assert {p: c.rows for p, c in s.extract.items()} == s.images
    kinds = [r["head"] for r in s.train.leaderboard]
    assert len(kinds) >= 16 and set(kinds) == {"linear", "mlp", "logreg"}
    assert s.train.data["test"]["rows"] == s.images["test"]
    parity = s.export.parity
    assert parity is not None and parity["max_abs_diff"] <= parity["tolerance"]
    assert len(s.predict.predictions) == s.images["test"] and not s.predict.skipped
    assert s.random_weights and s.weights == "none"


def test_exported_model_accuracy_equals_the_heads_on_the_cached_test_features(run):
    s, _ = run
    best = s.train.leaderboard[0]
    assert s.test_accuracy == pytest.approx(best["test_acc"], abs=0) == s.head_test_accuracy
    # And image by image, recomputed here: the best head on the cached test features.
    head, _ = load_head(s.train.best_path)
    with CacheReader(s.extract["test"].path) as r:
        cached = dict(zip(r.paths, head(torch.from_numpy(r.load_features())).argmax(1).tolist()))
        names, root = r.class_names, Path(r.manifest["source_root"])
    exported = {Path(p["path"]).resolve().relative_to(root.resolve()).as_posix():
                names.index(p["top"][0]["class"]) for p in s.predict.predictions}
    assert exported == cached
    labels = {p: names.index(p.split("/")[0]) for p in cached}
    assert np.mean([cached[p] == labels[p] for p in cached]) == pytest.approx(s.test_accuracy)


def test_the_tutorial_estimate_extrapolates_a_measurement(run):
    s, lines = run
    t = s.tutorial
    assert t["steps"] == 1 and t["batch"] == 4 and t["seconds_per_step"] > 0
    assert t["extrapolated_seconds"] == pytest.approx(
        t["seconds_per_image"] * s.train.data["train"]["rows"] * SMALL.epochs
        * s.train.experiments)
    assert t["cached_seconds"] == pytest.approx(
        s.extract["train"].seconds + s.extract["test"].seconds + s.train.seconds)
    text = "\n".join(lines)
    assert "extrapolated from the 1 training step:" in text and "x less" in text


def test_the_output_says_what_each_stage_did(run):
    s, lines = run
    text = "\n".join(lines)
    assert sum("RANDOM-INIT" in line for line in lines) == 1          # one plain line
    for stage in ("images:", "extract train:", "extract test:", "train-head:", "best:",
                  "export:", "predict:", "test accuracy", "report:"):
        assert stage in text
    assert s.train.best_run in text
    assert f"{s.test_accuracy:.4f}" in text


def test_the_demo_writes_the_report(run):
    s, _ = run
    assert set(s.report.figures) == set(FIGURES)
    for path in s.report.figures.values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = Path(s.report.path).read_text()
    assert s.train.best_run in md


def test_write_digits_holds_out_every_nth_of_each_digit_and_limits_per_class(tmp_path):
    train, test = write_digits(tmp_path, test_every=3, per_class=7)
    for digit in map(str, range(10)):
        kept = sorted((f for part in (train, test) for f in (part / digit).glob("*.png")),
                      key=lambda f: f.name)                   # sklearn's order
        assert len(kept) == 7
        assert [f.parent.parent == test for f in kept] == [k % 3 == 0 for k in range(7)]
    with Image.open(next(test.rglob("*.png"))) as img:
        assert img.size == (8, 8) and img.mode == "L"
    # Other settings over the same folder never leave an image in both parts.
    write_digits(tmp_path, test_every=2, per_class=7)
    names = [f.name for f in tmp_path.rglob("*.png")]
    assert len(names) == len(set(names)) == 70


def test_cli_builds_the_config_and_says_random_init_once(tmp_path, monkeypatch, caplog):
    seen = {}

    def fake_demo(out_dir, config, echo):
        seen.update(out_dir=out_dir, config=config)
        logging.getLogger("pipeline.extract").warning("using RANDOM-INIT vgg16 weights",
                                                      extra={"random_init": True})
        logging.getLogger("pipeline.export").warning("random weights again",
                                                     extra={"random_init": True})
        logging.getLogger("pipeline.extract").warning("3 images skipped")
        logging.getLogger("pipeline.extract").warning("3 RANDOM-INIT-named images skipped")
        logging.getLogger("pipeline.train_head").info("pass 1/3 linear x8: epoch 1/20")
        logging.getLogger("pipeline.export").info("parity on 8 cached images")
        echo("Note: ... RANDOM-INIT ...")
        return DemoSummary(str(out_dir), "none", {}, {}, {}, None, None, 1.0, 1.0, {}, None,
                           {"extract train": 1.0})

    monkeypatch.setattr("pipeline.demo.demo", fake_demo)
    caplog.set_level(logging.INFO)
    result = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "d"), "--per-class", "5",
                                       "--epochs", "3", "--weights", "none", "--no-report", "-q"])
    assert result.exit_code == 0, result.output
    assert seen["config"] == DemoConfig(weights="none", per_class=5, epochs=3, report=False,
                                        progress=False)
    assert result.output.count("RANDOM-INIT") == 1
    assert "demo: done in" in result.output and "extract train 1.0 s" in result.output
    messages = [r.getMessage() for r in caplog.records]
    # Dropped by the record's random_init mark, not by its words: other warnings still show.
    assert "3 images skipped" in messages and "3 RANDOM-INIT-named images skipped" in messages
    assert not any(getattr(r, "random_init", False) for r in caplog.records)
    assert not any("epoch 1/20" in m or "parity" in m for m in messages)
    assert not logging.getLogger("pipeline.extract").filters                # put back
    for name in ("pipeline.train_head", "pipeline.export"):
        assert logging.getLogger(name).level == logging.NOTSET


def test_the_default_sweep_has_at_least_16_heads_of_three_kinds():
    linear = len(SWEEP["lr"]) * len(SWEEP["dropout"])
    heads = linear + linear * len(SWEEP["hidden"]) + len(SWEEP["C"])
    assert heads >= 16 and SWEEP["head"] == ("linear", "mlp", "logreg")
