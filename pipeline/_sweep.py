"""The sweep of `train_head`: experiments from a TrainConfig, the checks of its settings, and
the passes that train them (heads of one shape and optimizer together, within a memory bound;
logreg fits together; ridge and lda heads together, from one pass of statistics)."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

from cache.errors import UserError

from .config import CLOSED_FORM, TrainConfig, validate


@dataclass(frozen=True)
class Experiment:
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
    k: int | None = None
    temperature: float | None = None
    alpha: float | None = None
    shrinkage: float | None = None

    def params(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden) if self.hidden is not None else None
        # Only where set: the run ids of the other kinds, hashed from these, stay as they were.
        for key in ("k", "temperature", "alpha", "shrinkage"):
            if d[key] is None:
                del d[key]
        return d


def experiments(cfg: TrainConfig) -> list[Experiment]:
    """The cartesian product of the config's sweep axes, each head kind taking the axes it uses;
    repeated values make one experiment."""
    torch_axes = list(itertools.product(cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.dropout,
                                        cfg.label_smoothing, cfg.seed))
    out: list[Experiment] = []
    for kind in cfg.head:
        if kind == "logreg":
            out += [Experiment("logreg", C=float(c)) for c in cfg.C]
            continue
        if kind == "knn":
            out += [Experiment("knn", k=int(k), temperature=float(t))
                    for k, t in itertools.product(cfg.k, cfg.temperature)]
            continue
        if kind == "ridge":
            out += [Experiment("ridge", alpha=float(a)) for a in cfg.alpha]
            continue
        if kind == "lda":
            out += [Experiment("lda", shrinkage=float(s)) for s in cfg.shrinkage]
            continue
        shapes = [((), None)] if kind == "linear" else itertools.product(cfg.hidden, cfg.activation)
        for (hidden, act), (opt, lr, wd, do, ls, seed) in itertools.product(shapes, torch_axes):
            out.append(Experiment(kind, tuple(int(h) for h in hidden), act, opt, float(lr),
                                  float(wd), float(do), float(ls), int(seed)))
    return list(dict.fromkeys(out))


def check_config(cfg: TrainConfig, has_val: bool) -> None:
    """Raise UserError naming the first bad setting of `cfg` and how to fix it."""
    def bad(what: str, fix: str):
        raise UserError(f"{what}: {fix}")

    validate(cfg)
    if "mlp" in cfg.head and (not cfg.hidden or any(not h or min(h) < 1 for h in cfg.hidden)):
        bad(f"--hidden {cfg.hidden}", "give layer sizes >= 1, e.g. 512 or 1024x256")
    closed = [k for k in cfg.head if k in CLOSED_FORM]
    if closed and cfg.class_weight != "none":
        bad(f"--class-weight {cfg.class_weight} with --head {closed[0]}",
            f"{closed[0]} heads weigh every row alike: drop --class-weight or train logreg, "
            "linear or mlp heads")
    if cfg.halving and not (has_val or cfg.val_fraction > 0):
        bad("--halving needs validation rows to rank the heads by",
            "give --val or --val-fraction > 0")
    if cfg.halving and cfg.patience:
        bad("--halving with --patience", "both stop heads early: use one of them")
    if cfg.patience and not (has_val or cfg.val_fraction > 0):
        bad("--patience (early stopping) needs validation data", "give --val or --val-fraction > 0")


def passes(experiments: list[Experiment], dim: int, n_classes: int, cfg: TrainConfig
           ) -> list[list[Experiment]]:
    """Experiments grouped by what must be shared in one pass (kind, shape, optimizer), split so
    that a pass's parameters and optimizer state stay under a quarter of --max-memory."""
    groups: dict[tuple, list[Experiment]] = {}
    for e in experiments:
        # ridge and lda heads share one pass of statistics
        key = ("closed form", None, None, None) if e.kind in CLOSED_FORM else (
            e.kind, e.hidden, e.activation, e.optimizer)
        groups.setdefault(key, []).append(e)
    out = []
    for (kind, hidden, _, _), group in groups.items():
        if kind in ("logreg", "knn", "closed form"):   # fits without a stack: one pass each
            out.append(group)
            continue
        dims = [dim, *hidden, n_classes]
        # float32 parameters, gradients and two optimizer states per head
        head_bytes = 4 * 4 * sum((i + 1) * o for i, o in zip(dims[:-1], dims[1:]))
        size = max(1, cfg.max_memory // 4 // head_bytes)
        group = sorted(group, key=lambda e: e.dropout)   # equal dropout: one masked input each
        out += [group[i:i + size] for i in range(0, len(group), size)]
    return out
