"""`train_head()`: a sweep of head experiments on cached features, one CPU pass per head shape.

    from pipeline.config import TrainConfig
    from pipeline.train_head import train_head
    summary = train_head("train.h5", "runs/", TrainConfig(lr=(1e-3, 1e-2), seed=(0, 1, 2)))
    summary["best_run"]      # "linear-adamw-lr0.01-wd0-do0-ls0-s1-3fa2c1"

The experiments are the cartesian product of the config's tuple fields. Heads of one shape and
optimizer (all linear AdamW heads, all 1024-unit ReLU MLPs with SGD, ...) train together as one
`HeadStack`: each batch is read once and feeds every head through one matmul. logreg heads are
scikit-learn fits, saved as the linear layer they are.

Batch order and dropout noise come from `data_seed` and are shared by every head of a pass; a
head's `seed` sets only its init. So a head trained in a sweep equals the same head trained
alone (up to float rounding in the shared matmul). A pass holds as many heads as fit their
parameters and optimizer state in a quarter of `max_memory`; more take more passes.

With the training rows in RAM and the default shuffle window, epoch e visits them in the order
of the e-th `torch.randperm(n, generator=torch.Generator().manual_seed(data_seed))` (one
generator for the whole run); with a window of W chunks (`shuffle_chunks`, or streaming),
the chunks holding training rows are shuffled, and the rows of each W consecutive chunks are
shuffled together. RAM and streaming follow the same order for the same window.

Records, under RUNS_DIR: <run-id>/head.pt + head.json (load with `heads.load_head`),
<run-id>/metrics.json (per-epoch train/val loss and accuracy, final metrics), results.csv
(one row per experiment, leaderboard order) and summary.json (what this function returns).
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cache import manifest as mf
from cache.errors import UserError
from cache.store import CacheReader

from ._version import __version__
from .config import TrainConfig
from .heads import (
    ACTIVATIONS,
    OPTIMIZERS,
    HeadStack,
    StackedOptimizer,
    evaluate,
    fit_logreg,
    save_head,
    standard_scaler,
)
from .splits import hash_split

log = logging.getLogger(__name__)

HEADS = ("linear", "mlp", "logreg")
SCHEDULES = ("constant", "cosine", "step")
# What must agree between train, val and test caches: everything that decides a feature row
# except its storage dtype (a float16 train cache with a float32 val cache is fine).
MATCH_KEYS = tuple(k for k in mf.FEATURE_KEYS if k != "dtype") + ("class_names",)
_EVAL_ROWS = 1024
_CSV_COLUMNS = ("rank", "run_id", "head", "hidden", "activation", "optimizer", "lr", "weight_decay",
                "dropout", "label_smoothing", "seed", "C", "epochs_run", "best_epoch", "train_loss",
                "train_acc", "val_acc", "val_top5", "val_balanced_acc", "val_loss", "best_val_acc",
                "last_val_acc", "test_acc", "test_top5", "test_balanced_acc", "test_loss", "path")


def train_head(train_path: str | Path, runs_dir: str | Path, config: TrainConfig = TrainConfig(),
               val_path: str | Path | None = None, test_path: str | Path | None = None) -> dict:
    """Train every experiment of `config` on the cache `train_path`; record them in `runs_dir`.

    Validation: the cache `val_path`, else the rows of `train_path` whose path hashes below
    `config.val_fraction`. Returns a JSON-able summary: `leaderboard` (rows of results.csv,
    best first, ranked by validation accuracy), `best_run`, `best_path`, data and memory use.
    Raises UserError for user mistakes: mismatching or incomplete caches, bad settings,
    NaN/inf features.
    """
    t0 = time.perf_counter()
    _check_config(config, has_val=val_path is not None)
    experiments = _experiments(config)
    runs_dir = Path(runs_dir)
    readers: list[CacheReader] = []
    try:
        train, val, test = _open_splits(train_path, val_path, test_path, config, readers)
        memory = _plan_memory(train, [s for s in (val, test) if s is not None], config)
        names = train.reader.class_names
        context = _Context(config, train, val, test, names, memory["window_chunks"],
                           _class_weights(train.labels, len(names), config.class_weight))
        runs_dir.mkdir(parents=True, exist_ok=True)
        passes = _passes(experiments, train.reader.feature_dim, len(names), config)
        log.info("%d experiments in %d passes over %d training rows (%s), validation: %s",
                 len(experiments), len(passes), len(train.rows), memory["train"],
                 f"{len(val.rows)} rows" if val else "none")
        rows = []
        for i, group in enumerate(passes, 1):
            results = (_fit_logreg(group, context) if group[0].kind == "logreg"
                       else _train_pass(group, context, f"pass {i}/{len(passes)}"))
            rows += [_record(runs_dir, r, context) for r in results]
        memory["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        summary = _summarize(rows, runs_dir, context, memory, time.perf_counter() - t0)
        summary["passes"] = [len(group) for group in passes]
    finally:
        for r in readers:
            r.close()
    _write_csv(runs_dir / "results.csv", summary["leaderboard"])
    (runs_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("best: %s (%s)", summary["best_run"], summary["ranked_by"])
    return summary


# ---------------------------------------------------------------------------------- the sweep

@dataclass(frozen=True)
class _Experiment:
    """One head to train; fields a head kind does not use are None."""
    kind: str
    hidden: tuple[int, ...] | None = None
    activation: str | None = None
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    dropout: float | None = None
    label_smoothing: float | None = None
    seed: int | None = None
    C: float | None = None

    def params(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden) if self.hidden is not None else None
        return d


def _experiments(cfg: TrainConfig) -> list[_Experiment]:
    torch_axes = list(itertools.product(cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.dropout,
                                        cfg.label_smoothing, cfg.seed))
    out: list[_Experiment] = []
    for kind in cfg.head:
        if kind == "logreg":
            out += [_Experiment("logreg", C=float(c)) for c in cfg.C]
            continue
        shapes = [((), None)] if kind == "linear" else itertools.product(cfg.hidden, cfg.activation)
        for (hidden, act), (opt, lr, wd, do, ls, seed) in itertools.product(shapes, torch_axes):
            out.append(_Experiment(kind, tuple(int(h) for h in hidden), act, opt, float(lr),
                                   float(wd), float(do), float(ls), int(seed)))
    return list(dict.fromkeys(out))      # repeated values in a list make one experiment


def _check_config(cfg: TrainConfig, has_val: bool) -> None:
    def bad(what: str, fix: str):
        raise UserError(f"{what}: {fix}")

    for name, allowed in (("head", HEADS), ("optimizer", OPTIMIZERS), ("activation", ACTIVATIONS)):
        if not getattr(cfg, name):
            bad(f"--{name} is empty", "give at least one value")
        for v in getattr(cfg, name):
            if v not in allowed:
                bad(f"unknown --{name} {v!r}", f"choose from {', '.join(allowed)}")
    positive, fraction = (lambda v: v > 0, "> 0"), (lambda v: 0 <= v < 1, "in [0, 1)")
    rules = {"lr": positive, "C": positive, "weight_decay": (lambda v: v >= 0, ">= 0"),
             "dropout": fraction, "label_smoothing": fraction}
    for name, (ok, text) in rules.items():
        for v in getattr(cfg, name):
            if not ok(v):
                bad(f"--{name.replace('_', '-')} {v}", f"use values {text}")
    if "mlp" in cfg.head and (not cfg.hidden or any(not h or min(h) < 1 for h in cfg.hidden)):
        bad(f"--hidden {cfg.hidden}", "give layer sizes >= 1, e.g. 512 or 1024x256")
    if cfg.schedule not in SCHEDULES:
        bad(f"unknown --schedule {cfg.schedule!r}", f"choose from {', '.join(SCHEDULES)}")
    if cfg.class_weight not in ("none", "balanced"):
        bad(f"unknown --class-weight {cfg.class_weight!r}", "use none or balanced")
    for name in ("epochs", "batch_size", "max_memory", "logreg_max_iter"):
        if getattr(cfg, name) < 1:
            bad(f"--{name.replace('_', '-')} {getattr(cfg, name)}", "use a value >= 1")
    for name in ("patience", "shuffle_chunks", "lr_step"):
        if getattr(cfg, name) < 0:
            bad(f"--{name.replace('_', '-')} {getattr(cfg, name)}", "use a value >= 0")
    if not 0 <= cfg.val_fraction < 1:
        bad(f"--val-fraction {cfg.val_fraction}", "use a fraction in [0, 1)")
    if cfg.patience and not (has_val or cfg.val_fraction > 0):
        bad("--patience (early stopping) needs validation data", "give --val or --val-fraction > 0")


def _passes(experiments: list[_Experiment], dim: int, n_classes: int, cfg: TrainConfig
            ) -> list[list[_Experiment]]:
    """Experiments grouped by what must be shared in one pass (kind, shape, optimizer), split so
    that a pass's parameters and optimizer state stay under a quarter of --max-memory."""
    groups: dict[tuple, list[_Experiment]] = {}
    for e in experiments:
        groups.setdefault((e.kind, e.hidden, e.activation, e.optimizer), []).append(e)
    out = []
    for (kind, hidden, _, _), group in groups.items():
        if kind == "logreg":
            out.append(group)
            continue
        dims = [dim, *hidden, n_classes]
        # float32 parameters, gradients and two optimizer states per head
        head_bytes = 4 * 4 * sum((i + 1) * o for i, o in zip(dims[:-1], dims[1:]))
        size = max(1, cfg.max_memory // 4 // head_bytes)
        group = sorted(group, key=lambda e: e.dropout)   # equal dropout: one masked input each
        out += [group[i:i + size] for i in range(0, len(group), size)]
    return out


# ------------------------------------------------------------------------------------- data

class _Split:
    """The rows of one cache used for one role (train, val or test), in RAM or streamed."""

    def __init__(self, role: str, reader: CacheReader, rows: np.ndarray):
        self.role, self.reader = role, reader
        self.rows = rows                                           # (N,) sorted file rows
        self.labels = reader.labels[rows]                          # (N,)
        self.ram: np.ndarray | None = None                         # (N, D) storage dtype
        self.peak_group_bytes = 0
        self._checked: set[int] = set()                            # chunks checked for NaN/inf
        step = reader.chunk_rows
        self.chunks = np.unique(rows // step)                      # chunks holding these rows
        chunk_of = rows // step
        self._span = dict(zip(self.chunks.tolist(),
                              zip(np.searchsorted(chunk_of, self.chunks).tolist(),
                                  np.searchsorted(chunk_of, self.chunks, "right").tolist())))

    @property
    def nbytes(self) -> int:
        return len(self.rows) * self.reader.feature_dim * self.reader.features.dtype.itemsize

    def load(self) -> None:
        """Hold this split's features in RAM (storage dtype; upcast per batch)."""
        self.ram = np.empty((len(self.rows), self.reader.feature_dim), self.reader.features.dtype)
        for s, e, block in self._read(self.chunks):
            self.ram[s:e] = block

    def _read(self, chunks) -> Iterator[tuple[int, int, np.ndarray]]:
        """(s, e, features of rows[s:e]) for each chunk, in the order given; refuses NaN/inf
        (checked once per chunk and run, not every epoch)."""
        for start, _, block in self.reader.iter_chunks(order=chunks):
            chunk = start // self.reader.chunk_rows
            s, e = self._span[chunk]
            if e - s != len(block):                    # only some rows of this chunk are ours
                block = block[self.rows[s:e] - start]
            if chunk not in self._checked:
                self._check_finite(block, s)
                self._checked.add(chunk)
            yield s, e, block

    def _check_finite(self, block: np.ndarray, s: int) -> None:
        if block.dtype == np.float16:   # exponent bits all ones: inf or NaN (2.7x np.isfinite)
            finite = ~((block.view(np.uint16) & 0x7C00) == 0x7C00).any(axis=1)
        else:
            finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            row = int(self.rows[s + int(np.argmin(finite))])
            raise UserError(f"{self.role} cache {self.reader.path} has NaN or inf features "
                             f"(row {row}, {self.reader.paths[row]}): re-extract it, e.g. "
                             "with --precision float32")

    def epoch(self, gen: torch.Generator, window: int, batch: int
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches (x (B, D) float32, y (B,)) of one epoch in the shuffled order."""
        pieces = self._ram_pieces if self.ram is not None else self._stream_pieces
        return _rebatch(pieces(_epoch_order(self, gen, window), batch), batch)

    def _ram_pieces(self, order, batch):
        for _, base, perm in order:
            for i in range(0, len(perm), batch):
                pos = base[perm[i:i + batch]]
                yield self.ram[pos], self.labels[pos]

    def _stream_pieces(self, order, batch):
        # One window buffer for the whole epoch: a new one per group kept two alive at once.
        size = max(len(base) for _, base, _ in order)
        window = np.empty((size, self.reader.feature_dim), self.reader.features.dtype)
        for chunks, base, perm in order:
            group = window[:len(base)]
            self.peak_group_bytes = max(self.peak_group_bytes, group.nbytes)
            off = 0
            for s, e, block in self._read(chunks):   # same chunk order as `base`
                group[off:off + e - s] = block
                off += e - s
            for i in range(0, len(perm), batch):
                p = perm[i:i + batch]
                yield group[p], self.labels[base[p]]

    def batches(self, batch: int = _EVAL_ROWS) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All rows in file order (for evaluation), streamed one chunk at a time if not in RAM."""
        if self.ram is not None:
            pieces = ((self.ram[i:i + batch], self.labels[i:i + batch])
                      for i in range(0, len(self.rows), batch))
        else:
            pieces = ((block, self.labels[s:e]) for s, e, block in self._read(self.chunks))
        return _rebatch(pieces, batch)


def _epoch_order(split: _Split, gen: torch.Generator, window: int):
    """[(chunks, base, perm)]: the epoch visits positions base[perm] group by group."""
    n = len(split.rows)
    if window >= len(split.chunks):
        return [(split.chunks, np.arange(n), torch.randperm(n, generator=gen).numpy())]
    chunks = split.chunks[torch.randperm(len(split.chunks), generator=gen).numpy()]
    order = []
    for i in range(0, len(chunks), window):
        group = chunks[i:i + window]
        base = np.concatenate([np.arange(*split._span[c]) for c in group.tolist()])
        order.append((group, base, torch.randperm(len(base), generator=gen).numpy()))
    return order


def _rebatch(pieces, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive batches of exactly `batch` rows (the last may be short), upcast to float32."""
    xs, ys, have = [], [], 0
    for x, y in pieces:
        while len(x):
            take = min(batch - have, len(x))
            xs.append(x[:take]), ys.append(y[:take])
            x, y, have = x[take:], y[take:], have + take
            if have == batch:
                yield _tensors(xs, ys)
                xs, ys, have = [], [], 0
    if have:
        yield _tensors(xs, ys)


def _tensors(xs, ys) -> tuple[torch.Tensor, torch.Tensor]:
    x = xs[0] if len(xs) == 1 else np.concatenate(xs)
    y = ys[0] if len(ys) == 1 else np.concatenate(ys)
    x = torch.from_numpy(np.ascontiguousarray(x)).float()          # float16 caches: upcast here
    return x, torch.from_numpy(np.asarray(y, np.int64))


def _open_splits(train_path, val_path, test_path, cfg: TrainConfig, readers: list):
    def open_cache(path, role):
        reader = CacheReader(path, allow_incomplete=True)
        readers.append(reader)
        if not reader.complete and not cfg.allow_incomplete:
            raise UserError(f"{role} cache {path} is incomplete (extraction did not finish, "
                             f"{reader.n_rows} rows committed): re-run the same `pipeline extract` "
                             "command to finish it, or pass --allow-incomplete to use those rows")
        if not reader.class_names:
            raise UserError(f"{role} cache {path} has no class names: train-head needs labeled "
                             "images (a folder per class, or a list file with labels)")
        return reader

    def labeled(reader, role):
        labels = reader.labels
        if (labels >= len(reader.class_names)).any():
            raise UserError(f"{role} cache {reader.path} has labels beyond its "
                             f"{len(reader.class_names)} class names: the cache is damaged, "
                             "re-extract it")
        unlabeled = int((labels < 0).sum())
        if unlabeled:
            log.warning("%s cache %s: %d unlabeled rows ignored", role, reader.path, unlabeled)
        return labels >= 0

    train_reader = open_cache(train_path, "train")
    keep = labeled(train_reader, "train")
    val = test = None
    if val_path is None and cfg.val_fraction > 0:
        in_val = hash_split(train_reader.paths, cfg.val_fraction)
        val = _Split("val", train_reader, np.flatnonzero(keep & in_val))
        if not len(val.rows):
            raise UserError(f"--val-fraction {cfg.val_fraction} of {int(keep.sum())} labeled rows "
                             "selected no validation rows: give --val VAL.h5 or a larger fraction")
        keep &= ~in_val
    for path, role in ((val_path, "val"), (test_path, "test")):
        if path is None:
            continue
        reader = open_cache(path, role)
        diff = mf.differences(train_reader.manifest, reader.manifest, MATCH_KEYS)
        if diff:
            raise UserError(
                f"{role} cache {path} does not match the train cache {train_path}: "
                + "; ".join(diff) + ". Extract both with the same --backbone, --weights, --layer, "
                "--image-size and --precision, from data with the same classes")
        split = _Split(role, reader, np.flatnonzero(labeled(reader, role)))
        if not len(split.rows):
            raise UserError(f"{role} cache {path} has no labeled rows")
        val, test = (split, test) if role == "val" else (val, split)
    train = _Split("train", train_reader, np.flatnonzero(keep))
    if not len(train.rows):
        raise UserError(f"train cache {train_path} has no labeled rows left to train on")
    return train, val, test


def _plan_memory(train: _Split, evals: list[_Split], cfg: TrainConfig) -> dict:
    """Load what fits under --max-memory into RAM; stream the rest. Returns the plan."""
    reader = train.reader
    chunk_bytes = reader.chunk_rows * reader.feature_dim * reader.features.dtype.itemsize
    if train.nbytes <= cfg.max_memory:
        train.load()
        used, window = train.nbytes, cfg.shuffle_chunks or len(train.chunks)
    else:
        # Stream: a window of chunks for training plus one chunk for streamed evaluation.
        window = cfg.shuffle_chunks or cfg.max_memory // chunk_bytes - 1
        if window < 1 or (window + 1) * chunk_bytes > cfg.max_memory:
            raise UserError(_window_error(cfg, chunk_bytes))
        used = window * chunk_bytes
        if "logreg" in cfg.head:
            raise UserError(f"logreg heads need the training features in RAM "
                             f"({_size(train.nbytes)}, more than --max-memory "
                             f"{_size(cfg.max_memory)}): raise --max-memory or train linear heads")
    streamed = False
    for split in evals:
        if train.ram is not None and used + split.nbytes <= cfg.max_memory:
            split.load()
            used += split.nbytes
        else:
            streamed = True
    return {"max_memory": cfg.max_memory, "train": "ram" if train.ram is not None else "stream",
            "eval": "stream" if streamed else "ram",
            "window_chunks": int(min(window, len(train.chunks))), "chunk_bytes": chunk_bytes,
            "planned_feature_bytes": used + (chunk_bytes if streamed else 0)}


def _window_error(cfg: TrainConfig, chunk_bytes: int) -> str:
    need = max(cfg.shuffle_chunks, 1) + 1
    return (f"--max-memory {_size(cfg.max_memory)} does not hold {need} HDF5 chunks of "
            f"{_size(chunk_bytes)} (a shuffle window of {need - 1} and one for evaluation): "
            f"raise --max-memory to at least {_size(need * chunk_bytes)} or lower --shuffle-chunks")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _class_weights(labels: np.ndarray, n_classes: int, mode: str) -> torch.Tensor | None:
    """scikit-learn's 'balanced': n / (classes present * count); absent classes weigh 0."""
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.divide(len(labels), (counts > 0).sum() * counts, out=np.zeros(n_classes),
                  where=counts > 0)
    return torch.tensor(w, dtype=torch.float32)


# ---------------------------------------------------------------------------------- training

@dataclass
class _Context:
    cfg: TrainConfig
    train: _Split
    val: _Split | None
    test: _Split | None
    class_names: list[str]
    window: int
    class_weight: torch.Tensor | None


@dataclass
class _Result:
    experiment: _Experiment
    state: dict                    # head state_dict
    history: list                  # per-epoch dicts
    best_epoch: int | None
    final: dict                    # {"train": {...}, "val": metrics, "test": metrics}
    extra: dict                    # kind-specific facts for the metadata


def _train_pass(group: list[_Experiment], ctx: _Context, label: str) -> list[_Result]:
    """Train the heads of one shape and optimizer together, one batch read for all."""
    cfg, first, k = ctx.cfg, group[0], len(group)
    stack = HeadStack(ctx.train.reader.feature_dim, len(ctx.class_names), [e.seed for e in group],
                      [e.dropout for e in group], first.hidden, first.activation or "relu")
    opt = StackedOptimizer(stack.params, first.optimizer, [e.lr for e in group],
                           [e.weight_decay for e in group], momentum=cfg.momentum)
    smoothing = torch.tensor([e.label_smoothing for e in group])
    order_gen = torch.Generator().manual_seed(cfg.data_seed)
    noise_gen = torch.Generator().manual_seed(_derived_seed(cfg.data_seed, "dropout"))
    steps = math.ceil(len(ctx.train.rows) / cfg.batch_size)
    active = torch.ones(k, dtype=torch.bool)
    best_params = [p.detach().clone() for p in stack.params]
    best = [(-1.0, math.inf, 0)] * k                                   # (acc, loss, epoch)
    history: list[list[dict]] = [[] for _ in group]
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        loss_sum, correct = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.long)
        for x, y in ctx.train.epoch(order_gen, ctx.window, cfg.batch_size):
            scale = _lr_scale(cfg, step, steps * cfg.epochs, epoch)
            logits = stack.forward(x, noise=noise_gen)                  # (B, K, C)
            losses = stack.losses(logits, y, smoothing, ctx.class_weight)
            losses.sum().backward()
            opt.step(scale, None if bool(active.all()) else active)
            loss_sum += losses.detach().double() * len(y)
            correct += (logits.detach().argmax(-1) == y[:, None]).sum(0)
            step += 1
        n = len(ctx.train.rows)
        ev = evaluate(stack, ctx.val.batches(), ctx.class_names) if ctx.val else None
        for h in active.nonzero().flatten().tolist():
            row = {"epoch": epoch, "lr": group[h].lr * scale, "train_loss": loss_sum[h].item() / n,
                   "train_acc": correct[h].item() / n}
            if ev:
                row.update(val_loss=ev[h]["log_loss"], val_acc=ev[h]["top1"],
                           val_balanced_acc=ev[h]["balanced_accuracy"])
                if (ev[h]["top1"], -ev[h]["log_loss"]) > (best[h][0], -best[h][1]):
                    best[h] = (ev[h]["top1"], ev[h]["log_loss"], epoch)
                    with torch.no_grad():
                        for b, p in zip(best_params, stack.params):
                            b[h].copy_(p[h])
                elif cfg.patience and epoch - best[h][2] >= cfg.patience:
                    active[h] = False
            history[h].append(row)
        _log_epoch(label, group, epoch, cfg.epochs, history, active, time.perf_counter() - t0)
        if not bool(active.any()):
            break
    if cfg.patience:                                           # keep each head's best epoch
        with torch.no_grad():
            for b, p in zip(best_params, stack.params):
                p.copy_(b)
    return _finish(stack, group, history, [b[2] or None for b in best], ctx, {})


def _finish(stack: HeadStack, group, history, best_epochs, ctx: _Context, extra) -> list[_Result]:
    """Final metrics of every head of a stack on val and test; package the results."""
    finals = [{} for _ in group]
    for split in (ctx.val, ctx.test):
        if split is not None:
            for f, m in zip(finals, evaluate(stack, split.batches(), ctx.class_names)):
                f[split.role] = m
    return [_Result(e, stack.head_state(h), history[h], best_epochs[h], finals[h], extra.get(h, {}))
            for h, e in enumerate(group)]


def _lr_scale(cfg: TrainConfig, step: int, total: int, epoch: int) -> float:
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / total))
    if cfg.schedule == "step":
        return 0.1 ** ((epoch - 1) // (cfg.lr_step or max(1, cfg.epochs // 3)))
    return 1.0


def _derived_seed(seed: int, purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{purpose}".encode()).digest()[:7], "big")


def _log_epoch(label, group, epoch, epochs, history, active, seconds) -> None:
    rows = [h[-1] for h in history if h and h[-1]["epoch"] == epoch]
    if not rows:
        return
    losses = [r["train_loss"] for r in rows]
    text = f"train loss {min(losses):.4f}" + (f"..{max(losses):.4f}" if len(rows) > 1 else "")
    if "val_acc" in rows[0]:
        h = max(range(len(history)), key=lambda i: history[i][-1].get("val_acc", -1)
                if history[i] and history[i][-1]["epoch"] == epoch else -1)
        text += f", best val acc {history[h][-1]['val_acc']:.4f} ({_run_label(group[h])})"
    log.info("%s %s x%d: epoch %d/%d, %s, %d active, %.2f s", label, group[0].kind, len(group),
             epoch, epochs, text, int(active.sum()), seconds)


def _fit_logreg(group: list[_Experiment], ctx: _Context) -> list[_Result]:
    """One scikit-learn LogisticRegression per C, each kept as the linear layer it is."""
    cfg, train, c = ctx.cfg, ctx.train, len(ctx.class_names)
    x, y = np.asarray(train.ram, dtype=np.float32), train.labels                # (N, D), (N,)
    scaler = standard_scaler(x) if cfg.logreg_standardize else None
    stack = HeadStack(train.reader.feature_dim, c, seeds=[0] * len(group))
    extra = {}
    for h, e in enumerate(group):
        state, extra[h] = fit_logreg(x, y, c, e.C, cfg.logreg_max_iter,
                                     "balanced" if cfg.class_weight == "balanced" else None, scaler)
        stack.set_head(h, state)
        if not extra[h]["converged"]:
            log.warning("logreg C=%g did not converge in %d iterations: raise --logreg-max-iter",
                        e.C, cfg.logreg_max_iter)
    results = _finish(stack, group, [[] for _ in group], [None] * len(group), ctx, extra)
    for r, m in zip(results, evaluate(stack, train.batches(), ctx.class_names)):
        r.final["train"] = m
    return results


# --------------------------------------------------------------------------------- records

def _run_label(e: _Experiment) -> str:
    if e.kind == "logreg":
        return f"logreg-C{e.C:g}"
    shape = "linear" if e.kind == "linear" else f"mlp{'x'.join(map(str, e.hidden))}-{e.activation}"
    return (f"{shape}-{e.optimizer}-lr{e.lr:g}-wd{e.weight_decay:g}-do{e.dropout:g}"
            f"-ls{e.label_smoothing:g}-s{e.seed}")


def _run_id(e: _Experiment, ctx: _Context) -> str:
    """Readable hyper-parameters plus a short hash of everything else that shapes the run."""
    cfg = asdict(ctx.cfg)
    shared = {k: cfg[k] for k in ("epochs", "batch_size", "momentum", "schedule", "lr_step",
                                  "class_weight", "patience", "data_seed", "logreg_max_iter",
                                  "logreg_standardize")}
    key = {"experiment": e.params(), "shared": shared, "window": ctx.window,
           "train": [mf.feature_fingerprint(ctx.train.reader.manifest), len(ctx.train.rows)],
           "val": len(ctx.val.rows) if ctx.val else 0}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:6]
    return f"{_run_label(e)}-{digest}"


def _record(runs_dir: Path, r: _Result, ctx: _Context) -> dict:
    """Write one run's folder; return its results.csv row."""
    e, m = r.experiment, ctx.train.reader.manifest
    run_id = _run_id(e, ctx)
    meta = {
        "run_id": run_id, "kind": e.kind, "in_dim": ctx.train.reader.feature_dim,
        "n_classes": len(ctx.class_names), "hidden": list(e.hidden or ()),
        "activation": e.activation, "input": "raw cached features, float32",
        "class_names": list(ctx.class_names), "hyperparameters": e.params(),
        "config": asdict(ctx.cfg), "best_epoch": r.best_epoch,
        "weights_epoch": r.best_epoch if ctx.cfg.patience else (len(r.history) or None), **r.extra,
        "cache": {"path": str(ctx.train.reader.path.resolve()), "fingerprint": mf.feature_fingerprint(m),
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
    val, test = r.final.get("val") or {}, r.final.get("test") or {}
    return {
        "run_id": run_id, "head": e.kind, "hidden": "x".join(map(str, e.hidden or ())) or None,
        "activation": e.activation, "optimizer": e.optimizer, "lr": e.lr,
        "weight_decay": e.weight_decay, "dropout": e.dropout, "label_smoothing": e.label_smoothing,
        "seed": e.seed, "C": e.C, "epochs_run": len(r.history) or None, "best_epoch": r.best_epoch,
        "train_loss": last.get("train_loss", (r.final.get("train") or {}).get("log_loss")),
        "train_acc": last.get("train_acc", (r.final.get("train") or {}).get("top1")),
        "val_acc": val.get("top1"), "val_top5": val.get("top5"),
        "val_balanced_acc": val.get("balanced_accuracy"), "val_loss": val.get("log_loss"),
        "best_val_acc": max((h["val_acc"] for h in r.history if "val_acc" in h),
                            default=val.get("top1")),
        "last_val_acc": last.get("val_acc", val.get("top1")),
        "test_acc": test.get("top1"), "test_top5": test.get("top5"),
        "test_balanced_acc": test.get("balanced_accuracy"), "test_loss": test.get("log_loss"),
        "path": str(run_dir),
    }


def _val_source(ctx: _Context) -> str | None:
    if ctx.val is None:
        return None
    if ctx.val.reader is ctx.train.reader:
        return f"hash split of the train cache, fraction {ctx.cfg.val_fraction}"
    return str(ctx.val.reader.path)


def _summarize(rows: list[dict], runs_dir: Path, ctx: _Context, memory: dict, seconds: float
               ) -> dict:
    if ctx.val is not None:
        rows.sort(key=lambda r: (-r["val_acc"], r["val_loss"], r["run_id"]))
        ranked_by = "validation accuracy"
    else:
        rows.sort(key=lambda r: (r["train_loss"], r["run_id"]))
        ranked_by = "training loss (no validation data: give --val or --val-fraction)"
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    held = sum(s.ram.nbytes for s in (ctx.train, ctx.val, ctx.test)
               if s is not None and s.ram is not None)
    memory["peak_feature_bytes"] = held + ctx.train.peak_group_bytes + (
        memory["chunk_bytes"] if memory["eval"] == "stream" else 0)
    return {
        "runs_dir": str(runs_dir), "results_csv": str(runs_dir / "results.csv"),
        "experiments": len(rows), "ranked_by": ranked_by,
        "best_run": rows[0]["run_id"], "best_path": rows[0]["path"],
        "class_names": list(ctx.class_names),
        "data": {role: {"path": str(s.reader.path), "rows": len(s.rows)} if s else None
                 for role, s in (("train", ctx.train), ("val", ctx.val), ("test", ctx.test))},
        "memory": memory, "seconds": seconds, "leaderboard": rows,
    }


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in _CSV_COLUMNS})


__all__ = ["train_head", "HEADS", "SCHEDULES", "MATCH_KEYS"]
