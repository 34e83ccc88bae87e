"""The one leaderboard table behind train-head's printout, report.md and the demo."""
from __future__ import annotations

from pipeline.leaderboard import table

ROWS = [{"rank": 1, "run_id": "linear-a", "head": "linear", "val_acc": 0.5, "val_loss": 1.23456,
         "test_acc": None, "epochs_run": 3},
        {"rank": 2, "run_id": "mlp-bbbbbb", "head": "mlp", "val_acc": 0.25, "val_loss": 2.0,
         "test_acc": None, "epochs_run": 12}]


def test_text_columns_aligned_empty_ones_dropped_and_the_rest_counted():
    lines = table(ROWS, ("rank", "run_id", "val_acc", "test_acc", "epochs_run"), limit=1,
                  more="runs/results.csv", indent="  ")
    assert lines == ["  #  run       val acc  epochs",
                     "  1  linear-a   0.5000       3",
                     "  ... 1 more in runs/results.csv"]


def test_markdown():
    assert table(ROWS, ("rank", "run_id", "head", "val_loss"), markdown=True) == [
        "| # | run | head | val loss |",
        "|---:|---|---|---:|",
        "| 1 | `linear-a` | linear | 1.2346 |",
        "| 2 | `mlp-bbbbbb` | mlp | 2.0000 |"]
