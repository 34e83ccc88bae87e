"""The records of `train_head`: run ids, each run's folder (head.pt, head.json, metrics.json),
the results.csv schema (written here, read back by the report), and the summary.

head.json's `data.val` says where a head's validation rows came from, as JSON that readers
match on `kind`: {"kind": "hash_split", "fraction": F} (the rows of the train cache whose path
hashes below F, `splits.validation_rows`), {"kind": "cache", "path": P} (every labeled row of
the cache P), or null (no validation data).
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cache import manifest as mf

from ._feature_splits import Context
from ._sweep import Experiment
from ._version import __version__
from .heads import save_head

# results.csv: one row per experiment, in leaderboard order. Empty cells are None.
CSV_COLUMNS = ("rank", "run_id", "head", "hidden", "activation", "optimizer", "lr", "weight_decay",
               "dropout", "label_smoothing", "seed", "C", "epochs_run", "best_epoch", "train_loss",
               "train_acc", "val_acc", "val_top5", "val_balanced_acc", "val_loss", "best_val_acc",
               "last_val_acc", "test_acc", "test_top5", "test_balanced_acc", "test_loss", "path")
# The sweep axes among them, in the order TrainConfig lists them.
AXES = ("head", "hidden", "activation", "optimizer", "lr", "weight_decay", "dropout",
        "label_smoothing", "seed", "C")
TEXT_COLUMNS = ("run_id", "head", "hidden", "activation", "optimizer", "path")
INT_COLUMNS = ("rank", "seed", "epochs_run", "best_epoch")
VAL_HASH_SPLIT, VAL_CACHE = "hash_split", "cache"        # head.json data.val kinds


@dataclass
class Result:
    """One trained head, before it is written."""
    experiment: Experiment
    state: dict                    # head state_dict, taking raw features
    history: list                  # per-epoch dicts
    best_epoch: int | None
    final: dict                    # role ("train", "val", "test") -> metrics, where measured
    extra: dict                    # kind-specific facts for the metadata


@dataclass
class TrainSummary:
    """What `train_head()` did; `to_json()` is summary.json (and `train-head --json`)."""
    runs_dir: str
    results_csv: str
    experiments: int
    passes: list                   # heads per pass, in training order
    ranked_by: str
    best_run: str
    best_path: str                 # the best run's folder (for `export`)
    class_names: list
    data: dict                     # role -> {"path", "rows"} or None
    memory: dict                   # the memory plan and the peak of features held
    seconds: float
    leaderboard: list              # results.csv rows as dicts, best first

    def to_json(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (f"{self.experiments} experiments in {len(self.passes)} passes, ranked by "
                f"{self.ranked_by}, {self.seconds:.1f} s. Results: {self.results_csv}")


def run_label(e: Experiment) -> str:
    """The readable part of a run id: the head kind and its hyper-parameters."""
    if e.kind == "logreg":
        return f"logreg-C{e.C:g}"
    shape = "linear" if e.kind == "linear" else f"mlp{'x'.join(map(str, e.hidden))}-{e.activation}"
    return (f"{shape}-{e.optimizer}-lr{e.lr:g}-wd{e.weight_decay:g}-do{e.dropout:g}"
            f"-ls{e.label_smoothing:g}-s{e.seed}")


def standardized(kind: str, ctx: Context) -> bool:
    """Whether heads of this kind train on standardized features in this sweep."""
    return ctx.cfg.logreg_standardize if kind == "logreg" else ctx.cfg.standardize


def record(runs_dir: Path, r: Result, ctx: Context) -> dict:
    """Write one run's folder; return its results.csv row."""
    e, m = r.experiment, ctx.train.reader.manifest
    run_id = _run_id(e, ctx)
    meta = {
        "run_id": run_id, "kind": e.kind, "in_dim": ctx.train.reader.feature_dim,
        "n_classes": len(ctx.class_names), "hidden": list(e.hidden or ()),
        "activation": e.activation, "input": "raw cached features, float32",
        "standardization": ({"statistics": "per-feature mean and std of the training rows",
                             "rows": len(ctx.train.rows), "folded_into_first_layer": True}
                            if standardized(e.kind, ctx) else None),
        "class_names": list(ctx.class_names), "hyperparameters": e.params(),
        "config": asdict(ctx.cfg), "best_epoch": r.best_epoch,
        "weights_epoch": r.best_epoch if ctx.cfg.patience else (len(r.history) or None), **r.extra,
        "cache": {"path": str(ctx.train.reader.path.resolve()),
                  "fingerprint": mf.feature_fingerprint(m),
                  **{k: m.get(k) for k in (*mf.FEATURE_KEYS, "layer_alias")}},
        "data": {"train_rows": len(ctx.train.rows),
                 "val_rows": len(ctx.val.rows) if ctx.val else 0,
                 "val": _val_source(ctx),
                 "data_seed": ctx.cfg.data_seed, "shuffle_window_chunks": ctx.window},
        "versions": {"pipeline": __version__, "torch": torch.__version__},
    }
    run_dir = save_head(runs_dir / run_id, r.state, meta)
    (run_dir / "metrics.json").write_text(json.dumps(
        {"run_id": run_id, "epochs": r.history, "best_epoch": r.best_epoch, **r.final}, indent=2))
    last = r.history[-1] if r.history else {}
    train, val, test = (r.final.get(k) or {} for k in ("train", "val", "test"))
    return {
        "run_id": run_id, "head": e.kind, "hidden": "x".join(map(str, e.hidden or ())) or None,
        "activation": e.activation, "optimizer": e.optimizer, "lr": e.lr,
        "weight_decay": e.weight_decay, "dropout": e.dropout, "label_smoothing": e.label_smoothing,
        "seed": e.seed, "C": e.C, "epochs_run": len(r.history) or None, "best_epoch": r.best_epoch,
        # The clean evaluation on the training rows where there is one (logreg always, every
        # head without validation data), else the last epoch's running values (dropout and
        # label smoothing included).
        "train_loss": train.get("log_loss", last.get("train_loss")),
        "train_acc": train.get("top1", last.get("train_acc")),
        "val_acc": val.get("top1"), "val_top5": val.get("top5"),
        "val_balanced_acc": val.get("balanced_accuracy"), "val_loss": val.get("log_loss"),
        "best_val_acc": max((h["val_acc"] for h in r.history if "val_acc" in h),
                            default=val.get("top1")),
        "last_val_acc": last.get("val_acc", val.get("top1")),
        "test_acc": test.get("top1"), "test_top5": test.get("top5"),
        "test_balanced_acc": test.get("balanced_accuracy"), "test_loss": test.get("log_loss"),
        "path": str(run_dir),
    }


def _run_id(e: Experiment, ctx: Context) -> str:
    """Readable hyper-parameters plus a short hash of everything else that shapes the run."""
    cfg = asdict(ctx.cfg)
    shared = {k: cfg[k] for k in ("epochs", "batch_size", "momentum", "schedule", "lr_step",
                                  "class_weight", "patience", "data_seed", "logreg_max_iter")}
    shared["standardize"] = standardized(e.kind, ctx)
    key = {"experiment": e.params(), "shared": shared, "window": ctx.window,
           "train": [mf.feature_fingerprint(ctx.train.reader.manifest), len(ctx.train.rows)],
           "val": len(ctx.val.rows) if ctx.val else 0}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:6]
    return f"{run_label(e)}-{digest}"


def _val_source(ctx: Context) -> dict | None:
    if ctx.val is None:
        return None
    if ctx.val.reader is ctx.train.reader:
        return {"kind": VAL_HASH_SPLIT, "fraction": ctx.cfg.val_fraction}
    return {"kind": VAL_CACHE, "path": str(ctx.val.reader.path.resolve())}


def summarize(rows: list[dict], runs_dir: Path, ctx: Context, memory: dict, passes: list,
              seconds: float) -> TrainSummary:
    """Rank the rows (setting their `rank`) and gather what the sweep did."""
    if ctx.val is not None:
        rows.sort(key=lambda r: (-r["val_acc"], r["val_loss"], r["run_id"]))
        ranked_by = "validation accuracy"
    else:
        rows.sort(key=lambda r: (r["train_loss"], r["run_id"]))
        ranked_by = ("log loss on the training rows, without dropout or label smoothing (no "
                     "validation data: give --val or --val-fraction)")
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    held = sum(s.ram.nbytes for s in (ctx.train, ctx.val, ctx.test)
               if s is not None and s.ram is not None)
    memory["peak_feature_bytes"] = held + ctx.train.peak_group_bytes + (
        memory["chunk_bytes"] if memory["eval"] == "stream" else 0)
    return TrainSummary(
        runs_dir=str(runs_dir), results_csv=str(runs_dir / "results.csv"), experiments=len(rows),
        passes=passes, ranked_by=ranked_by, best_run=rows[0]["run_id"],
        best_path=rows[0]["path"], class_names=list(ctx.class_names),
        data={role: {"path": str(s.reader.path), "rows": len(s.rows)} if s else None
              for role, s in (("train", ctx.train), ("val", ctx.val), ("test", ctx.test))},
        memory=memory, seconds=seconds, leaderboard=rows)


def write_csv(path: Path, rows: list[dict]) -> None:
    """results.csv: CSV_COLUMNS, one row per experiment; None as an empty cell."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in CSV_COLUMNS})


def csv_value(key: str, text: str | None):
    """A results.csv cell read back as `write_csv` wrote it: None, text, int or float."""
    if text is None or text == "":
        return None
    if key in TEXT_COLUMNS:
        return text
    number = float(text)
    return int(number) if key in INT_COLUMNS else number
