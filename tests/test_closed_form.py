"""Ridge and LDA heads in closed form: equal scikit-learn's RidgeClassifier and
LinearDiscriminantAnalysis(solver="lsqr") on the same standardized features, the N x N dual
equals the D x D primal, streamed equals in RAM, the closed-form leave-one-out equals a
brute-force one, a ridge head exports and predicts, and bad settings are one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import RidgeClassifier
from sklearn.preprocessing import StandardScaler
from torch import nn

from cache.errors import UserError
from cli.main import main
from pipeline.closed_form import lda, ridge, statistics
from pipeline.config import ExportConfig, PredictConfig, TrainConfig
from pipeline.export import export
from pipeline.head_file import load_head
from pipeline.predict import predict
from pipeline.train_head import train_head

from ._caches import make_cache
from .test_export import _head_logits, _rows_and_crops, work  # noqa: F401 (a fixture)


def problem(n, d, c, seed=0):
    """Gaussian classes on features of unequal scales and offsets: (x (n, d) float32, y)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    x = rng.normal(size=(c, d))[y] * 1.2 + rng.normal(size=(n, d)) * 1.5
    return (x * np.linspace(0.5, 4, d) + np.linspace(-3, 3, d)).astype(np.float32), y


def z_stats(x, y, c, dual, pieces=3):
    """Standardized float64 rows z and their statistics, summed over `pieces` blocks."""
    z = StandardScaler().fit_transform(x.astype(np.float64))
    blocks = np.array_split(z, pieces)
    d = z.shape[1]
    return z, blocks, statistics(blocks, y, c, np.zeros(d), np.ones(d), dual)


def decisions(z, weight, bias, binary):
    """Our layer's decision values as scikit-learn gives them (binary: one column)."""
    out = z @ weight.T + bias
    return out[:, 1] - out[:, 0] if binary else out


def close(ours, theirs, rel=1e-6):
    assert np.abs(ours - theirs).max() <= rel * np.abs(theirs).max()


ALPHAS = (1e-3, 0.1, 1.0, 30.0)
SHRINKAGES = (0.0, 0.2, 1.0)


@pytest.mark.parametrize("n, d, c", [(300, 12, 3), (120, 9, 2), (40, 60, 4)])
def test_ridge_and_lda_equal_scikit_learn_on_standardized_features(n, d, c):
    x, y = problem(n, d, c)
    z, blocks, stats = z_stats(x, y, c, dual=n < d)
    fits, _ = ridge(stats, ALPHAS, blocks)
    for alpha, (w, b) in zip(ALPHAS, fits):
        clf = RidgeClassifier(alpha=alpha).fit(z, y)
        # ridge's binary rows are opposite: half the difference is scikit-learn's one column
        ours = decisions(z, w, b, c == 2) / (2 if c == 2 else 1)
        close(ours, clf.decision_function(z))
        assert (np.argmax(z @ w.T + b, 1) == clf.predict(z)).all()
    for s, (w, b) in zip(SHRINKAGES, lda(stats, SHRINKAGES)):
        if s == 0 and n < d:
            continue              # a singular covariance: both take a pseudo-inverse, untested
        clf = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=s).fit(z, y)
        close(decisions(z, w, b, c == 2), clf.decision_function(z))
        assert (np.argmax(z @ w.T + b, 1) == clf.predict(z)).all()


@pytest.mark.parametrize("n, d", [(40, 60), (90, 30)])
def test_dual_equals_primal(n, d):
    x, y = problem(n, d, 3, seed=1)
    z, blocks, primal = z_stats(x, y, 3, dual=False)
    _, _, dual = z_stats(x, y, 3, dual=True)
    (p_fits, p_loo), (d_fits, d_loo) = ridge(primal, ALPHAS, blocks), ridge(dual, ALPHAS)
    for (wp, bp), (wd, bd) in zip(p_fits + lda(primal, SHRINKAGES[1:]),
                                  d_fits + lda(dual, SHRINKAGES[1:])):
        close(z @ wd.T + bd, z @ wp.T + bp, 1e-8)
    for a, b in zip(p_loo, d_loo):
        assert a["loo_acc"] == b["loo_acc"]
        assert a["loo_mse"] == pytest.approx(b["loo_mse"], rel=1e-6)     # h_ii near 1: rounding


@pytest.mark.parametrize("n, d", [(30, 8), (24, 40)])      # primal, dual
def test_closed_form_leave_one_out_equals_brute_force(n, d):
    x, y = problem(n, d, 3, seed=2)
    z, blocks, stats = z_stats(x, y, 3, dual=n < d)
    _, loo = ridge(stats, ALPHAS, blocks)
    for alpha, ours in zip(ALPHAS, loo):
        squared, right = [], 0
        for i in range(n):
            keep = np.arange(n) != i
            clf = RidgeClassifier(alpha=alpha).fit(z[keep], y[keep])
            target = np.where(np.arange(3) == y[i], 1.0, -1.0)
            squared.append(((clf.decision_function(z[i:i + 1])[0] - target) ** 2).mean())
            right += int(clf.predict(z[i:i + 1])[0] == y[i])
        assert ours["loo_mse"] == pytest.approx(np.mean(squared), rel=1e-9)
        assert ours["loo_acc"] == right / n
    assert len({o["loo_mse"] for o in loo}) == len(ALPHAS)      # the alphas do differ


@pytest.mark.parametrize("binary", [False, True])
def test_saved_heads_take_raw_features_and_match_scikit_learn(tmp_path, binary):
    c = 2 if binary else 3
    x, y = problem(260, 10, c, seed=3)
    train = make_cache(tmp_path / "train.h5", x[:200], y[:200])
    val = make_cache(tmp_path / "val.h5", x[200:], y[200:])
    cfg = TrainConfig(head=("ridge", "lda"), alpha=(0.1, 10.0), shrinkage=(0.0, 0.5))
    summary = train_head(train, tmp_path / "runs", cfg, val_path=val)
    assert summary.passes == [4] and len(summary.leaderboard) == 4
    scaler = StandardScaler().fit(x[:200])
    zv = scaler.transform(x[200:])
    for row in summary.leaderboard:
        head, meta = load_head(row["path"])
        assert isinstance(head, nn.Linear) and meta["kind"] == row["head"]
        assert meta["solver"] == "primal" and meta["standardization"]["folded_into_first_layer"]
        with torch.no_grad():
            ours = head(torch.from_numpy(x[200:])).double().numpy()
        if row["head"] == "ridge":
            clf = RidgeClassifier(alpha=row["alpha"])
            assert 0 < row["loo_acc"] <= 1 and row["loo_mse"] > 0
            assert meta["loo_acc"] == row["loo_acc"]
        else:
            clf = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=row["shrinkage"])
            assert row["loo_acc"] is None
        clf.fit(scaler.transform(x[:200]), y[:200])
        theirs = clf.decision_function(zv)
        got = ours[:, 1] - ours[:, 0] if binary else ours
        if binary and row["head"] == "ridge":
            got = got / 2
        close(got, theirs, 1e-4)                         # the saved layer is float32
        assert row["val_acc"] == (clf.predict(zv) == y[200:]).mean()


@pytest.mark.parametrize("n, d", [(5200, 256), (800, 2048)])     # primal, dual (N < D)
def test_streamed_equals_in_ram(tmp_path, n, d):
    # float16 rows in 1 MiB chunks; the training rows (80 %) are more than 2 MiB.
    x, y = problem(n, d, 3, seed=4)
    path = make_cache(tmp_path / "f16.h5", x, y, dtype="float16")
    cfg = dict(head=("ridge", "lda"), alpha=(0.5, 50.0), shrinkage=(0.1,), val_fraction=0.2)
    ram = train_head(path, tmp_path / "ram", TrainConfig(**cfg))
    stream = train_head(path, tmp_path / "stream",
                        TrainConfig(**cfg, max_memory=2 * 2**20, shuffle_chunks=1))
    assert (ram.memory["train"], stream.memory["train"]) == ("ram", "stream")
    for a, b in zip(ram.leaderboard, stream.leaderboard):
        # (run ids differ in their hash: it covers the shuffle window)
        assert a["run_id"][:-7] == b["run_id"][:-7] and a["loo_mse"] == b["loo_mse"]
        for name, t in torch.load(f"{a['path']}/head.pt", weights_only=True).items():
            assert torch.equal(t, torch.load(f"{b['path']}/head.pt", weights_only=True)[name])
        assert json.loads((Path(a["path"]) / "head.json").read_text())["solver"] == (
            "dual" if n < d else "primal")


def test_32_alphas_are_one_decomposition(tmp_path):
    x, y = problem(400, 64, 3, seed=5)
    path = make_cache(tmp_path / "t.h5", x, y)
    alphas = tuple(np.logspace(-3, 3, 32).tolist())
    summary = train_head(path, tmp_path / "runs", TrainConfig(head=("ridge",), alpha=alphas))
    assert summary.passes == [32]
    assert sorted(r["alpha"] for r in summary.leaderboard) == sorted(alphas)
    assert len({r["loo_mse"] for r in summary.leaderboard}) == 32


@pytest.mark.slow                  # a VGG16 export: tens of seconds on a 2-core CPU
def test_a_ridge_head_exports_and_predicts(work, tmp_path):  # noqa: F811
    summary = train_head(work["cache"], tmp_path / "runs",
                         TrainConfig(head=("ridge",), alpha=(1.0,), val_fraction=0.25))
    run = summary.best_path
    path = tmp_path / "ridge.onnx" if _has_onnx() else tmp_path / "ridge.pt2"
    done = export(run, path, ExportConfig(format=path.suffix[1:]))
    assert done.parity["max_abs_diff"] <= done.parity["tolerance"]
    feats, paths, _ = _rows_and_crops(work["cache"])
    result = predict(path, paths, PredictConfig(top_k=3, workers=0, progress=False))
    expected = _head_logits(run, feats)
    assert np.abs(result.logits - expected.numpy()).max() <= done.parity["tolerance"]
    assert done.meta["head"]["kind"] == "ridge"


def _has_onnx() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def test_mixed_sweep_from_the_command_line(tmp_path):
    x, y = problem(200, 8, 3, seed=6)
    path = make_cache(tmp_path / "t.h5", x, y)
    result = CliRunner().invoke(main, [
        "train-head", str(path), "-o", str(tmp_path / "runs"), "--head", "linear,logreg,ridge",
        "--alpha", "0.1,1,10", "--C", "1", "--epochs", "2", "--json"])
    assert result.exit_code == 0, result.output
    board = json.loads(result.stdout)["leaderboard"]
    assert sorted(r["head"] for r in board) == ["linear", "logreg", "ridge", "ridge", "ridge"]
    assert sorted(r["alpha"] for r in board if r["head"] == "ridge") == [0.1, 1.0, 10.0]
    assert [r["rank"] for r in board] == [1, 2, 3, 4, 5]
    csv_text = (tmp_path / "runs" / "results.csv").read_text()
    assert ",alpha,shrinkage," in csv_text.splitlines()[0]


@pytest.mark.parametrize("args, words", [
    (["--head", "ridge", "--alpha", "0"], "--alpha 0.0: use a finite number > 0"),
    (["--head", "ridge", "--alpha", "1,nan"], "--alpha nan: use a finite number > 0"),
    (["--head", "ridge", "--alpha", "-1"], "--alpha -1.0: use a finite number > 0"),
    (["--head", "lda", "--shrinkage", "1.5"], "--shrinkage 1.5: use a finite number in [0, 1]"),
    (["--head", "ridge", "--class-weight", "balanced"], "drop --class-weight"),
])
def test_bad_settings_are_one_line(tmp_path, args, words):
    x, y = problem(60, 4, 3)
    path = make_cache(tmp_path / "t.h5", x, y)
    result = CliRunner().invoke(main, ["train-head", str(path), "-o", str(tmp_path / "r"), *args])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["ridge", "lda"])
def test_a_single_class_is_one_line_before_training(tmp_path, kind):
    x, _ = problem(40, 4, 2)
    path = make_cache(tmp_path / "one.h5", x, np.zeros(40, int), classes=["cat", "dog"])
    with pytest.raises(UserError, match=f"^{kind} needs training rows of at least two classes"):
        train_head(path, tmp_path / "runs", TrainConfig(head=("linear", kind)))
    assert not (tmp_path / "runs").exists()
