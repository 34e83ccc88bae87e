"""predict(): the head's output on new images, extract's loading, batching, bad images skipped,
table/csv/json output.

The module shares one random-init VGG16 cache cut at pool5 (conv layers only: a 57 MiB model) of
9 tiny images, a linear head trained on it, and that head exported as .pt2.
"""
from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cache import CacheReader
from cli.main import main
from pipeline.config import ExportConfig, ExtractConfig, PredictConfig, TrainConfig
from pipeline.export import export
from pipeline.extract import extract
from pipeline.head_file import load_head
from pipeline.predict import predict
from pipeline.train_head import train_head

from .conftest import make_folder, one_line

CLASSES = ("ant", "bee", "cow")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    images = make_folder(root / "images", classes=CLASSES, per_class=3, seed=1)
    cache = root / "train.h5"
    extract(images, cache, ExtractConfig(weights="none", layer="pool5", image_size=32, workers=0,
                                         progress=False))
    run = train_head(cache, root / "runs", TrainConfig(epochs=2, val_fraction=0.3)).best_path
    model = root / "model.pt2"
    summary = export(run, model, ExportConfig())
    return {"root": root, "images": images, "cache": cache, "run": run, "model": model,
            "tolerance": summary.parity["tolerance"]}


def _cli(*args):
    return CliRunner().invoke(main, ["predict", *map(str, args)])


def test_predictions_equal_the_head_on_cached_features(setup):
    result = predict(setup["model"], [setup["images"]],
                     PredictConfig(top_k=3, batch_size=4, workers=0, progress=False))
    with CacheReader(setup["cache"]) as r:
        assert [p["path"] for p in result.predictions] == [
            (setup["images"] / p).as_posix() for p in r.paths]
        feats = torch.from_numpy(r.load_features())
    head, _ = load_head(setup["run"])
    with torch.no_grad():
        expected = head(feats).numpy()                                        # (9, 3)
    assert np.abs(result.logits - expected).max() <= setup["tolerance"]
    assert result.class_names == list(CLASSES) and result.skipped == []
    for p, logits in zip(result.predictions, result.logits):
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        assert [t["index"] for t in p["top"]] == list(np.argsort(-probs))
        assert [t["class"] for t in p["top"]] == [CLASSES[t["index"]] for t in p["top"]]
        np.testing.assert_allclose([t["probability"] for t in p["top"]], np.sort(probs)[::-1],
                                   rtol=1e-6)


def test_batching_and_workers_do_not_change_predictions(setup):
    one = predict(setup["model"], [setup["images"]], PredictConfig(workers=0, progress=False))
    many = predict(setup["model"], [setup["images"]],
                   PredictConfig(batch_size=2, workers=1, progress=False))
    # Other batch sizes sum in another order: float32 rounding, relative to the logits' size
    # (a head trained on standardized pool5 features gives logits in the tens).
    scale = max(1.0, float(np.abs(one.logits).max()))
    np.testing.assert_allclose(one.logits, many.logits, atol=1e-5 * scale)
    assert [p["path"] for p in one.predictions] == [p["path"] for p in many.predictions]


def test_bad_images_are_reported_and_skipped(setup, tmp_path):
    good = sorted((setup["images"] / "bee").glob("*.png"))[:2]
    for p in good:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "broken.png").write_bytes(good[0].read_bytes()[:200])
    (tmp_path / "empty.jpg").write_bytes(b"")
    run = _cli(setup["model"], tmp_path, "--format", "csv", "--top-k", "2", "-q")
    assert run.exit_code == 0, run.output
    assert f"skipped {(tmp_path / 'broken.png').as_posix()}: truncated image" in run.stderr
    assert f"skipped {(tmp_path / 'empty.jpg').as_posix()}: empty file" in run.stderr
    assert "2 images predicted" in run.stderr and "2 skipped" in run.stderr
    rows = list(csv.DictReader(io.StringIO(run.stdout)))
    assert [(r["path"], r["rank"]) for r in rows] == [
        ((tmp_path / p.name).as_posix(), k) for p in good for k in ("1", "2")]
    assert all(r["class"] == CLASSES[int(r["index"])] for r in rows)


def test_table_json_and_output_file(setup, tmp_path):
    image = sorted((setup["images"] / "cow").glob("*.png"))[0]
    run = _cli(setup["model"], image, setup["images"] / "ant", "--top-k", "2", "-q")
    assert run.exit_code == 0, run.output
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["path", "top", "1", "top", "2"] and len(lines) == 1 + 1 + 3
    assert lines[1].startswith(image.as_posix())
    out = tmp_path / "preds.json"
    run = _cli(setup["model"], image, "--format", "json", "--top-k", "9", "-o", out, "-q")
    assert run.exit_code == 0, run.output
    assert f"written to {out}" in run.stdout
    data = json.loads(out.read_text())
    assert data["format"] == "pt2" and data["class_names"] == list(CLASSES)
    (pred,) = data["predictions"]
    assert len(pred["top"]) == 3   # --top-k beyond the classes gives every class
    assert sum(t["probability"] for t in pred["top"]) == pytest.approx(1.0)


@pytest.mark.parametrize("case, words", [
    ("missing image", "does not exist"),
    ("folder without images", "no images found"),
    ("not a model", "not a model written by `pipeline export`"),
])
def test_user_errors_are_one_line(setup, tmp_path, case, words):
    (tmp_path / "notes.txt").write_text("not a model")
    image = sorted((setup["images"] / "ant").glob("*.png"))[0]
    args = {"missing image": (setup["model"], tmp_path / "x.png"),
            "folder without images": (setup["model"], tmp_path),
            "not a model": (tmp_path / "notes.txt", image)}[case]
    one_line(_cli(*args), words)


def test_output_onto_an_input_is_refused(setup, tmp_path):
    images = tmp_path / "imgs"
    shutil.copytree(setup["images"], images)
    image = sorted((images / "cow").glob("*.png"))[0]
    before = image.read_bytes()
    for args in [(setup["model"], image, "-o", image),                       # the image named
                 (setup["model"], images, "-o", image),                      # inside the folder
                 (setup["model"], image, "-o", setup["model"])]:             # the model
        run = _cli(*args, "-q")
        assert run.exit_code == 2 and "would overwrite an input" in run.output, run.output
    assert image.read_bytes() == before
    run = _cli(setup["model"], images, "-o", images / "predictions.csv", "--format", "csv", "-q")
    assert run.exit_code == 0, run.output                    # a new file beside them is fine
    run = _cli(setup["model"], images, "-o", images / "predictions.csv", "--format", "csv", "-q")
    assert run.exit_code == 0, run.output                    # and may be replaced next time


def test_device_option(setup):
    cpu = predict(setup["model"], [setup["images"]],
                  PredictConfig(workers=0, progress=False, device="cpu"))
    auto = predict(setup["model"], [setup["images"]], PredictConfig(workers=0, progress=False))
    if torch.cuda.is_available():
        np.testing.assert_allclose(cpu.logits, auto.logits, rtol=1e-2, atol=1e-2)
    else:
        np.testing.assert_array_equal(cpu.logits, auto.logits)
    one_line(_cli(setup["model"], setup["images"], "--device", "tpu", "-q"), "unknown device 'tpu'")
    if not torch.cuda.is_available():
        one_line(_cli(setup["model"], setup["images"], "--device", "cuda", "-q"),
                 "CUDA is not available")


def test_one_image_is_said_in_the_singular():
    from pipeline.predict import PredictResult
    result = PredictResult("m.pt2", "pt2", ["a", "b"], [{"path": "x.png", "top": []}],
                           np.zeros((1, 2), np.float32), [], 0.5)
    assert result.line().startswith("1 image predicted with m.pt2 (pt2), 0 skipped"), result.line()
