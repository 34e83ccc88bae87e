"""The k-NN probe: scikit-learn's weighted cosine k-NN on the same features, streamed equals in
RAM, one top-max(k) search equals a run per (k, T), the head saved as its training rows, exported
(pt2, ONNX) and used by predict and report, and the one-line errors."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.neighbors import KNeighborsClassifier

from cli.main import main
from pipeline.config import ExportConfig, ExtractConfig, PredictConfig, TrainConfig
from pipeline.export import export
from pipeline.extract import extract
from pipeline.head_file import load_head
from pipeline.knn import top_neighbours
from pipeline.predict import predict
from pipeline.report import report
from pipeline.train_head import train_head

from ._caches import make_cache
from .conftest import make_folder
from .test_export import _ONNX_SCRIPT, _PT2_SCRIPT, _fresh, _rows_and_crops

KS, TS = (1, 5, 20), (0.07, 0.5)


def _blobs(n, seed, c=4, d=24, noise=1.8):
    """(x (n, d) float32 rounded to float16 as a float16 cache holds it, y (n,)): Gaussian
    clusters, noisy enough that k and T change the answers."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(c, d))
    y = rng.integers(0, c, n)
    x = centers[y] + noise * rng.normal(size=(n, d))
    return x.astype(np.float16).astype(np.float32), y


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Train, val and test float16 caches of clustered features: {role: (path, x, y)}."""
    tmp = tmp_path_factory.mktemp("knn")
    out = {}
    for role, n, seed in (("train", 300, 0), ("val", 120, 1), ("test", 100, 2)):
        x, y = _blobs(n, seed)
        path = make_cache(tmp / f"{role}.h5", x, y, dtype="float16",
                          paths=[f"{role}/{i:04d}.png" for i in range(n)])
        out[role] = (path, x, y)
    return out


def _sweep(caches, runs, **config):
    return train_head(caches["train"][0], runs,
                      TrainConfig(**{"head": ("knn",), "k": KS, "temperature": TS, **config}),
                      val_path=caches["val"][0], test_path=caches["test"][0])


def _sklearn(x, y, k, t):
    return KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                                weights=lambda d: np.exp((1 - d) / t)).fit(x, y)


def _by_run(summary):
    return {(r["k"], r["temperature"]): r for r in summary.leaderboard}


def test_predictions_equal_scikit_learns_weighted_cosine_knn(caches, tmp_path):
    summary = _sweep(caches, tmp_path / "runs")
    (_, xt, yt), (_, xv, yv), (_, xs, ys) = caches["train"], caches["val"], caches["test"]
    rows = _by_run(summary)
    assert sorted(rows) == sorted((k, t) for k in KS for t in TS)
    accs = set()
    for (k, t), r in rows.items():
        clf = _sklearn(xt, yt, k, t)
        for x, y, role in ((xv, yv, "val"), (xs, ys, "test")):
            expected = clf.predict(x)
            # Within one image: the saved training rows are rounded to float16.
            assert abs(r[f"{role}_acc"] - (expected == y).mean()) <= 1 / len(y) + 1e-12
            head, meta = load_head(r["path"])
            with torch.no_grad():
                logits = head(torch.from_numpy(x))
            assert (logits.argmax(1).numpy() != expected).sum() <= 1
            np.testing.assert_allclose(logits.softmax(1).numpy(), clf.predict_proba(x),
                                       atol=2e-3)
        accs.add(r["test_acc"])
        assert meta["k"] == k and meta["temperature"] == t and meta["bank_rows"] == 300
        assert r["epochs_run"] is None and r["head"] == "knn"
    assert len(accs) > 1                 # k and T matter on these features
    assert summary.ranked_by == "validation accuracy"
    assert [r["rank"] for r in summary.leaderboard] == list(range(1, 7))


def test_the_head_is_its_training_rows_in_float16_written_once(caches, tmp_path):
    summary = _sweep(caches, tmp_path / "runs")
    paths = [os.path.join(r["path"], "head.pt") for r in summary.leaderboard]
    assert {os.stat(p).st_ino for p in paths} == {os.stat(paths[0]).st_ino}   # hard links
    assert os.stat(paths[0]).st_nlink == len(paths)
    state = torch.load(paths[0], weights_only=True)
    assert state["features"].dtype == torch.float16 and state["features"].shape == (300, 24)
    x = torch.from_numpy(caches["train"][1])
    assert torch.equal(state["features"], (x / x.norm(dim=1, keepdim=True)).half())
    assert torch.equal(state["labels"], torch.from_numpy(caches["train"][2]))


def test_every_k_and_t_from_one_search_equals_a_run_each(caches, tmp_path):
    together = _by_run(_sweep(caches, tmp_path / "all"))
    for k in KS:
        for t in TS:
            alone = _by_run(_sweep(caches, tmp_path / f"k{k}-t{t}", k=(k,), temperature=(t,)))
            a, b = together[(k, t)], alone[(k, t)]
            for key in ("val_acc", "val_balanced_acc", "test_acc", "val_top5"):
                assert a[key] == b[key], key
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
            assert a["run_id"] == b["run_id"]


def test_streamed_equals_in_ram(tmp_path):
    # 1024 float16 features: 512 rows per 1 MiB chunk, so 2000 rows are 4 chunks (3.9 MiB).
    x, y = _blobs(2000, 0, d=1024, noise=30.0)
    train = make_cache(tmp_path / "train.h5", x, y, dtype="float16")
    xv, yv = _blobs(150, 1, d=1024, noise=30.0)
    val = make_cache(tmp_path / "val.h5", xv, yv, dtype="float16",
                     paths=[f"v/{i}.png" for i in range(150)])
    cfg = dict(head=("knn",), k=KS, temperature=TS)
    ram = train_head(train, tmp_path / "ram", TrainConfig(**cfg), val_path=val)
    limit = 3 * 2**20 + 2**19          # a window of 2 chunks + 1 for evaluation
    streamed = train_head(train, tmp_path / "stream", TrainConfig(**cfg, max_memory=limit),
                          val_path=val)
    assert ram.memory["train"] == "ram" and streamed.memory["train"] == "stream"
    a, b = _by_run(ram), _by_run(streamed)
    assert len({r["val_acc"] for r in a.values()}) > 1
    for key in a:
        for metric in ("val_acc", "val_balanced_acc", "val_top5"):
            assert a[key][metric] == b[key][metric]
        assert a[key]["val_loss"] == pytest.approx(b[key]["val_loss"], rel=1e-5)
    pt = [torch.load(os.path.join(s.leaderboard[0]["path"], "head.pt"), weights_only=True)
          for s in (ram, streamed)]
    assert torch.equal(pt[0]["features"], pt[1]["features"])


def test_without_validation_it_is_scored_leaving_each_row_out(caches, tmp_path):
    path, x, y = caches["train"]
    summary = train_head(path, tmp_path / "runs", TrainConfig(head=("knn",), k=(5,),
                                                                temperature=(0.07,),
                                                                val_fraction=0.0))
    r = summary.leaderboard[0]
    # scikit-learn's predict(None): every training row, not counted as its own neighbour.
    expected = _sklearn(x, y, 5, 0.07).predict(None)
    assert abs(r["train_acc"] - (expected == y).mean()) <= 1 / len(y)
    assert r["train_acc"] < 1.0 and r["val_acc"] is None
    assert summary.ranked_by.startswith("log loss on the training rows")


def test_top_neighbours_merges_blocks_like_one_topk():
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(7, 5, generator=g), torch.randn(50, 5, generator=g)
    blocks = [(s, bank[s:s + 8]) for s in range(0, 50, 8)]
    sims, idx = top_neighbours(q, blocks, 6)
    full = (q @ bank.t()).topk(6, dim=1)
    assert torch.equal(idx, full.indices) and torch.allclose(sims, full.values)
    own = torch.tensor([3, 9, 17, 0, 49, 20, 33])
    full = (q @ bank.t()).index_put((torch.arange(7), own), torch.tensor(-math.inf)).topk(6, 1)
    assert torch.equal(top_neighbours(q, blocks, 6, own)[1], full.indices)


def test_mixed_sweep_from_the_cli(caches, tmp_path):
    runs = tmp_path / "runs"
    out = CliRunner().invoke(main, [
        "train-head", str(caches["train"][0]), "-o", str(runs), "--val", str(caches["val"][0]),
        "--head", "linear,logreg,knn", "--k", "5,20", "--temperature", "0.07", "--epochs", "2"])
    assert out.exit_code == 0, out.output
    with open(runs / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["head"] for r in rows) == ["knn", "knn", "linear", "logreg"]
    for r in rows:
        assert (r["k"] != "") == (r["head"] == "knn") == (r["temperature"] == "0.07")
    assert sorted(int(r["k"]) for r in rows if r["k"]) == [5, 20]
    accs = [float(r["val_acc"]) for r in rows]
    assert accs == sorted(accs, reverse=True)               # one leaderboard
    assert "knn-k5-T0.07-" in out.output


def _error(args):
    out = CliRunner().invoke(main, ["train-head", *map(str, args)])
    assert out.exit_code != 0, out.output
    assert "Traceback" not in out.output
    lines = [l for l in out.output.splitlines() if l.startswith("Error:")]
    assert len(lines) == 1, out.output
    return lines[0]


@pytest.mark.parametrize("option, words", [
    (["--k", "0"], ["--k 0", ">= 1"]),
    (["--k", "5,-1"], ["--k -1", ">= 1"]),
    (["--k", "301"], ["--k 301", "300 training rows", "k <= 300"]),
    (["--temperature", "0"], ["--temperature 0", "> 0"]),
    (["--temperature", "-0.1"], ["--temperature -0.1", "> 0"]),
    (["--temperature", "nan"], ["--temperature nan", "finite"]),
    (["--temperature", "inf"], ["--temperature inf", "finite"]),
])
def test_bad_settings_are_one_line(caches, tmp_path, option, words):
    line = _error([caches["train"][0], "-o", tmp_path / "runs", "--head", "knn",
                   "--val-fraction", "0", *option])
    for w in words:
        assert w in line, line
    assert not (tmp_path / "runs").exists()


def test_a_cache_without_labels_is_one_line(tmp_path):
    x, _ = _blobs(20, 0)
    path = make_cache(tmp_path / "unlabeled.h5", x, np.full(20, -1), classes=[],
                      paths=[f"u/{i}.png" for i in range(20)])
    line = _error([path, "-o", tmp_path / "runs", "--head", "knn", "--k", "3"])
    assert "has no class names" in line and "labeled images" in line


def test_a_damaged_head_json_is_one_line(caches, tmp_path):
    summary = _sweep(caches, tmp_path / "runs", k=(5,), temperature=(0.07,))
    run = Path(summary.leaderboard[0]["path"])
    meta = json.loads((run / "head.json").read_text())
    meta["k"] = 301
    (run / "head.json").write_text(json.dumps(meta))
    out = CliRunner().invoke(main, ["export", str(run), "-o", str(tmp_path / "m.pt2")])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "k" in out.output and "bank_rows (300)" in out.output


# ------------------------------------------------------------------- export, predict, report

CLASSES = ("cat", "dog", "owl")


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A random-init VGG16 pool5 cache of 15 tiny images and a k-NN sweep on it."""
    root = tmp_path_factory.mktemp("knn-export")
    images = make_folder(root / "images", classes=CLASSES, per_class=5, seed=3)
    cache = root / "train.h5"
    extract(images, cache, ExtractConfig(weights="none", layer="pool5", image_size=32,
                                         workers=0, progress=False))
    summary = train_head(cache, root / "runs", TrainConfig(head=("knn",), k=(3,),
                                                             temperature=(0.07, 0.5),
                                                             val_fraction=0.25))
    return {"root": root, "images": images, "cache": cache, "runs": root / "runs",
            "run": summary.leaderboard[0]["path"]}


def _head_logits(run, feats):
    head, _ = load_head(run)
    with torch.no_grad():
        return head(feats)


def test_export_pt2_and_onnx_equal_the_head_and_predict(image_run, tmp_path):
    pytest.importorskip("onnxruntime")
    feats, paths, crops = _rows_and_crops(image_run["cache"], rows=(0, 4, 7, 11, 14))
    np.save(tmp_path / "x.npy", crops.numpy())
    expected = _head_logits(image_run["run"], feats)                          # (5, 3)
    for fmt, script in (("pt2", _PT2_SCRIPT), ("onnx", _ONNX_SCRIPT)):
        path = tmp_path / f"knn.{fmt}"
        summary = export(image_run["run"], path, ExportConfig(format=fmt))
        rows = summary.meta["head"]["bank_rows"]
        assert summary.meta["head"]["kind"] == "knn" and summary.meta["head"]["k"] == 3
        assert f"knn head (embeds its {rows} training rows)" in summary.line()
        assert summary.parity["max_abs_diff"] <= summary.parity["tolerance"]
        out = _fresh(script, path, tmp_path / "x.npy", cwd=tmp_path)
        assert out["project"] == []
        logits = torch.tensor(out["logits"])
        assert torch.equal(logits.argmax(1), expected.argmax(1))
        assert (logits - expected).abs().max() <= summary.parity["tolerance"]
        result = predict(path, paths, PredictConfig(top_k=3, workers=0, progress=False))
        np.testing.assert_allclose(result.logits, logits.numpy(), atol=1e-4)
        assert [p["top"][0]["index"] for p in result.predictions] == expected.argmax(1).tolist()


def test_torchvision_format_is_refused_in_one_line(image_run, tmp_path):
    out = CliRunner().invoke(main, ["export", image_run["run"], "-o", str(tmp_path / "m.pth"),
                                    "--format", "torchvision"])
    assert out.exit_code == 1, out.output
    lines = [l for l in out.output.splitlines() if l.startswith("Error:")]
    assert len(lines) == 1 and "knn head" in lines[0] and "--format pt2 or onnx" in lines[0]
    assert not (tmp_path / "m.pth").exists()


def test_report_draws_a_knn_sweep(image_run, tmp_path):
    summary = report(image_run["runs"], tmp_path / "report")
    assert summary.runs == 2 and summary.notes == []
    assert (tmp_path / "report" / "report.md").read_text().count("knn-k3-T") >= 2
