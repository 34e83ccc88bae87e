"""The records of `train_head`: run ids, each run's folder (head.pt, head.json, metrics.json),
the results.csv schema (written here, read back by the report), and the summary.

head.json's `data.val` says where a head's validation rows came from, as JSON that readers
match on `kind`: {"kind": "hash_split", "fraction": F} (the rows of the train cache whose path
hashes below F, `splits.validation_rows`), {"kind": "cache", "path": P} (every labeled row of
the cache P), or null (no validation data).

A runs folder holds every sweep written into it: results.csv and summary.json list the runs of
earlier sweeps too (a run trained again, with the same run id, replaces its old row), ranked
as one leaderboard. A sweep whose ranking would not compare with the folder's (validated on
other rows, or other classes) is refused before it trains. Every file is written under a
temporary name and renamed into place (`_files.write_file`), and the files read back are
checked (`read_results`, `read_metrics`, `read_summary`), a damaged one being one line.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cache import manifest as mf
from cache.errors import UserError
from cache.records import RECORD_KEY
from cache.manifest import COUNT, LIST, NUMBER, OBJECT, POSITIVE, STRING, STRINGS, Check, Fields, optional

from ._feature_splits import Context
from ._files import write_file, write_text
from ._output import fcntl, open_lock_file, own_plain_file
from ._sweep import Experiment
from ._version import __version__
from .config import CLOSED_FORM, HEADS
from .head_file import WRITE_FIX, save_head

# results.csv: one row per experiment, in leaderboard order. Empty cells are None.
CSV_COLUMNS = ("rank", "run_id", "head", "hidden", "activation", "optimizer", "lr", "weight_decay",
               "dropout", "label_smoothing", "seed", "C", "k", "temperature", "alpha", "shrinkage",
               "epochs_run", "best_epoch", "train_loss", "train_acc", "val_acc", "val_top5",
               "val_balanced_acc", "val_loss", "best_val_acc", "last_val_acc", "test_acc",
               "test_top5", "test_balanced_acc", "test_loss", "loo_acc", "loo_mse",
               "stopped_epoch", "path")
# The sweep axes among them, in the order TrainConfig lists them.
AXES = ("head", "hidden", "activation", "optimizer", "lr", "weight_decay", "dropout",
        "label_smoothing", "seed", "C", "k", "temperature", "alpha", "shrinkage")
TEXT_COLUMNS = ("run_id", "head", "hidden", "activation", "optimizer", "path")
INT_COLUMNS = ("rank", "seed", "k", "epochs_run", "best_epoch", "stopped_epoch")
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
    shared: dict | None = None     # one dict for the runs whose head.pt is the same (`save_head`)


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
    leaderboard: list              # results.csv rows as dicts, best first: every run of the
                                   # folder, this sweep's and those of earlier sweeps into it
    runs: int = 0                  # rows of the leaderboard
    warnings: list = field(default_factory=list)   # what makes the numbers mean less

    def to_json(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        earlier = (f" ({self.runs} runs in the folder with earlier sweeps)"
                   if self.runs > self.experiments else "")
        return (f"{plural(self.experiments, 'experiment')} in {plural(len(self.passes), 'pass')}"
                f"{earlier}, ranked "
                f"by {self.ranked_by}, {self.seconds:.1f} s. Results: {self.results_csv}"
                + "".join(f" WARNING: {w}" for w in self.warnings))


def plural(n: int, word: str) -> str:
    """`1 pass`, `2 passes`, `1 experiment`, `35 experiments`."""
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('s') else 's'}"


def run_label(e: Experiment) -> str:
    """The readable part of a run id: the head kind and its hyper-parameters."""
    if e.kind == "logreg":
        return f"logreg-C{e.C:g}"
    if e.kind == "knn":
        return f"knn-k{e.k}-T{e.temperature:g}"
    if e.kind == "ridge":
        return f"ridge-alpha{e.alpha:g}"
    if e.kind == "lda":
        return f"lda-shrinkage{e.shrinkage:g}"
    shape = "linear" if e.kind == "linear" else f"mlp{'x'.join(map(str, e.hidden))}-{e.activation}"
    return (f"{shape}-{e.optimizer}-lr{e.lr:g}-wd{e.weight_decay:g}-do{e.dropout:g}"
            f"-ls{e.label_smoothing:g}-s{e.seed}")


def standardized(kind: str, ctx: Context) -> bool:
    """Whether heads of this kind train on standardized features in this sweep."""
    if kind == "knn":   # L2-normalized instead, as DINO's k-NN evaluation
        return False
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
                  **{k: m.get(k) for k in (*mf.FEATURE_KEYS, "layer_alias", RECORD_KEY)}},
        "data": {"train_rows": len(ctx.train.rows),
                 "val_rows": len(ctx.val.rows) if ctx.val else 0,
                 "val": _val_source(ctx),
                 "data_seed": ctx.cfg.data_seed, "shuffle_window_chunks": ctx.window},
        "versions": {"pipeline": __version__, "torch": torch.__version__},
    }
    run_dir = runs_dir / run_id
    new = not run_dir.exists()
    try:
        save_head(run_dir, r.state, meta, shared=r.shared)
        write_text(run_dir / "metrics.json", json.dumps(
            {"run_id": run_id, "epochs": r.history, "best_epoch": r.best_epoch, **r.final},
            indent=2), WRITE_FIX)
    except BaseException:
        if new:   # a run folder is whole or absent: an earlier version's files stay as they are
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    last = r.history[-1] if r.history else {}
    train, val, test = (r.final.get(k) or {} for k in ("train", "val", "test"))
    return {
        "run_id": run_id, "head": e.kind, "hidden": "x".join(map(str, e.hidden or ())) or None,
        "activation": e.activation, "optimizer": e.optimizer, "lr": e.lr,
        "weight_decay": e.weight_decay, "dropout": e.dropout, "label_smoothing": e.label_smoothing,
        "seed": e.seed, "C": e.C, "k": e.k, "temperature": e.temperature, "alpha": e.alpha,
        "shrinkage": e.shrinkage, "epochs_run": len(r.history) or None, "best_epoch": r.best_epoch,
        # The clean evaluation on the training rows where there is one (logreg, ridge, lda, every
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
        # ridge: leave-one-out accuracy and squared error on the training rows (closed form)
        "loo_acc": r.extra.get("loo_acc"), "loo_mse": r.extra.get("loo_mse"),
        # --halving: the epoch after which this head stopped (None: it trained to the end)
        "stopped_epoch": r.extra.get("stopped_epoch"),
        "path": str(run_dir),
    }


def _run_id(e: Experiment, ctx: Context) -> str:
    """Readable hyper-parameters plus a short hash of everything else that shapes the run."""
    cfg = asdict(ctx.cfg)
    shared = {k: cfg[k] for k in ("epochs", "batch_size", "momentum", "schedule", "lr_step",
                                  "class_weight", "patience", "data_seed", "logreg_max_iter")}
    shared["standardize"] = standardized(e.kind, ctx)
    if ctx.cfg.halving and e.kind not in ("logreg", *CLOSED_FORM):   # (absent: older ids stay)
        shared["halving_rate"] = ctx.cfg.halving_rate
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


def summarize(rows: list[dict], earlier: list[dict], runs_dir: Path, ctx: Context, memory: dict,
              passes: list, seconds: float, warnings: list) -> TrainSummary:
    """This sweep's rows and the `earlier` rows of the folder (those not trained again) ranked
    as one leaderboard (setting their `rank`), and what the sweep did."""
    again = {r["run_id"] for r in rows}
    board = rows + [r for r in earlier if r["run_id"] not in again]
    ranked_by = rank(board, ctx.val is not None)
    held = sum(s.ram.nbytes for s in (ctx.train, ctx.val, ctx.test)
               if s is not None and s.ram is not None)
    memory["peak_feature_bytes"] = held + ctx.train.peak_group_bytes + (
        memory["chunk_bytes"] if memory["eval"] == "stream" else 0)
    return TrainSummary(
        runs_dir=str(runs_dir), results_csv=str(runs_dir / "results.csv"), experiments=len(rows),
        passes=passes, ranked_by=ranked_by, best_run=board[0]["run_id"],
        best_path=board[0]["path"], class_names=list(ctx.class_names),
        data=data_of(ctx.train, ctx.val, ctx.test),
        memory=memory, seconds=seconds, leaderboard=board, runs=len(board),
        warnings=list(warnings))


def rank(rows: list[dict], validated: bool) -> str:
    """Sort `rows` best first, setting their `rank`; return what they are ranked by. A missing
    or NaN value ranks last (a diverged head has NaN losses)."""
    def value(v, worst):
        return worst if v is None or v != v else v

    if validated:
        rows.sort(key=lambda r: (-value(r.get("val_acc"), -math.inf),
                                 value(r.get("val_loss"), math.inf), r["run_id"]))
        ranked_by = "validation accuracy"
    else:
        rows.sort(key=lambda r: (value(r.get("train_loss"), math.inf), r["run_id"]))
        ranked_by = ("log loss on the training rows, without dropout or label smoothing (no "
                     "validation data: give --val or --val-fraction)")
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return ranked_by


def data_of(train, val, test) -> dict:
    """role -> {"path" (resolved), "rows"} or None, of the splits a sweep trains, ranks and
    tests on."""
    return {role: {"path": str(s.reader.path.resolve()), "rows": len(s.rows)} if s else None
            for role, s in (("train", train), ("val", val), ("test", test))}


def earlier_runs(runs_dir: Path, data: dict, class_names: list[str]) -> list[dict]:
    """The rows of the sweeps already in `runs_dir` (none if it holds none), after checking
    that this sweep ranks on the same footing: the same classes, and the same validation rows
    (without validation, the same training rows). Called before training."""
    csv_path, summary_path = runs_dir / "results.csv", runs_dir / "summary.json"
    if not csv_path.exists():
        return []
    rows = read_results(csv_path)
    if not summary_path.is_file():
        raise UserError(f"{runs_dir} holds results.csv but no summary.json, so it cannot tell "
                        "what those runs were ranked on: write this sweep to another -o folder")
    old = read_summary(summary_path)
    other = f"write this sweep to another -o folder (or move {runs_dir} away)"
    if old["class_names"] != list(class_names):
        raise UserError(f"{runs_dir} holds a sweep over the classes {old['class_names']}, this "
                        f"one is over {list(class_names)}: one leaderboard cannot rank "
                        f"both: {other}")
    theirs = old["data"]
    if theirs.get("val") != data["val"] or (
            data["val"] is None and theirs.get("train") != data["train"]):
        raise UserError(f"{runs_dir} ranks its runs {_ranking(theirs)}, this sweep would rank "
                        f"its runs {_ranking(data)}: their numbers do not compare, so one "
                        f"leaderboard cannot rank both: {other}")
    return rows


@contextlib.contextmanager
def records_lock(runs_dir: Path):
    """Hold an exclusive flock on `.records.lock` in `runs_dir` while the leaderboard is read
    again, merged and written: two sweeps into one folder at the same time then both land,
    the later one ranking the earlier one's runs with its own. The kernel releases it however
    the holder ends; the holder removes the file before it unlocks, so a waiter that then gets
    the removed file tries again. (Where there is no flock, sweeps are not locked.)"""
    if fcntl is None:
        yield
        return
    path = runs_dir / ".records.lock"
    while True:
        try:
            fd = open_lock_file(path)
        except OSError as e:
            raise UserError(f"cannot lock the records of {runs_dir} ({path}: {e.strerror}): "
                            f"remove {path} if it is not a regular file, or {WRITE_FIX}") from None
        if not own_plain_file(os.fstat(fd)):
            os.close(fd)
            raise UserError(f"{path}, the lock file of the records of {runs_dir}, is not a "
                            "regular file of its own: remove it and re-run")
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()                     # before unlocking: see above
        os.close(fd)


def _ranking(data: dict) -> str:
    """How a sweep with these data (`data_of`) ranks its runs, in words."""
    if data.get("val") is None:
        train = data["train"]
        return (f"by the training loss on {train['path']} ({train['rows']} rows), having no "
                "validation data")
    return f"by validation accuracy on {data['val']['path']} ({data['val']['rows']} rows)"


def write_csv(path: Path, rows: list[dict]) -> None:
    """results.csv: CSV_COLUMNS, one row per experiment; None as an empty cell. Written under a
    temporary name and renamed, so a full disk leaves the previous results.csv."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r[k] for k in CSV_COLUMNS})
    write_file(path, lambda tmp: tmp.write_text(buf.getvalue(), encoding="utf-8", newline=""),
               WRITE_FIX)


def write_summary(path: Path, summary: TrainSummary) -> None:
    write_text(path, json.dumps(summary.to_json(), indent=2), WRITE_FIX)


def csv_value(key: str, text: str | None):
    """A results.csv cell read back as `write_csv` wrote it: None, text, int or float."""
    if text is None or text == "":
        return None
    if key in TEXT_COLUMNS:
        return text
    number = float(text)
    return int(number) if key in INT_COLUMNS else number


# ------------------------------------------------------------------------ reading them back

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")   # a plain folder name in RUNS_DIR
_REWRITE = "restore it from a copy, or run `pipeline train-head` into a new -o folder"


def read_results(path: Path) -> list[dict]:
    """results.csv as `write_csv` wrote it, checked: rows as dicts of None, text and numbers
    (unknown columns kept as text). A damaged table is one UserError naming the file, the line
    and the column."""
    f = Fields(path, "results table", _REWRITE)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        f.fail("the file", "UTF-8 text", f"{e.reason} at byte {e.start}")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or []
        for column in ("run_id", "head"):
            if column not in header:
                f.fail(f"column {column!r}", "in the header line", header)
        rows = []
        for raw in reader:
            line = reader.line_num
            if None in raw or None in raw.values():
                cells = sum(v is not None for v in raw.values()) + len(raw.get(None) or ())
                f.fail(f"line {line}", f"{len(header)} cells, one per column", cells)
            row = {}
            for key, cell in raw.items():
                if key not in CSV_COLUMNS:
                    row[key] = cell or None
                    continue
                try:
                    row[key] = csv_value(key, cell)
                except (ValueError, OverflowError):
                    f.fail(f"line {line}, column {key}",
                           "an integer" if key in INT_COLUMNS else "a number", cell)
            if not (row["run_id"] and _RUN_ID.fullmatch(row["run_id"])):
                f.fail(f"line {line}, column run_id", "a run folder name", row["run_id"])
            if row["head"] not in HEADS:
                f.fail(f"line {line}, column head", "one of " + ", ".join(HEADS), row["head"])
            rows.append(row)
    except csv.Error as e:
        f.fail("the file", "CSV", str(e))
    return rows


def read_metrics(path: Path, n_classes: int | None = None) -> dict:
    """A run's metrics.json, checked: `epochs` a list of {epoch, numbers}, and each of train,
    val, test absent, null or {top1, confusion_matrix (n_classes x n_classes counts), ...}."""
    f = Fields(path, "run metrics", "retrain that run with `pipeline train-head`, or delete "
                                    "its folder to leave it out of the report")
    try:
        text = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    data = f.load(text)
    f.may(data, "run_id", optional(STRING))
    f.may(data, "best_epoch", optional(COUNT))
    epochs = f.need(data, "epochs", LIST)
    values = optional(NUMBER)
    for i, e in enumerate(epochs):
        where = f"epochs[{i}]."
        if not isinstance(e, dict):
            f.fail(f"epochs[{i}]", "an object", e)
        f.need(e, "epoch", POSITIVE, where)
        for key in ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc"):
            f.may(e, key, values, where)
    c = n_classes
    square = Check(lambda v: isinstance(v, list) and (c is None or len(v) == c) and all(
        isinstance(row, list) and len(row) == len(v) and all(COUNT.ok(x) for x in row)
        for row in v), "a square list of lists of counts"
        + (f", {c} x {c} (the head's classes)" if c is not None else ""))
    for role in ("train", "val", "test"):
        m = f.may(data, role, optional(OBJECT))
        if m is not None:
            f.need(m, "top1", NUMBER, f"{role}.")
            for key in ("top5", "balanced_accuracy", "log_loss"):
                f.may(m, key, values, f"{role}.")
            f.need(m, "confusion_matrix", square, f"{role}.")
    return data


def read_summary(path: Path) -> dict:
    """A runs folder's summary.json, checked for what merging a sweep into it reads."""
    f = Fields(path, "sweep summary", _REWRITE)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    data = f.load(text)
    f.need(data, "class_names", STRINGS)
    roles = f.need(data, "data", OBJECT)
    f.need(roles, "train", OBJECT, "data.")
    for role in ("train", "val", "test"):
        d = f.may(roles, role, optional(OBJECT), "data.")
        if d is not None:
            f.need(d, "path", STRING, f"data.{role}.")
            f.need(d, "rows", COUNT, f"data.{role}.")
    return data
