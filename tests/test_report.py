"""report(): the figures are real PNGs with content, the mistakes are the best head's own on
train_head's validation rows, missing images and caches degrade gracefully, CLI.

Sweeps are made here: a cache of synthetic features (written with CacheWriter, no VGG) over real
image files, so the grid of mistakes can load them through the manifest's source_root.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cache import CacheReader, UserError
from cli.main import main
from pipeline.config import ReportConfig, TrainConfig
from pipeline.head_file import load_head
from pipeline.images import file_digest
from pipeline.report import FIGURES, report
from pipeline.splits import validation_rows
from pipeline.train_head import train_head

from ._caches import make_cache
from .conftest import make_folder

CLASSES = ("cat", "dog", "owl")
SWEEP = dict(head=("linear", "mlp", "logreg"), hidden=((8,),), lr=(1e-2, 1e-1),
             dropout=(0.0, 0.5), C=(0.1, 1.0), epochs=4, batch_size=8)   # 4 + 4 + 2 heads
PNG = b"\x89PNG\r\n\x1a\n"


def cache_over_images(path, root, seed=0, dim=12, noise=1.6):
    """A complete cache over the images under `root`: Gaussian clusters by class, noisy enough
    that a head gets some rows wrong."""
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    labels = np.array([CLASSES.index(f.split("/")[0]) for f in files])
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(CLASSES), dim))[labels] + noise * rng.normal(size=(len(files), dim))
    return make_cache(path, x, labels, files, CLASSES, source_root=str(root),
                      digests=[file_digest(root / f) for f in files])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """(runs dir, train cache, image root) of a 10-head sweep validated on a hash split."""
    tmp = tmp_path_factory.mktemp("sweep")
    root = make_folder(tmp / "images", CLASSES, per_class=16, size=(20, 20))
    cache = cache_over_images(tmp / "train.h5", root)
    train_head(cache, tmp / "runs", TrainConfig(**SWEEP, val_fraction=0.3))
    return tmp / "runs", cache, root


def check_png(path, min_size=(400, 150)):
    """A valid PNG of at least `min_size` pixels, a few KB, with more than one colour in it."""
    data = path.read_bytes()
    assert data[:8] == PNG
    assert len(data) > 5000, f"{path.name} is only {len(data)} bytes"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1], img.size
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    assert pixels.std() > 5, f"{path.name} is nearly blank"
    assert len(np.unique(pixels)) > 10


def best_run(runs):
    summary = json.loads((runs / "summary.json").read_text())
    return summary["best_run"], runs / summary["best_run"]


def test_report_draws_every_figure_as_a_real_png(sweep, tmp_path):
    runs, _, _ = sweep
    summary = report(runs, tmp_path / "report")
    assert set(summary.figures) == set(FIGURES)
    for path in summary.figures.values():
        check_png(tmp_path / "report" / f"{path.rsplit('/', 1)[-1]}")
    assert summary.notes == []
    assert summary.runs == 10


def test_report_md_embeds_the_figures_beside_the_leaderboard(sweep, tmp_path):
    runs, _, _ = sweep
    summary = report(runs, tmp_path / "report", ReportConfig(leaderboard_rows=4))
    md = (tmp_path / "report" / "report.md").read_text()
    for name in FIGURES:
        assert f"]({name}.png)" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 4                                 # header + 4 rows
    results = (runs / "results.csv").read_text().splitlines()[1:]
    assert f"`{summary.best_run}`" in table[1]
    assert results[0].split(",")[1] == summary.best_run       # leaderboard order kept
    assert "6 more runs" in md and "RANDOM-INIT" in md


def test_the_mistakes_are_the_best_heads_own_on_train_heads_validation_rows(sweep, tmp_path):
    runs, cache, _ = sweep
    _, run_dir = best_run(runs)
    meta = json.loads((run_dir / "head.json").read_text())
    recorded = np.array(json.loads((run_dir / "metrics.json").read_text())["val"]
                        ["confusion_matrix"])
    assert meta["data"]["val"] == {"kind": "hash_split", "fraction": 0.3}
    # The recomputed split is the one train_head validated on: same rows, same predictions.
    with CacheReader(cache) as r:
        rows = validation_rows(r.paths, r.labels, meta["data"]["val"]["fraction"])
        x, y = torch.from_numpy(r.read_rows(rows)), r.labels[rows]
    assert len(rows) == meta["data"]["val_rows"] == recorded.sum()
    head, _ = load_head(run_dir)
    pred = head(x).argmax(1).numpy()
    assert np.array_equal(np.bincount(y * 3 + pred, minlength=9).reshape(3, 3), recorded)
    wrong = int(recorded.sum() - np.trace(recorded))
    assert wrong > 0                                           # the fixture makes some mistakes
    summary = report(runs, tmp_path / "r", ReportConfig(misclassified=50))
    assert summary.misclassified == wrong and summary.notes == []
    assert report(runs, tmp_path / "r2", ReportConfig(misclassified=1)).misclassified == 1


def test_a_separate_val_cache_is_used_for_the_mistakes(tmp_path):
    train_root = make_folder(tmp_path / "train", CLASSES, per_class=10, size=(20, 20))
    val_root = make_folder(tmp_path / "val", CLASSES, per_class=8, size=(20, 20), seed=1)
    train = cache_over_images(tmp_path / "t.h5", train_root)
    val = cache_over_images(tmp_path / "v.h5", val_root, seed=0, noise=2.5)
    train_head(train, tmp_path / "runs", TrainConfig(**SWEEP), val_path=val)
    _, run_dir = best_run(tmp_path / "runs")
    meta = json.loads((run_dir / "head.json").read_text())
    assert meta["data"]["val"] == {"kind": "cache", "path": str(val.resolve())}
    cm = np.array(json.loads((run_dir / "metrics.json").read_text())["val"]["confusion_matrix"])
    assert cm.sum() == 24
    summary = report(tmp_path / "runs", config=ReportConfig(misclassified=100))
    assert summary.path == str(tmp_path / "runs" / "report" / "report.md")   # default -o
    assert summary.misclassified == cm.sum() - np.trace(cm) and summary.notes == []


def test_missing_images_are_skipped_and_said(sweep, tmp_path):
    runs, _, root = sweep
    moved = tmp_path / "moved"
    root.rename(moved)
    try:
        summary = report(runs, tmp_path / "r")
        assert summary.misclassified == 0
        assert any("missing or unreadable" in n and "--images-root" in n for n in summary.notes)
        check_png(tmp_path / "r" / "misclassified.png")        # says why, in the picture
        assert "--images-root" in (tmp_path / "r" / "report.md").read_text()
        # Pointing at the new place brings them back.
        again = report(runs, tmp_path / "r2", ReportConfig(images_root=str(moved)))
        assert again.misclassified > 0 and again.notes == []
    finally:
        moved.rename(root)


def test_a_missing_cache_leaves_the_other_figures(sweep, tmp_path):
    runs, _, _ = sweep
    summary = report(runs, tmp_path / "r", ReportConfig(cache=str(tmp_path / "gone.h5")))
    assert summary.misclassified == 0
    assert any("cannot be read" in n and "--cache" in n for n in summary.notes)
    for path in summary.figures.values():
        check_png(tmp_path / "r" / path.rsplit("/", 1)[-1])


def test_a_cache_of_other_features_is_not_used(sweep, tmp_path):
    runs, _, root = sweep
    other = cache_over_images(tmp_path / "other.h5", root, dim=5)
    summary = report(runs, tmp_path / "r", ReportConfig(cache=str(other)))
    assert summary.misclassified == 0
    assert any("other features" in n and "feature_dim: 12 vs 5" in n for n in summary.notes)


def test_a_validation_source_it_cannot_read_is_said_not_guessed(sweep, tmp_path):
    runs, _, _ = sweep
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    best, run_dir = best_run(copy)
    meta = json.loads((run_dir / "head.json").read_text())
    meta["data"]["val"] = "hash split of the train cache, fraction 0.3"    # free text
    (run_dir / "head.json").write_text(json.dumps(meta))
    summary = report(copy, tmp_path / "r")
    assert summary.misclassified == 0
    assert any("re-run train-head" in n for n in summary.notes)


def test_a_sweep_without_validation_still_reports(tmp_path):
    root = make_folder(tmp_path / "images", CLASSES, per_class=4, size=(20, 20))
    cache = cache_over_images(tmp_path / "c.h5", root)
    train_head(cache, tmp_path / "runs", TrainConfig(head=("linear",), lr=(1e-2, 1e-1), epochs=2,
                                                      val_fraction=0.0))
    summary = report(tmp_path / "runs", tmp_path / "r")
    assert any("no validation data" in n for n in summary.notes)
    check_png(tmp_path / "r" / "learning_curves.png")
    check_png(tmp_path / "r" / "hyperparameters.png")


def test_a_folder_without_a_sweep_is_refused(tmp_path):
    with pytest.raises(UserError, match="no results.csv"):
        report(tmp_path)
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 1
    assert "no results.csv" in result.output and "Traceback" not in result.output


def test_cli_writes_the_report(sweep, tmp_path):
    runs, _, _ = sweep
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["report", str(runs), "-o", str(out), "--misclassified",
                                       "2", "--dpi", "60"])
    assert result.exit_code == 0, result.output
    for name in FIGURES:
        assert str(out / f"{name}.png") in result.output
    assert "report.md: 4 figures of 10 runs" in result.output
    with Image.open(out / "learning_curves.png") as img:
        assert img.size == (660, 450)                          # 11 x 7.5 inches at --dpi 60


def test_report_sees_every_sweep_written_into_the_folder(tmp_path):
    root = make_folder(tmp_path / "images", CLASSES, per_class=6, size=(20, 20))
    cache = cache_over_images(tmp_path / "c.h5", root)
    runs = tmp_path / "runs"
    first = train_head(cache, runs, TrainConfig(head=("linear",), lr=(1e-2,), epochs=2,
                                                val_fraction=0.3))
    second = train_head(cache, runs, TrainConfig(head=("linear", "logreg"), lr=(1e-1,), epochs=2,
                                                 val_fraction=0.3))
    assert second.runs == 3 and first.best_run in {r["run_id"] for r in second.leaderboard}
    summary = report(runs, tmp_path / "r", ReportConfig(misclassified=0))
    assert summary.runs == 3 and summary.best_run == second.best_run and summary.notes == []
    md = (tmp_path / "r" / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")][1:]
    assert [line.split("`")[1] for line in table] == [r["run_id"] for r in second.leaderboard]


def test_the_accuracy_axis_ends_at_1():
    from pipeline.report import _hyperparameters
    rows = [{"run_id": f"linear-lr{lr}", "head": "linear", "lr": lr, "val_acc": acc}
            for lr, acc in ((0.1, 1.0), (0.01, 1.0), (0.001, 0.92))]
    fig = _hyperparameters(rows)
    lo, hi = fig.axes[0].get_ylim()
    assert hi == 1.0 and 0.0 <= lo < 0.92
