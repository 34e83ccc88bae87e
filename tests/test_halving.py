"""train_head --halving: stopped heads keep their records, the survivors train as they would
without the stopped heads, and --halving without validation rows is one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import main
from pipeline._halving import rungs, survivors
from pipeline.config import TrainConfig
from pipeline.train_head import train_head

from ._caches import make_cache
from .test_train_head import blobs, heads_of

SHARED = dict(epochs=6, batch_size=16, val_fraction=0.25, weight_decay=(1e-3,))


@pytest.mark.parametrize("epochs, heads, rate, expected", [
    (20, 64, 0.5, [1, 2, 4, 8, 16]), (4, 64, 0.5, [1, 2]), (40, 8, 0.5, [5, 10, 20]),
    (6, 8, 0.75, [1, 2]), (10, 1, 0.5, []),
])
def test_rungs(epochs, heads, rate, expected):
    assert rungs(epochs, heads, rate) == expected


def test_survivors_drop_the_highest_validation_losses():
    assert survivors([0.3, 0.9, float("nan"), 0.1], 0.5) == [0, 3]
    assert survivors([0.3, 0.9, 0.2], 0.5) == [0, 2]
    assert survivors([0.5, 0.4], 0.99) == [1]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_stopped_heads_keep_records_and_survivors_train_as_without_them(tmp_path, optimizer):
    x, y = blobs(n=200, noise=2.0)
    path = make_cache(tmp_path / "t.h5", x, y)
    axes = dict(optimizer=(optimizer,), lr=(1e-3, 1e-2, 3e-2, 1e-1), dropout=(0.0, 0.3))
    summary = train_head(path, tmp_path / "h", TrainConfig(**axes, **SHARED, halving=True))
    board = {r["run_id"]: r for r in summary.leaderboard}
    assert len(board) == 8 and summary.passes == [8]
    stops = sorted(r["stopped_epoch"] or 0 for r in board.values())
    assert stops == [0, 1, 1, 1, 1, 2, 2, 4]        # rungs 1, 2, 4: 8 -> 4 -> 2 -> 1
    halved = heads_of(summary)
    for r in board.values():
        metrics = json.loads((Path(r["path"]) / "metrics.json").read_text())
        assert len(metrics["epochs"]) == r["epochs_run"] == (r["stopped_epoch"] or 6)
        meta = json.loads((Path(r["path"]) / "head.json").read_text())
        assert meta.get("stopped_epoch") == r["stopped_epoch"]
    # Every head, stopped or not, equals the same head trained alone for as many epochs.
    for r in board.values():
        alone = train_head(path, tmp_path / r["run_id"], TrainConfig(
            **{**SHARED, "epochs": r["epochs_run"]}, optimizer=(optimizer,), lr=(r["lr"],),
            dropout=(r["dropout"],)))
        (state,) = heads_of(alone).values()
        for name, t in state.items():
            torch.testing.assert_close(halved[r["run_id"]][name], t, rtol=1e-4, atol=1e-5)
        assert alone.leaderboard[0]["val_loss"] == pytest.approx(r["val_loss"], rel=1e-4)


def test_halving_needs_validation_rows(tmp_path):
    path = make_cache(tmp_path / "t.h5", *blobs(n=60))
    result = CliRunner().invoke(main, ["train-head", str(path), "-o", str(tmp_path / "r"),
                                       "--halving", "--val-fraction", "0"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: --halving needs validation rows to rank the heads by: give --val "
                      "or --val-fraction > 0"]
    assert not (tmp_path / "r").exists()
