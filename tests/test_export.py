"""export(): the stitched model reproduces the head on cached features, loads without this project
(torch only for pt2, onnxruntime only for ONNX), the torchvision format is the tutorial's VGG16,
and user mistakes are refused in one line.

One random-init VGG16 cache at 32x32 (fc7, float16) of 12 tiny images, with a linear, an mlp and a
logreg head trained on it, is shared by the module: a VGG16 cut at fc7 is a 512 MiB model, so
each export costs seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from torchvision.transforms import functional as TF

from cache import CacheReader
from cli.main import main
from pipeline.preprocessing import Preprocessing, to_float_batch
from pipeline.config import ExportConfig, ExtractConfig, PredictConfig, TrainConfig
from pipeline.export import export, load_model
from pipeline.extract import extract
from pipeline.head_file import load_head
from pipeline.images import read_image
from pipeline.predict import predict
from pipeline.train_head import train_head

from .conftest import make_folder, one_line

CLASSES = ("cat", "dog", "owl")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Images, a cache and one run folder per head kind: {"root", "cache", "runs": {kind: path}}."""
    root = tmp_path_factory.mktemp("export")
    images = make_folder(root / "images", classes=CLASSES, per_class=4)
    cache = root / "train.h5"
    extract(images, cache, ExtractConfig(weights="none", image_size=32, workers=0, progress=False))
    summary = train_head(cache, root / "runs", TrainConfig(
        head=("linear", "mlp", "logreg"), hidden=((16,),), epochs=2, val_fraction=0.25))
    runs = {r["head"]: r["path"] for r in summary.leaderboard}
    return {"root": root, "cache": cache, "runs": runs}


@pytest.fixture(scope="module")
def pt2_linear(work):
    """The linear head exported as .pt2: (path, summary)."""
    path = work["root"] / "linear.pt2"
    return path, export(work["runs"]["linear"], path, ExportConfig(format="pt2"))


def _rows_and_crops(cache, rows=(0, 5, 11)):
    """Cached features of `rows`, their image paths and (N, 3, 32, 32) uint8 crops decoded as
    extract decodes them."""
    with CacheReader(cache) as r:
        pre = Preprocessing.from_dict(r.manifest["preprocessing"])
        paths = [os.path.join(r.manifest["source_root"], r.paths[i]) for i in rows]
        feats = torch.from_numpy(r.read_rows(list(rows)))
    crops = torch.stack([pre(read_image(p)[0]) for p in paths])
    return feats, paths, crops


def _head_logits(run, feats):
    head, _ = load_head(run)
    with torch.no_grad():
        return head(feats)


def _fresh(script: str, *args, cwd) -> dict:
    """Run `script` in a new interpreter that has no path to this repository; its stdout is JSON."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


_PT2_SCRIPT = r"""
import json, sys
import numpy as np
import torch
extra = {"pipeline.json": ""}
program = torch.export.load(sys.argv[1], extra_files=extra)
meta = json.loads(extra["pipeline.json"])
x = torch.from_numpy(np.load(sys.argv[2])).float() / 255     # (N, 3, S, S) in [0, 1]
with torch.no_grad():
    logits = program.module()(x)
print(json.dumps({"logits": logits.tolist(), "meta": meta,
                  "project": sorted(m for m in sys.modules
                                    if m.split(".")[0] in ("pipeline", "cache", "cli"))}))
"""

_ONNX_SCRIPT = r"""
import json, sys
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = json.loads(session.get_modelmeta().custom_metadata_map["pipeline"])
x = np.load(sys.argv[2]).astype(np.float32) / 255
(logits,) = session.run(["logits"], {"images": x})
print(json.dumps({"logits": logits.tolist(), "meta": meta, "torch": "torch" in sys.modules,
                  "project": sorted(m for m in sys.modules
                                    if m.split(".")[0] in ("pipeline", "cache", "cli"))}))
"""


def test_pt2_loads_with_torch_alone_and_equals_predict_and_head(work, pt2_linear, tmp_path):
    path, summary = pt2_linear
    feats, paths, crops = _rows_and_crops(work["cache"])
    np.save(tmp_path / "x.npy", crops.numpy())
    out = _fresh(_PT2_SCRIPT, path, tmp_path / "x.npy", cwd=tmp_path)
    assert out["project"] == []
    assert out["meta"]["class_names"] == list(CLASSES)
    assert out["meta"]["input"]["shape"] == ["N", 3, 32, 32]
    assert out["meta"]["preprocessing"]["crop_size"] == 32
    logits = torch.tensor(out["logits"])                                      # (3, C)
    # The head on the cached (float16) features, within the tolerance export measured against.
    expected = _head_logits(work["runs"]["linear"], feats)
    assert (logits - expected).abs().max() <= summary.parity["tolerance"]
    assert summary.parity["images"] == 8
    assert summary.parity["max_abs_diff"] <= summary.parity["tolerance"]
    # `pipeline predict` on the image files gives the same probabilities and ranking.
    run = CliRunner().invoke(main, ["predict", str(path), *paths, "--format", "json",
                                    "--top-k", "3", "-q"])
    assert run.exit_code == 0, run.output
    preds = json.loads(run.stdout)["predictions"]
    probs = torch.softmax(logits.double(), 1)
    for p, src, row in zip(preds, paths, probs):
        assert p["path"] == src
        assert [t["index"] for t in p["top"]] == row.argsort(descending=True).tolist()
        np.testing.assert_allclose([t["probability"] for t in p["top"]],
                                   row.sort(descending=True).values.numpy(), atol=1e-6)


def test_onnx_loads_with_onnxruntime_alone_and_equals_predict_and_head(work, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = tmp_path / "logreg.onnx"
    summary = export(work["runs"]["logreg"], path, ExportConfig(format="onnx"))
    feats, paths, crops = _rows_and_crops(work["cache"])
    np.save(tmp_path / "x.npy", crops.numpy())
    out = _fresh(_ONNX_SCRIPT, path, tmp_path / "x.npy", cwd=tmp_path)
    assert out["project"] == [] and out["torch"] is False
    assert out["meta"]["model_format"] == "onnx" and out["meta"]["head"]["kind"] == "logreg"
    logits = torch.tensor(out["logits"])
    assert logits.shape == (3, 3)   # a batch of 3 through a model exported with a batch of 2
    expected = _head_logits(work["runs"]["logreg"], feats)
    assert (logits - expected).abs().max() <= summary.parity["tolerance"]
    result = predict(path, paths, PredictConfig(top_k=3, workers=0, progress=False))
    np.testing.assert_allclose(result.logits, logits.numpy(), atol=1e-5)


def test_torchvision_format_is_the_tutorial_vgg16(work, pt2_linear, tmp_path):
    path = tmp_path / "tutorial.pth"
    summary = export(work["runs"]["linear"], path, ExportConfig(format="torchvision"))
    sidecar = json.loads((tmp_path / "tutorial.json").read_text())
    assert summary.files == [str(path), str(tmp_path / "tutorial.json")]
    assert sidecar["torchvision"] == {**sidecar["torchvision"], "model": "vgg16", "num_classes": 3}
    assert sidecar["input"]["normalized_inside"] is False
    # Exactly the tutorial's model: vgg16 with a 3-class last layer, the head as classifier.6.
    vgg = torchvision.models.vgg16(num_classes=3)
    vgg.load_state_dict(torch.load(path, weights_only=True))
    vgg.eval()
    head, _ = load_head(work["runs"]["linear"])
    assert torch.equal(vgg.classifier[6].weight, head.weight)
    _, paths, crops = _rows_and_crops(work["cache"])
    x = to_float_batch(crops)
    pre = sidecar["preprocessing"]
    stitched = load_model(pt2_linear[0])
    with torch.no_grad():
        logits = vgg(TF.normalize(x, pre["mean"], pre["std"]))
    torch.testing.assert_close(logits, stitched.run(x), atol=1e-5, rtol=1e-5)
    result = predict(path, paths, PredictConfig(top_k=3, workers=0, progress=False))
    assert result.format == "torchvision"
    np.testing.assert_allclose(result.logits, logits.numpy(), atol=1e-5)


def test_cli_export_mlp_reports_parity(work, tmp_path):
    path = tmp_path / "mlp.pt2"
    run = CliRunner().invoke(main, ["export", work["runs"]["mlp"], "-o", str(path), "--json"])
    assert run.exit_code == 0, run.output
    summary = json.loads(run.stdout)
    assert summary["meta"]["head"]["kind"] == "mlp" and summary["format"] == "pt2"
    assert 0 <= summary["parity"]["max_abs_diff"] <= summary["parity"]["tolerance"]
    feats, _, crops = _rows_and_crops(work["cache"])
    got = load_model(path).run(to_float_batch(crops))
    expected = _head_logits(work["runs"]["mlp"], feats)
    assert (got - expected).abs().max() <= summary["parity"]["tolerance"]
    assert not list(tmp_path.glob(".*exporting"))


def _edit_head(work, dst, kind="linear", **cache_changes):
    """A copy of a run folder, at `dst`, whose head.json records other cache settings."""
    src = Path(work["runs"][kind])
    dst.mkdir()
    meta = json.loads((src / "head.json").read_text())
    meta["cache"].update(cache_changes)
    (dst / "head.json").write_text(json.dumps(meta))
    (dst / "head.pt").write_bytes((src / "head.pt").read_bytes())
    return dst


def _refused(args, *words):
    one_line(CliRunner().invoke(main, ["export", *map(str, args)]), *words)


def test_refuses_other_weights(work, tmp_path):
    run = _edit_head(work, tmp_path / "run1", weights_sha256="0" * 64)
    _refused([run, "-o", tmp_path / "m.pt2", "--no-parity-check"], "sha256 000000000000",
             "not the weights the cache was extracted with", "--weights")
    run = _edit_head(work, tmp_path / "run2", weights="file:imagenet.pth")
    _refused([run, "-o", tmp_path / "m.pt2", "--no-parity-check"], "imagenet.pth",
             "--weights PATH")
    assert not (tmp_path / "m.pt2").exists()


def test_refuses_unknown_and_corrupt_heads(work, tmp_path):
    out = tmp_path / "m.pt2"
    _refused([work["cache"], "-o", out], "is not a head file", "head.pt/head.json")
    _refused([tmp_path / "nope", "-o", out], "no head at")
    _refused([tmp_path, "-o", out], "is not a trained head")
    run = _edit_head(work, tmp_path / "run")
    (run / "head.pt").write_bytes(b"PK\x03\x04 not really a zip")
    _refused([run / "head.pt", "-o", out], f"{run / 'head.pt'}: damaged head weights", "retrain")
    (run / "head.json").write_text("{ truncated")
    _refused([run, "-o", out], f"{run / 'head.json'}: damaged head metadata: not valid JSON",
             "retrain")
    assert not out.exists()


def test_refuses_formats_this_head_cannot_take(work, tmp_path):
    _refused([work["runs"]["mlp"], "-o", tmp_path / "m.pth", "--format", "torchvision"],
             "mlp head on vgg16 fc7", "--format pt2 or onnx")
    run = _edit_head(work, tmp_path / "run", layer="classifier.1", layer_alias="fc6")
    _refused([run, "-o", tmp_path / "m.pth", "--format", "torchvision"], "linear head on fc6")
    _refused([work["runs"]["linear"], "-o", tmp_path / "m.onnx", "--format", "pt2"], "m.pt2",
             "format")                                 # a format that contradicts the suffix
    _refused([work["runs"]["linear"], "-o", tmp_path / "m.bin"], "m.pt2", "format")


def test_the_format_is_taken_from_the_suffix(work, tmp_path):
    out = tmp_path / "m.pth"                           # no --format: .pth is torchvision's
    result = CliRunner().invoke(main, ["export", str(work["runs"]["linear"]), "-o", str(out),
                                       "--no-parity-check", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["format"] == "torchvision"
    assert load_model(out).format == "torchvision" and out.with_suffix(".json").is_file()


def test_parity_failure_and_unreachable_images_write_nothing(work, tmp_path):
    out = tmp_path / "m.pth"
    empty = tmp_path / "moved"
    empty.mkdir()
    _refused([work["runs"]["linear"], "-o", out, "--format", "torchvision", "--images-root", empty],
             "--images-root", "--no-parity-check")
    # A cache whose features no longer match its images: the check must catch it.
    bad = tmp_path / "bad.h5"
    bad.write_bytes(work["cache"].read_bytes())
    with h5py.File(bad, "r+") as h5:
        h5["features"][:] = h5["features"][:] * np.float16(1.01)
    _refused([work["runs"]["linear"], "-o", out, "--format", "torchvision", "--cache", bad],
             "parity check failed", "nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5", "moved"]
