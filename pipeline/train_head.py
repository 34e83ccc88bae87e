"""`train_head()`: a sweep of head experiments on cached features, one CPU pass per head shape.

    from pipeline.config import TrainConfig
    from pipeline.train_head import train_head
    summary = train_head("train.h5", "runs/", TrainConfig(lr=(1e-3, 1e-2), seed=(0, 1, 2)))
    summary.best_run         # "linear-adamw-lr0.01-wd0-do0-ls0-s1-3fa2c1"

The experiments are the cartesian product of the config's tuple fields. Heads of one shape and
optimizer (all linear AdamW heads, all 1024-unit ReLU MLPs with SGD, ...) train together as one
`HeadStack`: each batch is read once and feeds every head through one matmul. logreg heads are
scikit-learn fits, saved as the linear layer they are. knn heads are DINO's weighted k-NN
(`knn`): every (k, T) scored from one search for the top max(k) neighbours, each saved as the
training rows it votes with. ridge and lda heads are solved in closed form from one pass of
statistics over the training rows (`closed_form`), every alpha and shrinkage from one
eigendecomposition. With `halving`, a pass stops the heads of worse validation loss at epochs
r, 2r, 4r, ... and trains on with the rest (`_halving`).

Batch order and dropout noise come from `data_seed` and are shared by every head of a pass; a
head's `seed` sets only its init. So a head trained in a sweep equals the same head trained
alone (up to float rounding in the shared matmul). A pass holds as many heads as fit their
parameters and optimizer state in a quarter of `max_memory`; more take more passes. The batch
order, streaming and memory plan are in `_feature_splits`.

With `standardize` (the default), linear and mlp heads train on (x - mean) / std, the
per-feature mean and std of the training rows (one pass over them, streamed when they do not
fit `max_memory`); each saved head has that folded into its first layer, so every saved head
takes raw features. logreg fits do the same under `logreg_standardize`.

Ranking: by validation accuracy (ties: lower validation loss); without validation data, by every
head's log loss on the training rows evaluated without dropout or label smoothing (the same
measure for torch heads and logreg fits).

Records, under RUNS_DIR: <run-id>/head.pt + head.json (load with `head_file.load_head`),
<run-id>/metrics.json (per-epoch train/val loss and accuracy, final metrics), results.csv
(one row per run, leaderboard order) and summary.json (`TrainSummary.to_json()`). A second
sweep into the same folder is merged: results.csv and summary.json rank the runs of every sweep
there as one leaderboard (a run trained again replaces its row), and a sweep whose numbers
would not compare (other validation rows, other classes) is refused before it trains. Every
file is written under a temporary name and renamed into place: a full disk is one line, and
the files already there stay whole; a folder that cannot be written is refused before any
training.
"""
from __future__ import annotations

import hashlib
import logging
import math
import resource
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from cache import CacheReader

from ._feature_splits import (MATCH_KEYS, Context, Split, feature_moments, open_splits,
                              plan_memory)
from ._files import check_folder, make_folder
from ._halving import keep_heads, rungs, shrink, survivors
from ._records import (Result, TrainSummary, _run_id as run_id, data_of, earlier_runs, record,
                       plural, records_lock, standardized, summarize, write_csv,
                       write_summary)
from ._sweep import Experiment, check_config, experiments, passes
from .closed_form import check_classes, fit_heads
from .config import CLOSED_FORM, TrainConfig
from .heads import HeadStack, StackedOptimizer, evaluate, fit_logreg, fold_standardization
from .knn import check_rows, fit_knn

log = logging.getLogger(__name__)


def train_head(train_path: str | Path, runs_dir: str | Path, config: TrainConfig = TrainConfig(),
               val_path: str | Path | None = None, test_path: str | Path | None = None,
               on_epoch: Callable[[dict], None] | None = None) -> TrainSummary:
    """Train every experiment of `config` on the cache `train_path`; record them in `runs_dir`.

    Validation: the cache `val_path`, else the rows of `train_path` whose path hashes below
    `config.val_fraction`. `on_epoch`, if given, gets a plain dict after every epoch of every
    pass: pass, passes, kind, heads, active, epoch, epochs, seconds (the epoch's own time:
    batches, steps, validation), train_loss_min/max, best_val_acc and best_run (None without
    validation data). Returns a `TrainSummary` (leaderboard best first, best run and path,
    data and memory use). Raises UserError for user mistakes: mismatching or incomplete
    caches, bad settings, NaN/inf features.
    """
    t0 = time.perf_counter()
    check_config(config, has_val=val_path is not None)
    sweep = experiments(config)
    runs_dir = check_folder(runs_dir, "runs folder", "choose another -o")
    readers: list[CacheReader] = []
    try:
        train, val, test = open_splits(train_path, val_path, test_path, config, readers)
        check_rows(sweep, len(train.rows))
        names = train.reader.class_names
        warnings = _class_warnings(train, names)
        for kind in dict.fromkeys(e.kind for e in sweep if e.kind in CLOSED_FORM):
            check_classes(train.labels, kind)        # before any head trains
        warnings += [] if warnings else _val_warnings(val)
        # Before any training: refuses a folder whose sweeps this one cannot be ranked with.
        earlier = earlier_runs(runs_dir, data_of(train, val, test), names)
        memory = plan_memory(train, [s for s in (val, test) if s is not None], config)
        ctx = Context(config, train, val, test, names, memory["window_chunks"],
                      _class_weights(train.labels, len(names), config.class_weight),
                      _moments(train, sweep, config))
        make_folder(runs_dir, "runs folder", "choose another -o")
        groups = passes(sweep, train.reader.feature_dim, len(names), config)
        log.info("%s in %s over %d training rows (%s), validation: %s",
                 plural(len(sweep), "experiment"), plural(len(groups), "pass"), len(train.rows),
                 memory["train"],
                 f"{len(val.rows)} rows" if val else "none")
        rows = []
        for i, group in enumerate(groups, 1):
            kind, t_pass = group[0].kind, time.perf_counter()
            results = (_fit_logreg(group, ctx) if kind == "logreg"
                       else fit_knn(group, ctx) if kind == "knn"
                       else _fit_closed_form(group, ctx) if kind in CLOSED_FORM
                       else _train_pass(group, ctx, (i, len(groups)), on_epoch))
            rows += [record(runs_dir, r, ctx) for r in results]
            _log_pass((i, len(groups)), group, rows[-len(results):], time.perf_counter() - t_pass)
        memory["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # Another sweep into this folder may have recorded runs since: merge under its lock.
        with records_lock(runs_dir):
            earlier = earlier_runs(runs_dir, data_of(train, val, test), names)
            summary = summarize(rows, earlier, runs_dir, ctx, memory, [len(g) for g in groups],
                                time.perf_counter() - t0, warnings)
            write_csv(runs_dir / "results.csv", summary.leaderboard)
            write_summary(runs_dir / "summary.json", summary)
    finally:
        for r in readers:
            r.close()
    log.info("best: %s (%s)", summary.best_run, summary.ranked_by)
    return summary


def _class_warnings(train: Split, names: list[str]) -> list[str]:
    """What to say when the training rows hold a single class: every head then predicts it
    and scores accuracy 1.0, which says nothing about the features."""
    present = np.unique(train.labels)
    if len(present) > 1:
        return []
    text = (f"the training rows of {train.reader.path} hold only one class "
            f"({names[int(present[0])]!r}): every head predicts it, so an accuracy of 1.0 says "
            "nothing; train on images of at least two classes")
    log.warning(text)
    return [text]


def _moments(train: Split, sweep: list[Experiment], cfg: TrainConfig):
    """The training rows' (mean, std) when some head of the sweep trains standardized."""
    kinds = {e.kind for e in sweep}
    if (cfg.standardize and kinds - {"logreg", "knn"}) or (cfg.logreg_standardize and "logreg" in kinds):
        return feature_moments(train)
    return None


def _class_weights(labels: np.ndarray, n_classes: int, mode: str) -> torch.Tensor | None:
    """scikit-learn's 'balanced': n / (classes present * count); absent classes weigh 0."""
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.divide(len(labels), (counts > 0).sum() * counts, out=np.zeros(n_classes),
                  where=counts > 0)
    return torch.tensor(w, dtype=torch.float32)


# ---------------------------------------------------------------------------------- training

def _train_pass(group: list[Experiment], ctx: Context, where: tuple[int, int],
                on_epoch: Callable[[dict], None] | None) -> list[Result]:
    """Train the heads of one shape and optimizer together, one batch read for all."""
    cfg, first, k = ctx.cfg, group[0], len(group)
    stack = HeadStack(ctx.train.reader.feature_dim, len(ctx.class_names), [e.seed for e in group],
                      [e.dropout for e in group], first.hidden, first.activation or "relu")
    opt = StackedOptimizer(stack.params, first.optimizer, [e.lr for e in group],
                           [e.weight_decay for e in group], momentum=cfg.momentum)
    smoothing = torch.tensor([e.label_smoothing for e in group])
    norm = _scaling(ctx) if standardized(first.kind, ctx) else None
    order_gen = torch.Generator().manual_seed(cfg.data_seed)
    noise_gen = torch.Generator().manual_seed(_derived_seed(cfg.data_seed, "dropout"))
    steps = math.ceil(len(ctx.train.rows) / cfg.batch_size)
    active = torch.ones(k, dtype=torch.bool)
    # Early stopping restores each head's best epoch, so only then is it worth a copy.
    best_params = [p.detach().clone() for p in stack.params] if cfg.patience else None
    best = [(-1.0, math.inf, 0)] * k                                   # (acc, loss, epoch)
    history: list[list[dict]] = [[] for _ in group]
    step = 0
    # Successive halving: the stack shrinks to the heads still training; alive[p] is the index
    # in `group` of the head at stack position p, and `record` keeps every head of the pass.
    alive, stopped = list(range(k)), {}
    halving = set(rungs(cfg.epochs, k, cfg.halving_rate)) if cfg.halving else set()
    record = HeadStack(stack.in_dim, stack.n_classes, [0] * k, stack.dropouts, stack.hidden,
                       stack.activation) if halving else stack
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        live = len(alive)                                               # heads training now
        loss_sum = torch.zeros(live, dtype=torch.float64)
        correct = torch.zeros(live, dtype=torch.long)
        for x, y in _scaled(ctx.train.epoch(order_gen, ctx.window, cfg.batch_size, epoch,
                                                 cfg.data_seed), norm):
            scale = _lr_scale(cfg, step, steps * cfg.epochs, epoch)
            logits = stack.forward(x, noise=noise_gen)                  # (B, K, C)
            losses = stack.losses(logits, y, smoothing, ctx.class_weight)
            losses.sum().backward()
            opt.step(scale, None if bool(active.all()) else active)
            loss_sum += losses.detach().double() * len(y)
            correct += (logits.detach().argmax(-1) == y[:, None]).sum(0)
            step += 1
        n = len(ctx.train.rows)
        ev = (evaluate(stack, _scaled(ctx.val.batches(), norm), ctx.class_names)
              if ctx.val else None)
        for h in active.nonzero().flatten().tolist():
            g = alive[h]
            row = {"epoch": epoch, "lr": group[g].lr * scale, "train_loss": loss_sum[h].item() / n,
                   "train_acc": correct[h].item() / n}
            if ev:
                row.update(val_loss=ev[h]["log_loss"], val_acc=ev[h]["top1"],
                           val_balanced_acc=ev[h]["balanced_accuracy"])
                if (ev[h]["top1"], -ev[h]["log_loss"]) > (best[g][0], -best[g][1]):
                    best[g] = (ev[h]["top1"], ev[h]["log_loss"], epoch)
                    if best_params is not None:
                        with torch.no_grad():
                            for b, p in zip(best_params, stack.params):
                                b[h].copy_(p[h])
                elif cfg.patience and epoch - best[g][2] >= cfg.patience:
                    active[h] = False
            history[g].append(row)
        if epoch in halving:
            keep = survivors([m["log_loss"] for m in ev], cfg.halving_rate)
            gone = [h for h in range(len(alive)) if h not in keep]
            keep_heads(record, stack, gone, alive)
            stopped.update({alive[h]: {"stopped_epoch": epoch} for h in gone})
            stack, opt = shrink(stack, opt, keep)
            alive, active = [alive[h] for h in keep], active[keep]
            smoothing = smoothing[keep]
        info = _epoch_info(where, group, epoch, cfg.epochs, history, active,
                           time.perf_counter() - t0, ctx)
        _log_epoch(info)
        if on_epoch is not None:
            on_epoch(info)
        if not bool(active.any()):
            break
    if best_params is not None:                                # keep each head's best epoch
        with torch.no_grad():
            for b, p in zip(best_params, stack.params):
                p.copy_(b)
    if halving:
        keep_heads(record, stack, list(range(len(alive))), alive)
        stack = record
    if norm is not None:
        _fold(stack, ctx.moments)
    return _finish(stack, group, history, [b[2] or None for b in best], ctx, stopped)


def _scaling(ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """The training rows' (mean, std) as float32 tensors (D,), to standardize batches."""
    mean, std = ctx.moments
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def _scaled(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
            norm: tuple[torch.Tensor, torch.Tensor] | None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Batches (x (B, D), y (B,)) with x standardized by norm = (mean, std); as they are if None."""
    if norm is None:
        yield from batches
        return
    mean, std = norm
    for x, y in batches:
        yield (x - mean) / std, y


@torch.no_grad()
def _fold(stack: HeadStack, moments: tuple[np.ndarray, np.ndarray]) -> None:
    """Fold the standardization into every head's first layer (in float64), in place: the
    stack then takes raw features, as the saved heads do."""
    mean, std = (torch.from_numpy(a) for a in moments)                      # (D,) float64
    w, b = fold_standardization(stack.weights[0].double(), stack.biases[0].double(), mean, std)
    stack.weights[0].copy_(w)                                               # (K, out, D)
    stack.biases[0].copy_(b)                                                # (K, out)


def _finish(stack: HeadStack, group, history, best_epochs, ctx: Context, extra) -> list[Result]:
    """Final metrics of every head of a stack (taking raw features) on val and test, and on the
    training rows when there is no validation data (or for logreg, ridge and lda, which have no
    epochs);
    package the results."""
    finals = [{} for _ in group]
    on_train = ctx.val is None or group[0].kind in ("logreg", *CLOSED_FORM)
    for split in (ctx.train if on_train else None, ctx.val, ctx.test):
        if split is not None:
            for f, m in zip(finals, evaluate(stack, split.batches(), ctx.class_names)):
                f[split.role] = m
    return [Result(e, stack.head_state(h), history[h], best_epochs[h], finals[h], extra.get(h, {}))
            for h, e in enumerate(group)]


def _lr_scale(cfg: TrainConfig, step: int, total: int, epoch: int) -> float:
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / total))
    if cfg.schedule == "step":
        return 0.1 ** ((epoch - 1) // (cfg.lr_step or max(1, cfg.epochs // 3)))
    return 1.0


MIN_VAL_ROWS = 30     # below this, validation accuracy moves in steps too coarse to rank heads


def _val_warnings(val: Split | None) -> list[str]:
    """What to say when validation is too small to tell heads apart: with 4 rows every
    accuracy is a multiple of 0.25 and many heads tie at 1.0."""
    if val is None or len(val.rows) >= MIN_VAL_ROWS:
        return []
    n = len(val.rows)
    text = (f"validation holds only {n} row{'s' * (n != 1)}: accuracies move in steps of "
            f"{1 / n:.2g}, too coarse to rank heads; give --val VAL.h5 or a larger --val-fraction "
            f"(at least {MIN_VAL_ROWS} rows)")
    log.warning(text)
    return [text]


def _derived_seed(seed: int, purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{purpose}".encode()).digest()[:7], "big")


def _epoch_info(where, group, epoch, epochs, history, active, seconds, ctx) -> dict:
    """What `on_epoch` gets: one epoch of one pass, as plain values."""
    now = [h for h in range(len(group)) if history[h] and history[h][-1]["epoch"] == epoch]
    losses = [history[h][-1]["train_loss"] for h in now]
    info = {"pass": where[0], "passes": where[1], "kind": group[0].kind, "heads": len(group),
            "active": int(active.sum()), "epoch": epoch, "epochs": epochs, "seconds": seconds,
            "train_loss_min": min(losses), "train_loss_max": max(losses),
            "best_val_acc": None, "best_run": None}
    if "val_acc" in history[now[0]][-1]:
        h = max(now, key=lambda i: history[i][-1]["val_acc"])
        info.update(best_val_acc=history[h][-1]["val_acc"], best_run=run_id(group[h], ctx))
    return info


def _log_epoch(info: dict) -> None:
    text = f"train loss {info['train_loss_min']:.4f}" + (
        f"..{info['train_loss_max']:.4f}" if info["train_loss_max"] != info["train_loss_min"]
        else "")
    if info["best_val_acc"] is not None:
        text += f", best val acc {info['best_val_acc']:.4f} ({info['best_run']})"
    log.debug("pass %d/%d %s x%d: epoch %d/%d, %s, %d active, %.2f s", info["pass"],
             info["passes"], info["kind"], info["heads"], info["epoch"], info["epochs"], text,
             info["active"], info["seconds"])


def _log_pass(where: tuple[int, int], group: list[Experiment], rows: list[dict],
              seconds: float) -> None:
    """One line a pass (the per-epoch lines are DEBUG: `pipeline -v train-head`), naming the
    pass's best run by the id its folder and the leaderboard use."""
    epochs = max((r.get("epochs_run") or 0 for r in rows), default=0)
    text = f"{epochs} epoch{'s' * (epochs != 1)}, " if epochs else ""
    scored = [r for r in rows if r.get("val_acc") is not None]
    if scored:
        best = max(scored, key=lambda r: r["val_acc"])
        text += f"best val acc {best['val_acc']:.4f} ({best['run_id']}), "
    log.info("pass %d/%d %s x%d: %s%.2f s", *where, group[0].kind, len(group), text, seconds)


def _fit_logreg(group: list[Experiment], ctx: Context) -> list[Result]:
    """One scikit-learn LogisticRegression per C, each kept as the linear layer it is."""
    cfg, train, c = ctx.cfg, ctx.train, len(ctx.class_names)
    x, y = np.asarray(train.ram, dtype=np.float32), train.labels                # (N, D), (N,)
    moments = ctx.moments if standardized("logreg", ctx) else None
    stack = HeadStack(train.reader.feature_dim, c, seeds=[0] * len(group))
    extra = {}
    for h, e in enumerate(group):
        state, extra[h] = fit_logreg(x, y, c, e.C, cfg.logreg_max_iter,
                                     "balanced" if cfg.class_weight == "balanced" else None,
                                     moments)
        stack.set_head(h, state)
        if not extra[h]["converged"]:
            log.warning("logreg C=%g did not converge in %d iterations: raise --logreg-max-iter",
                        e.C, cfg.logreg_max_iter)
    return _finish(stack, group, [[] for _ in group], [None] * len(group), ctx, extra)


def _fit_closed_form(group: list[Experiment], ctx: Context) -> list[Result]:
    """Every ridge alpha and lda shrinkage of the sweep from one pass of statistics over the
    training rows (streamed when they are), each kept as the linear layer it is."""
    train, c = ctx.train, len(ctx.class_names)
    moments = ctx.moments if standardized(group[0].kind, ctx) else None
    if moments is None:                # centred all the same: the intercept is not penalized
        moments = (feature_moments(train)[0], np.ones(train.reader.feature_dim))
    fits = fit_heads(group, train, c, moments)
    stack = HeadStack(train.reader.feature_dim, c, seeds=[0] * len(group))
    for h, (weight, bias, _) in enumerate(fits):
        stack.set_head(h, {"weight": torch.from_numpy(weight), "bias": torch.from_numpy(bias)})
    extra = {h: facts for h, (_, _, facts) in enumerate(fits)}
    return _finish(stack, group, [[] for _ in group], [None] * len(group), ctx, extra)


__all__ = ["train_head", "TrainSummary", "MATCH_KEYS"]
