"""train_head(): equals the tutorial's training, sweeps equal single runs, streaming equals RAM,
logreg equals scikit-learn, guards, records, CLI.

Caches are written directly with CacheWriter from synthetic features (no VGG), except in the
tutorial-equivalence test, which runs a random-init VGG16 on 32x32 images.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, log_loss
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from cache import CacheReader
from cache.errors import UserError
from cli.main import main
from pipeline.backbone import FrozenBackbone, cut
from pipeline.preprocessing import default_preprocessing
from pipeline.config import TrainConfig
from pipeline.head_file import load_head
from pipeline.heads import HeadStack, StackedOptimizer
from pipeline.splits import hash_split
from pipeline.train_head import _class_weights, train_head

from ._caches import MANIFEST, make_cache
from .conftest import one_line

FAST = dict(epochs=3, batch_size=16, val_fraction=0.25)


def blobs(n=160, d=8, c=3, seed=0, noise=1.0):
    """Gaussian clusters: (x (n, d) float32, y (n,))."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    x = rng.normal(size=(c, d))[y] * 1.5 + noise * rng.normal(size=(n, d))
    return x.astype(np.float32), y


@pytest.fixture
def cache(tmp_path):
    return make_cache(tmp_path / "train.h5", *blobs())


def heads_of(summary) -> dict[str, dict[str, torch.Tensor]]:
    return {r["run_id"]: torch.load(f"{r['path']}/head.pt", weights_only=True)
            for r in summary.leaderboard}


# ------------------------------------------------------------------- equivalence with the tutorial

@pytest.fixture(scope="module")
def vgg_cache(tmp_path_factory):
    """A random-init VGG16, 12 random 32x32 images and labels, and their fc7 features cached."""
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None)
    g = torch.Generator().manual_seed(1)
    images, labels = torch.rand(12, 3, 32, 32, generator=g), torch.randint(0, 3, (12,), generator=g)
    pre = default_preprocessing("vgg16", 32)
    with torch.inference_mode():
        feats = FrozenBackbone(cut(model, "fc7"), pre.mean, pre.std)(images)     # (12, 4096)
    path = make_cache(tmp_path_factory.mktemp("vgg") / "fc7.h5", feats.numpy(), labels.numpy())
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    return model, (images - mean) / std, labels, path


@pytest.mark.parametrize("optimizer, lr, momentum, wd", [
    ("sgd", 0.5, 0.0, 0.0),          # the tutorial's optim.SGD (a larger lr, so the weights move)
    ("sgd", 0.2, 0.9, 1e-2),
    ("adamw", 1e-2, 0.0, 1e-2),
])
def test_linear_head_on_cache_matches_the_tutorial_step_for_step(vgg_cache, tmp_path, optimizer,
                                                                 lr, momentum, wd):
    model, normalized, labels, path = vgg_cache
    init = HeadStack(4096, 3, seeds=[0]).head_state(0)
    # The tutorial: freeze everything, replace the last layer, optimise what requires grad,
    # run the whole frozen network every step (eval mode: dropout off).
    for p in model.parameters():
        p.requires_grad = False
    model.classifier[6] = nn.Linear(4096, 3)
    model.classifier[6].load_state_dict(init)
    model.eval()
    trainable = filter(lambda p: p.requires_grad, model.parameters())
    tutorial_opt = (torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=wd)
                    if optimizer == "sgd" else torch.optim.AdamW(trainable, lr=lr, weight_decay=wd))
    # The cache way: the library's training step on features read back from the float32 cache.
    with CacheReader(path) as r:
        cached = torch.from_numpy(r.load_features())
    stack = HeadStack(4096, 3, seeds=[0])
    opt = StackedOptimizer(stack.params, optimizer, [lr], [wd], momentum=momentum)
    order = torch.Generator().manual_seed(0)          # train_head's documented batch order
    for epoch in range(2):
        perm = torch.randperm(12, generator=order)
        for i in range(0, 12, 4):
            idx = perm[i:i + 4]
            loss = nn.CrossEntropyLoss()(model(normalized[idx]), labels[idx])
            tutorial_opt.zero_grad()
            loss.backward()
            tutorial_opt.step()
            stack.losses(stack.forward(cached[idx]), labels[idx]).sum().backward()
            opt.step()
            for name, t in model.classifier[6].state_dict().items():
                torch.testing.assert_close(stack.head_state(0)[name], t, rtol=1e-4, atol=1e-6)
    moved = (model.classifier[6].weight - init["weight"]).abs().max()
    assert moved > 1e-3, "the test must move the weights far beyond its tolerance"
    # And train_head end to end on that cache lands on the tutorial's weights.
    cfg = TrainConfig(optimizer=(optimizer,), lr=(lr,), weight_decay=(wd,), momentum=momentum,
                      epochs=2, batch_size=4, val_fraction=0.0, seed=(0,), data_seed=0,
                      standardize=False)                  # the tutorial's fc8 sees raw fc7
    head, meta = load_head(train_head(path, tmp_path / "runs", cfg).best_path)
    assert meta["in_dim"] == 4096 and meta["cache"]["layer"] == "classifier.4"
    for name, t in model.classifier[6].state_dict().items():
        torch.testing.assert_close(head.state_dict()[name], t, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- sweeps and data

def test_batched_sweep_equals_heads_trained_one_by_one(cache, tmp_path):
    shared = dict(hidden=((6,),), label_smoothing=(0.1,), weight_decay=(1e-3,), patience=2,
                  epochs=4, batch_size=16, val_fraction=0.25)
    sweep = TrainConfig(head=("linear", "mlp"), lr=(1e-2, 5e-2), dropout=(0.0, 0.3), seed=(0, 1),
                        **shared)
    together = train_head(cache, tmp_path / "sweep", sweep)
    assert together.experiments == 16 and together.passes == [8, 8]
    batched = heads_of(together)
    metrics = {r["run_id"]: r for r in together.leaderboard}
    for row in together.leaderboard[::4]:          # a quarter of them alone, to stay fast
        alone_cfg = TrainConfig(head=(row["head"],), lr=(row["lr"],), dropout=(row["dropout"],),
                                seed=(row["seed"],), **shared)
        alone = train_head(cache, tmp_path / row["run_id"], alone_cfg)
        (run_id, state), = heads_of(alone).items()
        assert run_id == row["run_id"]
        for name, t in state.items():
            torch.testing.assert_close(batched[run_id][name], t, rtol=1e-4, atol=1e-5)
        assert alone.leaderboard[0]["epochs_run"] == metrics[run_id]["epochs_run"]
        assert alone.leaderboard[0]["val_acc"] == pytest.approx(metrics[run_id]["val_acc"])


def test_the_help_example_is_24_experiments(cache, tmp_path):
    cfg = TrainConfig(lr=(1e-3, 1e-2), weight_decay=(0.0, 1e-4), dropout=(0.0, 0.5), seed=(0, 1, 2),
                      epochs=1, batch_size=32)
    summary = train_head(cache, tmp_path / "runs", cfg)
    assert summary.experiments == 24 == len(set(heads_of(summary)))


def test_streaming_equals_in_ram_training(tmp_path):
    # 4096 float16 features: 128 rows per 1 MiB chunk, so 600 rows are 5 chunks.
    x, y = blobs(n=600, d=4096, c=3, noise=4.0)
    path = make_cache(tmp_path / "f16.h5", x, y, dtype="float16")
    cfg = dict(lr=(1e-3, 1e-2), dropout=(0.0, 0.5), epochs=2, batch_size=50, shuffle_chunks=2,
               val_fraction=0.2, standardize=True)     # mean and std from a streamed pass too
    ram = train_head(path, tmp_path / "ram", TrainConfig(**cfg))
    limit = 3 * 2**20 + 2**19          # a window of 2 chunks + 1 for evaluation
    stream = train_head(path, tmp_path / "stream", TrainConfig(**cfg, max_memory=limit))
    assert (ram.memory["train"], stream.memory["train"]) == ("ram", "stream")
    assert stream.memory["eval"] == "stream" and stream.memory["window_chunks"] == 2
    assert stream.memory["peak_feature_bytes"] <= limit < ram.memory["peak_feature_bytes"]
    assert ram.passes == stream.passes == [4]
    a, b = heads_of(ram), heads_of(stream)
    assert a.keys() == b.keys() and len(a) == 4
    for run_id in a:
        for name in a[run_id]:
            assert torch.equal(a[run_id][name], b[run_id][name])
    assert ([r["val_loss"] for r in ram.leaderboard]
            == [r["val_loss"] for r in stream.leaderboard])


def test_streaming_window_must_fit_in_memory(tmp_path):
    path = make_cache(tmp_path / "f.h5", *blobs(n=300, d=4096))
    with pytest.raises(UserError, match="--max-memory .* does not hold"):
        train_head(path, tmp_path / "runs", TrainConfig(**FAST, max_memory=2**20))
    with pytest.raises(UserError, match="logreg heads need the training features in RAM"):
        train_head(path, tmp_path / "runs",
                   TrainConfig(**FAST, head=("logreg",), max_memory=3 * 2**20))


def test_hash_split_is_stable_when_images_are_added():
    old = [f"cat/{i}.jpg" for i in range(2000)]
    new = old + [f"dog/{i}.jpg" for i in range(1000)] + [f"cat/new{i}.jpg" for i in range(500)]
    before, after = hash_split(old, 0.1), hash_split(new, 0.1)
    assert np.array_equal(after[:len(old)], before)
    assert 0.08 < after.mean() < 0.12
    assert np.array_equal(hash_split(new[::-1], 0.1), after[::-1])     # order does not matter


def test_hash_split_used_for_validation(tmp_path):
    x, y = blobs(n=200)
    paths = [f"img/{i}.png" for i in range(200)]
    summary = train_head(make_cache(tmp_path / "a.h5", x, y, paths), tmp_path / "r",
                         TrainConfig(epochs=1, val_fraction=0.3))
    assert summary.data["val"]["rows"] == int(hash_split(paths, 0.3).sum())
    assert summary.data["train"]["rows"] == 200 - summary.data["val"]["rows"]


def test_same_seed_same_results(cache, tmp_path):
    cfg = TrainConfig(head=("linear", "mlp"), hidden=((5,),), dropout=(0.0, 0.5), **FAST)
    a, b = train_head(cache, tmp_path / "a", cfg), train_head(cache, tmp_path / "b", cfg)
    ha, hb = heads_of(a), heads_of(b)
    assert ha.keys() == hb.keys()
    assert all(torch.equal(ha[k][n], hb[k][n]) for k in ha for n in ha[k])
    other = heads_of(train_head(cache, tmp_path / "c", TrainConfig(
        head=("linear", "mlp"), hidden=((5,),), dropout=(0.0, 0.5), data_seed=1, **FAST)))
    label = {run_id.rsplit("-", 1)[0]: state for run_id, state in ha.items()}   # id minus hash
    assert len(other) == 4 and all(not torch.equal(label[run_id.rsplit("-", 1)[0]][n], state[n])
                                   for run_id, state in other.items() for n in state)


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    x, y = blobs(n=120, noise=3.0, seed=3)
    path = make_cache(tmp_path / "noisy.h5", x, y)
    cfg = dict(lr=(0.5,), optimizer=("sgd",), batch_size=8, val_fraction=0.3)
    stopped = train_head(path, tmp_path / "a",
                         TrainConfig(**cfg, epochs=30, patience=2)).leaderboard[0]
    assert stopped["epochs_run"] == stopped["best_epoch"] + 2 < 30
    assert stopped["val_acc"] == stopped["best_val_acc"]
    short = train_head(path, tmp_path / "b", TrainConfig(**cfg, epochs=stopped["best_epoch"]))
    kept = torch.load(f"{stopped['path']}/head.pt", weights_only=True)
    assert torch.equal(kept["weight"], next(iter(heads_of(short).values()))["weight"])


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [1, 1, 1, 1, 1, 1]),
    ("step", [1, 1, 0.1, 0.1, 0.01, 0.01]),
])
def test_schedules(cache, tmp_path, schedule, expected):
    cfg = TrainConfig(schedule=schedule, epochs=6, batch_size=64, lr=(0.1,))
    run = train_head(cache, tmp_path / "r", cfg).leaderboard[0]
    history = json.loads((tmp_path / "r" / run["run_id"] / "metrics.json").read_text())["epochs"]
    assert [h["lr"] for h in history] == pytest.approx([0.1 * e for e in expected])


def test_cosine_schedule_decays_to_zero(cache, tmp_path):
    cfg = TrainConfig(schedule="cosine", epochs=4, batch_size=200, lr=(0.1,))   # one step an epoch
    run = train_head(cache, tmp_path / "r", cfg).leaderboard[0]
    history = json.loads((tmp_path / "r" / run["run_id"] / "metrics.json").read_text())["epochs"]
    assert [h["lr"] for h in history] == pytest.approx([0.1, 0.0853553, 0.05, 0.0146447], rel=1e-5)


# ---------------------------------------------------------------------------- standardization

def uneven(x, seed=5):
    """fc7-like trouble for a head: small per-feature spreads on large, unequal offsets."""
    offsets = np.random.default_rng(seed).uniform(0, 5, x.shape[1])
    return (x * 0.03 + offsets).astype(np.float32)


def test_standardized_head_is_saved_folded_and_takes_raw_features(tmp_path):
    x, y = blobs(n=240, d=8, c=3, noise=1.5)
    x = (x * [0.03, 0.1, 1, 3, 0.03, 10, 0.5, 1] + [5, -2, 0, 40, 1, 3, 0, 7]).astype(np.float32)
    x[:, 2] = 0.7                          # a constant feature: centred, divided by 1, not by 0
    mean, std = x[:180].astype(np.float64).mean(0), x[:180].astype(np.float64).std(0)
    assert std[2] == 0
    std[2] = 1.0
    xs = ((x - mean) / std).astype(np.float32)                   # standardized by hand
    cfg = dict(head=("linear", "mlp"), hidden=((6,),), lr=(1e-2,), dropout=(0.0, 0.2), epochs=3,
               batch_size=16)
    folded = train_head(make_cache(tmp_path / "raw.h5", x[:180], y[:180]), tmp_path / "folded",
                        TrainConfig(**cfg, standardize=True),
                        val_path=make_cache(tmp_path / "raw-val.h5", x[180:], y[180:]))
    plain = train_head(make_cache(tmp_path / "std.h5", xs[:180], y[:180]), tmp_path / "plain",
                       TrainConfig(**cfg, standardize=False),
                       val_path=make_cache(tmp_path / "std-val.h5", xs[180:], y[180:]))
    label = {r["run_id"].rsplit("-", 1)[0]: r for r in plain.leaderboard}
    assert len(label) == len(folded.leaderboard) == 4
    for row in folded.leaderboard:
        ref = label[row["run_id"].rsplit("-", 1)[0]]
        head, meta = load_head(row["path"])
        unfolded, ref_meta = load_head(ref["path"])
        assert meta["standardization"] == {
            "statistics": "per-feature mean and std of the training rows", "rows": 180,
            "folded_into_first_layer": True}
        assert ref_meta["standardization"] is None
        with torch.no_grad():
            raw_logits = head(torch.from_numpy(x))                      # (240, 3)
            torch.testing.assert_close(raw_logits, unfolded(torch.from_numpy(xs)),
                                       rtol=1e-4, atol=1e-4)
        assert raw_logits.abs().max() > 1             # the heads moved well past the tolerance
        # Validation during training (unfolded, standardized batches) and after it (the saved,
        # folded head on raw features) measure the same function.
        history = json.loads((tmp_path / "folded" / row["run_id"] / "metrics.json").read_text())
        assert history["epochs"][-1]["val_loss"] == pytest.approx(row["val_loss"], rel=1e-5)
        assert row["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-4)


def test_streamed_and_in_ram_standardization_agree(tmp_path):
    from pipeline._feature_splits import Split, feature_moments

    # 4096 float16 features: 128 rows per 1 MiB chunk; a hash split leaves chunks partly used.
    x, y = blobs(n=600, d=4096, c=3, noise=4.0)
    x16 = uneven(x).astype(np.float16)
    path = make_cache(tmp_path / "f16.h5", x16, y, dtype="float16")
    with CacheReader(path) as reader:
        rows = np.flatnonzero(~hash_split(reader.paths, 0.2))
        in_ram, streamed = Split("train", reader, rows), Split("train", reader, rows)
        in_ram.load()
        mean, std = feature_moments(in_ram)
        assert streamed.ram is None
        mean_s, std_s = feature_moments(streamed)
    assert np.array_equal(mean, mean_s) and np.array_equal(std, std_s)      # the same bits
    exact = x16[rows].astype(np.float64)
    np.testing.assert_allclose(mean, exact.mean(0), rtol=1e-13)
    np.testing.assert_allclose(std, exact.std(0), rtol=1e-10)
    assert 0.05 < std.mean() < 0.2 and mean.mean() > 1        # the uneven features they are


def test_standardizing_trains_uneven_features_in_a_few_epochs(tmp_path):
    x, y = blobs(n=400, d=16, c=4, noise=1.0)
    path = make_cache(tmp_path / "uneven.h5", uneven(x), y)
    cfg = dict(lr=(1e-2,), epochs=3, batch_size=32, val_fraction=0.25)
    on = train_head(path, tmp_path / "on", TrainConfig(**cfg, standardize=True)).leaderboard[0]
    off = train_head(path, tmp_path / "off", TrainConfig(**cfg, standardize=False)).leaderboard[0]
    assert on["val_acc"] >= 0.95 and off["val_acc"] <= 0.35   # seen: 1.0 against 0.24 (chance)
    assert on["val_loss"] < 0.5 < 1.3 < off["val_loss"]       # seen: 0.29 against 1.42


# ------------------------------------------------------------------------------------ logreg

@pytest.mark.parametrize("c, standardize, class_weight", [
    (3, True, "none"), (3, False, "balanced"), (2, True, "balanced"),
])
def test_logreg_agrees_with_scikit_learn(tmp_path, c, standardize, class_weight):
    x, y = blobs(n=240, d=6, c=c, noise=2.0)
    x = x * np.arange(1, 7, dtype=np.float32) + 3          # unequal scales and offsets
    train = make_cache(tmp_path / "train.h5", x[:180], y[:180])
    val = make_cache(tmp_path / "val.h5", x[180:], y[180:])
    cfg = TrainConfig(head=("logreg",), C=(0.05, 1.0), class_weight=class_weight,
                      logreg_standardize=standardize)
    summary = train_head(train, tmp_path / "runs", cfg, val_path=val)
    for row in summary.leaderboard:
        head, meta = load_head(row["path"])
        assert meta["kind"] == "logreg" and meta["converged"] and isinstance(head, nn.Linear)
        clf = LogisticRegression(C=row["C"], max_iter=1000,
                                 class_weight=None if class_weight == "none" else class_weight)
        direct = make_pipeline(StandardScaler(), clf) if standardize else clf
        direct.fit(x[:180], y[:180])
        with torch.no_grad():
            ours = head(torch.from_numpy(x[180:])).softmax(-1).numpy()
        np.testing.assert_allclose(ours, direct.predict_proba(x[180:]), atol=1e-5)
        assert row["val_loss"] == pytest.approx(log_loss(y[180:], direct.predict_proba(x[180:])),
                                                rel=1e-4)


# ---------------------------------------------------------------------------- records, metrics

def test_records_and_metrics(tmp_path):
    x, y = blobs(n=300, d=10, c=6, noise=2.5)
    train = make_cache(tmp_path / "train.h5", x[:200], y[:200])
    test = make_cache(tmp_path / "test.h5", x[200:], y[200:])
    cfg = TrainConfig(head=("linear", "mlp"), hidden=((8, 4),), activation=("gelu",),
                      lr=(1e-2, 1e-3), **FAST)
    summary = train_head(train, tmp_path / "runs", cfg, test_path=test)
    assert summary.experiments == 4
    assert summary.best_run == summary.leaderboard[0]["run_id"]
    assert json.loads((tmp_path / "runs" / "summary.json").read_text()) == summary.to_json()
    with open(tmp_path / "runs" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run_id"] for r in rows] == [r["run_id"] for r in summary.leaderboard]
    accs = [float(r["val_acc"]) for r in rows]
    assert accs == sorted(accs, reverse=True)
    assert {r["head"] for r in rows} == {"linear", "mlp"} and rows[0]["test_acc"] != ""
    for row in summary.leaderboard:
        run = tmp_path / "runs" / row["run_id"]
        metrics = json.loads((run / "metrics.json").read_text())
        assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
        assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(metrics["epochs"][0])
        head, meta = load_head(run)
        # No early stopping: the last epoch's weights are saved, the best epoch still recorded.
        accs = [(e["val_acc"], -e["val_loss"]) for e in metrics["epochs"]]
        assert meta["weights_epoch"] == 3 and row["best_epoch"] == 1 + accs.index(max(accs))
        assert meta["class_names"] == [f"class{i}" for i in range(6)]
        assert meta["cache"]["weights_sha256"] == "ab" * 32 and meta["config"]["epochs"] == 3
        # Test metrics agree with scikit-learn on the saved head's own predictions.
        with torch.no_grad():
            prob = head(torch.from_numpy(x[200:])).softmax(-1).numpy()
        pred, m = prob.argmax(1), metrics["test"]
        assert m["top1"] == pytest.approx((pred == y[200:]).mean())
        top5 = np.mean([t in np.argsort(-p)[:5] for p, t in zip(prob, y[200:])])
        assert m["top5"] == pytest.approx(top5)
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y[200:], pred))
        assert m["log_loss"] == pytest.approx(log_loss(y[200:], prob, labels=range(6)), rel=1e-4)
        assert m["confusion_matrix"] == confusion_matrix(y[200:], pred, labels=range(6)).tolist()
        assert m["rows"] == 100 and len(m["per_class_accuracy"]) == 6
        assert row["test_acc"] == m["top1"]


def test_without_validation_every_head_is_ranked_by_its_clean_training_loss(tmp_path):
    x, y = blobs(n=200, d=8, c=3, noise=1.0)
    path = make_cache(tmp_path / "c.h5", x, y)
    cfg = TrainConfig(head=("linear", "logreg"), lr=(5e-2,), label_smoothing=(0.3,), C=(0.01,),
                      epochs=10, val_fraction=0.0)
    summary = train_head(path, tmp_path / "runs", cfg)
    linear, logreg = summary.leaderboard
    assert (linear["head"], logreg["head"]) == ("linear", "logreg")
    assert "without dropout or label smoothing" in summary.ranked_by
    # Ranked by plain cross-entropy on the training rows, the saved head's own.
    head, _ = load_head(linear["path"])
    with torch.no_grad():
        prob = head(torch.from_numpy(x)).softmax(-1).numpy()
    assert linear["train_loss"] == pytest.approx(log_loss(y, prob), rel=1e-5)
    assert linear["train_acc"] == pytest.approx((prob.argmax(1) == y).mean())
    metrics = json.loads((tmp_path / "runs" / linear["run_id"] / "metrics.json").read_text())
    assert metrics["train"]["log_loss"] == linear["train_loss"]
    # The last epoch's running loss (label smoothing 0.3 in it) would have ranked it last.
    # Seen: clean 0.22, logreg 0.37, running 0.73.
    running = metrics["epochs"][-1]["train_loss"]
    assert linear["train_loss"] < 0.25 < logreg["train_loss"] < 0.45 < 0.7 < running


def test_on_epoch_gets_every_epoch_of_every_pass(cache, tmp_path, caplog):
    seen = []
    cfg = TrainConfig(head=("linear", "mlp", "logreg"), hidden=((5,),), lr=(1e-2, 1e-1), **FAST)
    with caplog.at_level(logging.DEBUG, logger="pipeline.train_head"):
        summary = train_head(cache, tmp_path / "runs", cfg, on_epoch=seen.append)
    assert summary.passes == [2, 2, 1]
    assert [(e["pass"], e["kind"], e["epoch"]) for e in seen] == [
        (p, kind, epoch) for p, kind in ((1, "linear"), (2, "mlp")) for epoch in (1, 2, 3)]
    assert {(e["passes"], e["heads"], e["active"], e["epochs"]) for e in seen} == {(3, 2, 2, 3)}
    assert all(e["seconds"] > 0 and e["train_loss_min"] <= e["train_loss_max"] for e in seen)
    for e in seen:                        # the best validation accuracy of that pass and epoch
        runs = [r for r in summary.leaderboard if r["head"] == e["kind"]]
        accs = {r["run_id"]: json.loads((tmp_path / "runs" / r["run_id"] / "metrics.json")
                                        .read_text())["epochs"][e["epoch"] - 1]["val_acc"]
                for r in runs}
        assert e["best_val_acc"] == max(accs.values())
        assert accs[e["best_run"]] == e["best_val_acc"]          # named as its folder is
    assert "pass 2/3 mlp x2: epoch 3/3" in caplog.text               # the line for -v stays


def test_summary_is_a_dataclass_and_summary_json_its_to_json(cache, tmp_path):
    from pipeline import TrainSummary

    summary = train_head(cache, tmp_path / "runs", TrainConfig(lr=(1e-2, 1e-1), **FAST))
    assert isinstance(summary, TrainSummary)
    data = summary.to_json()
    assert json.loads((tmp_path / "runs" / "summary.json").read_text()) == data
    assert set(data) == {"leaderboard", "best_run", "best_path", "ranked_by", "experiments",
                         "passes", "data", "memory", "seconds", "class_names", "runs_dir",
                         "results_csv", "runs", "warnings"}
    assert data["runs"] == data["experiments"] == 2 and data["warnings"] == []
    assert data["data"]["train"]["path"] == str(cache.resolve())
    assert data["best_path"] == summary.leaderboard[0]["path"] == str(
        tmp_path / "runs" / summary.best_run)
    assert data["data"]["val"]["rows"] + data["data"]["train"]["rows"] == 160


def test_balanced_class_weights_are_scikit_learns():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0] * 30 + [1] * 5 + [3] * 12)
    ours = _class_weights(y, 4, "balanced").numpy()
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 3]), y=y)
    np.testing.assert_allclose(ours[[0, 1, 3]], expected, rtol=1e-6)
    assert ours[2] == 0 and _class_weights(y, 4, "none") is None


def test_no_top5_below_five_classes(cache, tmp_path):
    summary = train_head(cache, tmp_path / "r", TrainConfig(**FAST))
    assert summary.leaderboard[0]["val_top5"] is None


# ------------------------------------------------------------------------------------- guards

@pytest.mark.parametrize("change, message", [
    ({"layer": "classifier.1"}, "holds no cut 'classifier.4'"),    # the train cache's cut
    ({"weights_sha256": "cd" * 32}, "does not match the train cache.*weights_sha256"),
    ({"preprocessing": {**MANIFEST["preprocessing"], "crop_size": 64}},
     "does not match the train cache.*preprocessing.crop_size: 32 vs 64"),
    ({"class_names": ["class0", "class1", "other"]}, "does not match the train cache.*class_names"),
    # Another backbone: what made the caches is named, not a --layer that cannot help.
    ({"backbone": "resnet18", "weights_sha256": "cd" * 32, "layer": "layer3",
      "layer_alias": None}, "does not match the train cache.*backbone: 'vgg16' vs 'resnet18'"),
])
def test_mismatching_val_or_test_cache_is_refused(cache, tmp_path, change, message):
    other = make_cache(tmp_path / "other.h5", *blobs(n=40), **change)
    for role in ("val_path", "test_path"):
        with pytest.raises(UserError, match=message):
            train_head(cache, tmp_path / "runs", TrainConfig(**FAST), **{role: other})


def test_float16_val_with_float32_train_is_fine(cache, tmp_path):
    val = make_cache(tmp_path / "val16.h5", *blobs(n=40, seed=1), dtype="float16")
    summary = train_head(cache, tmp_path / "runs", TrainConfig(**FAST), val_path=val)
    assert summary.data["val"]["rows"] == 40


def test_incomplete_cache_needs_allow_incomplete(tmp_path):
    path = make_cache(tmp_path / "part.h5", *blobs(), complete=False)
    with pytest.raises(UserError, match="incomplete.*--allow-incomplete"):
        train_head(path, tmp_path / "runs", TrainConfig(**FAST))
    summary = train_head(path, tmp_path / "runs", TrainConfig(**FAST, allow_incomplete=True))
    assert summary.data["train"]["rows"] + summary.data["val"]["rows"] == 160


def test_unlabeled_rows_are_ignored_with_a_warning(tmp_path, caplog):
    x, y = blobs()
    y[::4] = -1
    path = make_cache(tmp_path / "u.h5", x, y, classes=["a", "b", "c"])
    with caplog.at_level(logging.WARNING, logger="pipeline.train_head"):
        summary = train_head(path, tmp_path / "runs", TrainConfig(**FAST))
    assert "40 unlabeled rows ignored" in caplog.text
    assert summary.data["train"]["rows"] + summary.data["val"]["rows"] == 120


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_are_an_error(tmp_path, bad):
    x, y = blobs()
    x[17, 3] = bad
    path = make_cache(tmp_path / "nan.h5", x, y)
    with pytest.raises(UserError, match=r"NaN or inf features \(row 17"):
        train_head(path, tmp_path / "runs", TrainConfig(**FAST))


@pytest.mark.parametrize("change, message", [
    ({"head": ("svm",)}, "unknown --head 'svm'"),
    ({"lr": (0.0,)}, "--lr 0.0"),
    ({"dropout": (1.0,)}, "--dropout 1.0"),
    ({"schedule": "linear"}, "unknown --schedule"),
    ({"patience": 2, "val_fraction": 0.0}, "--patience .* needs validation data"),
])
def test_bad_settings_are_refused(cache, tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        train_head(cache, tmp_path / "runs", TrainConfig(**{**FAST, **change}))


@pytest.mark.parametrize("option, value", [
    ("--lr", "inf"), ("--lr", "nan"), ("--lr", "1e-3,inf"), ("--lr", "-inf"),
    ("--weight-decay", "inf"), ("--weight-decay", "nan"), ("--dropout", "nan"),
    ("--label-smoothing", "nan"), ("--C", "inf"), ("--momentum", "nan"),
    ("--val-fraction", "nan"),
])
def test_non_finite_settings_are_one_line_before_training(cache, tmp_path, option, value):
    args = ["train-head", str(cache), "-o", str(tmp_path / "runs"), option, value]
    if option == "--C":
        args += ["--head", "logreg"]
    line = one_line(CliRunner().invoke(main, args), "finite")
    assert line.startswith(f"Error: {option} "), line
    assert not (tmp_path / "runs").exists()


def test_non_finite_settings_are_refused_by_the_library(cache, tmp_path):
    for change in ({"lr": (math.inf,)}, {"weight_decay": (math.nan,)}, {"momentum": math.inf}):
        with pytest.raises(UserError, match="finite"):
            train_head(cache, tmp_path / "runs", TrainConfig(**{**FAST, **change}))


@pytest.mark.parametrize("classes", [["cat"], ["cat", "dog"]])
def test_a_single_class_trains_with_a_warning(tmp_path, caplog, classes):
    x, _ = blobs(n=40)
    path = make_cache(tmp_path / "one.h5", x, np.zeros(40, int), classes=classes)
    with caplog.at_level(logging.WARNING, logger="pipeline.train_head"):
        summary = train_head(path, tmp_path / "runs", TrainConfig(**FAST))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "only one class ('cat')" in warnings[0] and "accuracy of 1.0 says nothing" in warnings[0]
    if len(classes) == 1:
        assert summary.leaderboard[0]["val_acc"] == 1.0              # what it would hide
    assert summary.warnings == warnings
    assert json.loads((tmp_path / "runs" / "summary.json").read_text())["warnings"] == warnings
    assert f"WARNING: {warnings[0]}" in summary.line()
    result = CliRunner().invoke(main, ["train-head", str(path), "-o", str(tmp_path / "r2"),
                                       "--epochs", "1"])
    assert result.exit_code == 0 and "WARNING: the training rows" in result.output


def _csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_second_sweep_into_the_folder_is_merged_and_ranked_as_one(cache, tmp_path):
    runs = tmp_path / "runs"
    first = train_head(cache, runs, TrainConfig(lr=(1e-3, 1e-1), **FAST))
    kept = next(r for r in first.leaderboard if r["lr"] == 1e-3)
    kept_files = {p.name: p.read_bytes() for p in Path(kept["path"]).iterdir()}
    second = train_head(cache, runs, TrainConfig(lr=(1e-1, 3e-1), **{**FAST, "epochs": 4}))
    # The 1e-1 run is another experiment now (4 epochs: another run id); with 3 epochs it
    # would have replaced the first sweep's row.
    assert second.experiments == 2 and second.runs == 4 == len(second.leaderboard)
    rows = _csv_rows(runs / "results.csv")
    assert [r["run_id"] for r in rows] == [r["run_id"] for r in second.leaderboard]
    assert {r["run_id"] for r in first.leaderboard} < {r["run_id"] for r in rows}
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
    keys = [(-float(r["val_acc"]), float(r["val_loss"]), r["run_id"]) for r in rows]
    assert keys == sorted(keys)                                   # one ranking over both
    assert json.loads((runs / "summary.json").read_text())["leaderboard"] == second.leaderboard
    assert second.best_run == rows[0]["run_id"]
    assert {p.name: p.read_bytes() for p in Path(kept["path"]).iterdir()} == kept_files
    # The same experiment again replaces its row (and its files), keeping the others.
    third = train_head(cache, runs, TrainConfig(lr=(1e-3,), **FAST))
    assert third.runs == 4 and [r["run_id"] for r in third.leaderboard].count(
        kept["run_id"]) == 1
    again = next(r for r in third.leaderboard if r["run_id"] == kept["run_id"])
    assert again["val_acc"] == kept["val_acc"]
    assert again["train_loss"] == pytest.approx(kept["train_loss"], rel=1e-6)


def test_a_sweep_that_would_not_rank_with_the_folder_is_refused_before_training(cache, tmp_path):
    runs = tmp_path / "runs"
    train_head(cache, runs, TrainConfig(**FAST))
    before = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    other = make_cache(tmp_path / "other.h5", *blobs(n=40, seed=3))
    renamed = make_cache(tmp_path / "renamed.h5", *blobs(), classes=["x", "y", "z"])
    epochs = []
    for args, kwargs, words in [
        ((cache,), {"val_fraction": 0.0}, r"ranks its runs by validation accuracy on .*train.h5 "
                                          r"\(48 rows\), this sweep would rank its runs by the "
                                          r"training loss on .*train.h5 \(160 rows\), having no "
                                          "validation data"),
        ((cache,), {"val_fraction": 0.5}, r"\(48 rows\), this sweep would rank its runs by "
                                          r"validation accuracy on .*train.h5 \(\d+ rows"),
        ((cache,), {"val_path": other}, "this sweep would rank its runs by validation accuracy "
                                        "on .*other.h5"),
        ((renamed,), {}, "over the classes .*class0.*, this one is over .*'x'"),
    ]:
        val_path = kwargs.pop("val_path", None)
        cfg = TrainConfig(**{**FAST, **kwargs})
        with pytest.raises(UserError, match=words + ".*write this sweep to another -o folder"):
            train_head(*args, runs, cfg, val_path=val_path, on_epoch=epochs.append)
    assert epochs == []
    assert {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------------------------------- CLI

def test_cli_sweep_table_and_json(cache, tmp_path):
    args = ["train-head", str(cache), "-o", str(tmp_path / "runs"), "--lr", "1e-2,1e-3",
            "--head", "linear,logreg", "--C", "0.1,1", "--epochs", "2", "--max-memory", "1G"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "val acc" in result.output and "best: " in result.output
    result = CliRunner().invoke(main, [*args, "--json"])
    summary = json.loads(result.stdout)
    assert summary == json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert summary["experiments"] == 4 and summary["memory"]["max_memory"] == 2**30
    assert {r["head"] for r in summary["leaderboard"]} == {"linear", "logreg"}


def _stage_lines(caplog, level):
    return [r.getMessage() for r in caplog.records
            if r.name == "pipeline.train_head" and r.levelno == level]


@pytest.mark.parametrize("verbosity", ["", "-v", "-q"])
def test_cli_log_is_a_line_a_pass_epochs_behind_v_and_q_is_quiet(cache, tmp_path, caplog,
                                                                  verbosity):
    caplog.set_level(logging.DEBUG, logger="pipeline.train_head")
    args = ["train-head", str(cache), "-o", str(tmp_path / "runs"), "--lr", "1e-2,1e-3",
            "--head", "linear,logreg", "--C", "0.1", "--epochs", "3"]
    args = ([verbosity, *args] if verbosity == "-v" else [*args, verbosity] if verbosity
            else args)
    if verbosity != "-v":       # without -v the stage logger stays at INFO, as under the CLI
        logging.getLogger("pipeline.train_head").setLevel(logging.INFO)
    before = logging.getLogger("pipeline.train_head").level
    try:
        result = CliRunner().invoke(main, args)
        after = logging.getLogger("pipeline.train_head").level
    finally:
        logging.getLogger("pipeline.train_head").setLevel(logging.NOTSET)
    assert after == before                                            # -q puts it back
    assert result.exit_code == 0, result.output
    ids = [r["run_id"] for r in _csv_rows(tmp_path / "runs" / "results.csv")]
    info, debug = _stage_lines(caplog, logging.INFO), _stage_lines(caplog, logging.DEBUG)
    assert "val acc" in result.output                                 # the leaderboard, always
    if verbosity == "-q":
        assert info == [] and debug == []
        return
    passes = [m for m in info if m.startswith("pass ")]
    assert [m.split(":")[0] for m in passes] == ["pass 1/2 linear x2", "pass 2/2 logreg x1"]
    assert "3 epochs" in passes[0]
    named = [m.rsplit("(", 1)[1].split(")")[0] for m in passes]       # the pass's best run
    assert all(n in ids for n in named), (named, ids)                 # with the hash suffix
    epochs = [m for m in debug if "epoch " in m]
    assert len(epochs) == (3 if verbosity == "-v" else 0)
    assert all(m.rsplit("(", 1)[1].split(")")[0] in ids for m in epochs)


def test_a_validation_split_too_small_to_rank_is_warned(tmp_path, caplog):
    x, y = blobs(n=42)
    path = make_cache(tmp_path / "small.h5", x, y)
    with caplog.at_level(logging.WARNING, logger="pipeline.train_head"):
        summary = train_head(path, tmp_path / "runs", TrainConfig(**{**FAST, "val_fraction": 0.1}))
    n = summary.data["val"]["rows"]
    assert 0 < n < 30
    assert summary.warnings == [r.getMessage() for r in caplog.records
                                if r.levelno == logging.WARNING]
    assert summary.warnings[0].startswith(f"validation holds only {n} row")
    assert "--val-fraction" in summary.warnings[0] and "WARNING: validation" in summary.line()


def test_one_experiment_is_said_in_the_singular(cache, tmp_path):
    summary = train_head(cache, tmp_path / "runs", TrainConfig(**{**FAST, "epochs": 1}))
    assert summary.line().startswith("1 experiment in 1 pass, ranked by "), summary.line()


def test_cli_hidden_sizes_and_errors(cache, tmp_path):
    ok = CliRunner().invoke(main, ["train-head", str(cache), "-o", str(tmp_path / "r"), "--head",
                                   "mlp", "--hidden", "4,6x3", "--epochs", "1", "--json"])
    assert ok.exit_code == 0, ok.output
    assert sorted(r["hidden"] for r in json.loads(ok.stdout)["leaderboard"]) == ["4", "6x3"]
    both = CliRunner().invoke(main, ["train-head", str(cache), "-o", str(tmp_path / "r"),
                                     "--val", str(cache), "--val-fraction", "0.2"])
    assert both.exit_code == 2 and "not both" in both.output
    bad = CliRunner().invoke(main, ["train-head", str(cache), "-o", str(tmp_path / "r"),
                                    "--lr", "x"])
    assert bad.exit_code == 2 and "comma-separated" in bad.output
    other = make_cache(tmp_path / "o.h5", *blobs(n=40), layer="classifier.1")
    mismatch = CliRunner().invoke(main, ["train-head", str(cache), "-o", str(tmp_path / "r"),
                                         "--val", str(other)])
    assert mismatch.exit_code == 1 and "layer" in mismatch.output
    assert "Traceback" not in mismatch.output


def test_end_to_end_from_images(tmp_path):
    """pipeline extract on tiny images, then train-head on the cache: the saved head knows
    the backbone that made its features and the class names."""
    from .conftest import make_folder

    images = make_folder(tmp_path / "img", classes=("ant", "bee", "cow"), per_class=8,
                         size=(32, 32))
    runner = CliRunner()
    made = runner.invoke(main, ["extract", str(images), "-o", str(tmp_path / "c.h5"),
                                "--weights", "none", "--image-size", "32", "--workers", "0",
                                "--dtype", "float16"])
    assert made.exit_code == 0, made.output
    result = runner.invoke(main, ["train-head", str(tmp_path / "c.h5"),
                                  "-o", str(tmp_path / "runs"), "--head", "linear,mlp",
                                  "--hidden", "16", "--dropout", "0,0.5", "--val-fraction", "0.3",
                                  "--epochs", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["experiments"] == 4 and summary["data"]["val"]["rows"] > 0
    head, meta = load_head(summary["best_path"])
    with CacheReader(tmp_path / "c.h5") as r:
        assert meta["cache"]["weights_sha256"] == r.manifest["weights_sha256"]
        assert meta["class_names"] == ["ant", "bee", "cow"] == r.class_names
        assert meta["in_dim"] == r.feature_dim == 4096
