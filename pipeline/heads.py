"""Heads on cached features: K heads of one shape trained as one stacked set of tensors, and
the plain modules they are saved as.

    stack = HeadStack(4096, 10, seeds=[0, 1], dropouts=[0.0, 0.5])          # two linear heads
    opt = StackedOptimizer(stack.params, "adamw", lr=[1e-3, 1e-2], weight_decay=[0.0, 1e-4])
    logits = stack.forward(x, noise=generator)                           # (B, K, C)
    stack.losses(logits, y).sum().backward(); opt.step()
    module, meta = load_head("runs/linear-adamw-lr0.001-.../")      # nn.Linear / nn.Sequential

Why stacked: K linear heads held as one (K*C, D) weight make a batch one addmm that reads the
batch once for all heads, so 32 heads cost a few times one head, not 32 times (3.5-5x on a
2-core CPU: bench/sweep.py). The heads stay independent:
the loss is a sum of per-head losses, so each head's gradient is its own, and the optimizers
are elementwise with a per-head lr and weight decay, so a head trained in a stack follows the
trajectory it follows alone (up to float rounding in the matmuls).

Dropout noise comes from one generator shared by the stack: per step one uniform draw U of
the input's shape (and one per hidden layer), and head k keeps the units where U >= p_k. Each
head sees ordinary dropout with its own p; a head alone draws the same U, so it sees the same
masks as in a stack.

`evaluate` gives every head's metrics in one pass over a split; `fit_logreg` fits
scikit-learn's LogisticRegression and returns it as the linear layer it is. Heads trained on
standardized features are saved with the standardization folded into their first layer
(`fold_standardization`), so every saved head takes raw features.

Saved heads are plain modules that `build_head(meta)` rebuilds without this training code:
linear, logreg, ridge and lda heads are an `nn.Linear(D, C)` (the tutorial's replacement fc8), mlp heads an
`nn.Sequential(Linear, act, Linear, act, ..., Linear)` (dropout is a training-time setting).
Export uses `load_head(run_dir) -> (module, meta)`.
"""
from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cache import manifest as mf
from cache.errors import UserError
from cache.manifest import (COUNT, NAME, NUMBER, OBJECT, POSITIVE, STRING, STRINGS, Check, Fields,
                            one_of, optional)

from ._files import make_folder, write_file, write_text
from .config import ACTIVATIONS, HEADS, LINEAR_LAYER, OPTIMIZERS

HEAD_FORMAT = "pipeline-head/1"
# Each of config.ACTIVATIONS -> (function for the stack, module for the saved head).
_ACTIVATION = {"relu": (F.relu, nn.ReLU), "gelu": (F.gelu, nn.GELU), "tanh": (torch.tanh, nn.Tanh)}


class HeadStack:
    """K heads of one shape (in_dim -> hidden... -> n_classes) held as stacked tensors.

    Layer l has weight (K, out_l, in_l) and bias (K, out_l), nn.Linear's layout per head.
    Head k is initialised like nn.Linear (U(-1/sqrt(in), 1/sqrt(in)) for weight then bias, layer
    by layer) from its own generator seeded with seeds[k], so its init does not depend on the
    other heads of the stack.
    """

    def __init__(self, in_dim: int, n_classes: int, seeds: Sequence[int],
                 dropouts: Sequence[float] | None = None, hidden: Sequence[int] = (),
                 activation: str = "relu"):
        if activation not in ACTIVATIONS:
            raise UserError(f"unknown activation {activation!r}: use {', '.join(ACTIVATIONS)}")
        k = len(seeds)
        dropouts = [0.0] * k if dropouts is None else [float(p) for p in dropouts]
        if len(dropouts) != k or any(not 0.0 <= p < 1.0 for p in dropouts):
            raise UserError(f"need one dropout in [0, 1) per head, got {dropouts}")
        self.in_dim, self.n_classes, self.k = in_dim, n_classes, k
        self.hidden, self.activation = tuple(int(h) for h in hidden), activation
        self.dropouts = dropouts
        self._p = torch.tensor(dropouts, dtype=torch.float32)     # (K,)
        self._act = _ACTIVATION[activation][0]
        dims = [in_dim, *self.hidden, n_classes]
        self.weights = [torch.empty(k, o, i) for i, o in zip(dims[:-1], dims[1:])]
        self.biases = [torch.empty(k, o) for o in dims[1:]]
        for h, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(int(seed))
            for w, b in zip(self.weights, self.biases):
                bound = 1.0 / math.sqrt(w.shape[2])
                w[h] = (torch.rand(w.shape[1:], generator=g) * 2 - 1) * bound
                b[h] = (torch.rand(b.shape[1:], generator=g) * 2 - 1) * bound
        for t in self.params:
            t.requires_grad_(True)
        # Runs of consecutive heads with equal input dropout share one masked input and one addmm.
        self._runs, start = [], 0
        for h in range(1, k + 1):
            if h == k or dropouts[h] != dropouts[start]:
                self._runs.append((start, h, dropouts[start]))
                start = h

    @property
    def params(self) -> list[torch.Tensor]:
        return [t for pair in zip(self.weights, self.biases) for t in pair]

    def forward(self, x: torch.Tensor, noise: torch.Generator | None = None) -> torch.Tensor:
        """Logits (B, K, C) of every head for features x (B, D). `noise`: training mode
        (dropout drawn from that generator); None: evaluation (no dropout)."""
        b, d = x.shape
        w0, b0 = self.weights[0], self.biases[0]
        drop = noise is not None and any(p > 0 for p in self.dropouts)
        if not drop:
            h = torch.addmm(b0.reshape(-1), x, w0.reshape(-1, d).t()).view(b, self.k, -1)
        else:
            u = torch.rand(x.shape, generator=noise)                  # (B, D), shared by heads
            parts = []
            for s, e, p in self._runs:
                xp = x if p == 0 else x * (u >= p).to(x.dtype).div_(1 - p)
                parts.append(torch.addmm(b0[s:e].reshape(-1), xp, w0[s:e].reshape(-1, d).t()))
            h = torch.cat(parts, 1).view(b, self.k, -1)               # (B, K, out0)
        for w, bias in zip(self.weights[1:], self.biases[1:]):
            h = self._act(h)
            if drop:
                u = torch.rand((b, h.shape[2]), generator=noise)     # (B, H)
                keep = (u[:, None, :] >= self._p[None, :, None]).to(h.dtype)
                h = h * keep / (1 - self._p)[None, :, None]
            # (K, B, H) @ (K, H, out) + (K, 1, out) -> (K, B, out) -> (B, K, out)
            h = torch.baddbmm(bias[:, None, :], h.transpose(0, 1), w.transpose(1, 2))
            h = h.transpose(0, 1)
        return h

    def losses(self, logits: torch.Tensor, y: torch.Tensor,
               label_smoothing: torch.Tensor | None = None,
               class_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Per-head cross-entropy (K,), each exactly nn.CrossEntropyLoss(weight=class_weight,
        label_smoothing=label_smoothing[k]) on that head's logits (B, C)."""
        b, k, c = logits.shape
        logp = logits.log_softmax(-1)                                        # (B, K, C)
        nll = -logp.gather(2, y.view(b, 1, 1).expand(b, k, 1)).squeeze(2)    # (B, K)
        if class_weight is None:
            loss = nll.mean(0)
        else:
            wy = class_weight[y]                                             # (B,)
            loss = (wy[:, None] * nll).sum(0) / wy.sum()
        if label_smoothing is not None and bool((label_smoothing > 0).any()):
            if class_weight is None:
                smooth = -logp.sum(2).mean(0)                                # (K,)
            else:
                smooth = -(logp * class_weight).sum(2).sum(0) / wy.sum()
            loss = (1 - label_smoothing) * loss + label_smoothing / c * smooth
        return loss

    def head_state(self, k: int) -> dict[str, torch.Tensor]:
        """Head k as the state_dict of the module `build_head` makes."""
        if not self.hidden:
            return {"weight": self.weights[0][k].detach().clone(),
                    "bias": self.biases[0][k].detach().clone()}
        return {f"{2 * l}.{name}": t[k].detach().clone()
                for l, (w, b) in enumerate(zip(self.weights, self.biases))
                for name, t in (("weight", w), ("bias", b))}

    @torch.no_grad()
    def set_head(self, k: int, state: dict[str, torch.Tensor]) -> None:
        """Load a `head_state`-style state_dict into head k."""
        if not self.hidden:
            self.weights[0][k].copy_(state["weight"])
            self.biases[0][k].copy_(state["bias"])
            return
        for l, (w, b) in enumerate(zip(self.weights, self.biases)):
            w[k].copy_(state[f"{2 * l}.weight"])
            b[k].copy_(state[f"{2 * l}.bias"])


class StackedOptimizer:
    """AdamW or SGD over stacked head tensors, with a per-head lr and weight decay.

    Elementwise, with torch.optim's arithmetic (AdamW: decoupled decay, bias correction,
    betas (0.9, 0.999), eps 1e-8; SGD: L2 decay added to the gradient, momentum buffer
    starting at the first gradient, no dampening), so head k follows the trajectory of
    torch.optim.AdamW/SGD over that head's parameters alone.
    """

    def __init__(self, params: Sequence[torch.Tensor], kind: str, lr: Sequence[float],
                 weight_decay: Sequence[float], momentum: float = 0.9,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if kind not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {kind!r}: use {', '.join(OPTIMIZERS)}")
        self.params, self.kind = list(params), kind
        self.lr = torch.as_tensor(lr, dtype=torch.float64)               # (K,)
        self.weight_decay = torch.as_tensor(weight_decay, dtype=torch.float64)
        self.momentum, self.betas, self.eps = momentum, betas, eps
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.params]
        self.steps = 0

    @torch.no_grad()
    def step(self, lr_scale: float = 1.0, active: torch.Tensor | None = None) -> None:
        """One update with lr * lr_scale; heads where `active` (K,) is False stay as they are.
        Clears the gradients."""
        self.steps += 1
        lr = self.lr * lr_scale
        if active is not None:
            lr = lr * active.to(torch.float64)
        for p, st in zip(self.params, self.state):
            shape = (-1,) + (1,) * (p.dim() - 1)                         # per-head broadcast
            if self.kind == "adamw":
                self._adamw(p, p.grad, st, lr, shape)
            else:
                self._sgd(p, p.grad, st, lr, shape)
            p.grad = None

    def _adamw(self, p, g, st, lr, shape):
        b1, b2 = self.betas
        if not st:
            st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            # Scratch tensors reused every step: parameter-sized temporaries were ~1/5 of an epoch.
            st["denom"], st["update"] = torch.empty_like(p), torch.empty_like(p)
        if bool((self.weight_decay != 0).any()):
            p.mul_((1 - lr * self.weight_decay).to(p.dtype).view(shape))
        st["exp_avg"].lerp_(g, 1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        step_size = (lr / (1 - b1 ** self.steps)).to(p.dtype).view(shape)
        denom = torch.sqrt(st["exp_avg_sq"], out=st["denom"])
        denom.div_(math.sqrt(1 - b2 ** self.steps)).add_(self.eps)
        p.sub_(torch.mul(step_size, st["exp_avg"], out=st["update"]).div_(denom))

    def _sgd(self, p, g, st, lr, shape):
        if bool((self.weight_decay != 0).any()):
            g = g + self.weight_decay.to(p.dtype).view(shape) * p
        if self.momentum:
            if "buf" not in st:
                st["buf"] = g.detach().clone()
            else:
                st["buf"].mul_(self.momentum).add_(g)
            g = st["buf"]
        p.sub_(lr.to(p.dtype).view(shape) * g)


@torch.no_grad()
def evaluate(stack: HeadStack, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             class_names: Sequence[str]) -> list[dict]:
    """Per head of `stack`, over batches (x (B, D), y (B,)): top-1, top-5 (5+ classes), balanced
    accuracy, log loss, per-class accuracy, confusion matrix (rows: true, columns: predicted).
    Plain JSON types."""
    k, c = stack.k, len(class_names)
    confusion = torch.zeros(k * c * c, dtype=torch.long)
    nll, top5, n = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.long), 0
    offsets = torch.arange(k) * c * c
    for x, y in batches:
        logits = stack.forward(x)                                           # (B, K, C)
        logp = logits.log_softmax(-1)
        nll -= logp.gather(2, y.view(-1, 1, 1).expand(-1, k, 1)).squeeze(2).double().sum(0)
        cells = offsets[None, :] + y[:, None] * c + logits.argmax(-1)       # (B, K)
        confusion += torch.bincount(cells.flatten(), minlength=k * c * c)
        if c >= 5:
            top5 += (logits.topk(5, -1).indices == y[:, None, None]).any(-1).sum(0)
        n += len(y)
    out = []
    for h, cm in enumerate(confusion.view(k, c, c).numpy()):
        support = cm.sum(1)
        recall = [float(cm[i, i] / support[i]) if support[i] else None for i in range(c)]
        out.append({
            "rows": n,
            "top1": float(np.trace(cm) / n),
            "top5": float(top5[h] / n) if c >= 5 else None,
            "balanced_accuracy": float(np.mean([r for r in recall if r is not None])),
            "log_loss": float(nll[h] / n),
            "per_class_accuracy": dict(zip(class_names, recall)),
            "confusion_matrix": cm.tolist(),
        })
    return out


def fold_standardization(weight, bias, mean, std):
    """A first layer that takes raw x, from one trained on standardized (x - mean) / std.

    weight (..., out, D), bias (..., out), mean and std (D,): numpy arrays or torch tensors,
    float64 for the arithmetic (the results are stored as float32 by the caller). Returns
    (weight / std, bias - (weight / std) @ mean), since w.(x - m)/s + b = (w/s).x + (b - (w/s).m).
    Used for logreg fits and for linear and mlp heads alike.
    """
    weight = weight / std                                                 # (..., out, D)
    return weight, bias - weight @ mean                                   # (..., out)


def fit_logreg(x: np.ndarray, y: np.ndarray, n_classes: int, C: float, max_iter: int = 1000,
               class_weight: str | None = None,
               standardize: tuple[np.ndarray, np.ndarray] | None = None
               ) -> tuple[dict[str, torch.Tensor], dict]:
    """Fit scikit-learn's LogisticRegression on x (N, D) and return it as the state_dict of an
    nn.Linear(D, n_classes) on raw x, plus facts (n_iter, converged). A ConvergenceWarning
    becomes converged=False.

    `standardize` (mean, std), each (D,) float64: fit on (x - mean) / std, as scikit-learn's
    StandardScaler would, and fold that into the layer (`fold_standardization`). A binary fit's
    single row w becomes rows -w/2, +w/2 (their softmax is the sigmoid); classes absent from y
    get weight 0 and bias -1e4 (never predicted).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y)) < 2:
        raise UserError("logreg needs training rows of at least two classes")
    if standardize is not None:
        # float32 in place with float64 operands: StandardScaler.transform's arithmetic, and
        # one (N, D) float32 copy rather than a float64 one.
        x = np.array(x, dtype=np.float32)
        x -= standardize[0]
        x /= standardize[1]
    clf = LogisticRegression(C=C, max_iter=max_iter, class_weight=class_weight)
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", category=ConvergenceWarning)
        clf.fit(x, y)
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn(w.message, w.category, stacklevel=2)
    coef, intercept = clf.coef_.astype(np.float64), clf.intercept_.astype(np.float64)
    if standardize is not None:
        coef, intercept = fold_standardization(coef, intercept, *standardize)
    if len(clf.classes_) == 2:
        coef = np.vstack([-coef / 2, coef / 2])
        intercept = np.hstack([-intercept / 2, intercept / 2])
    weight, bias = np.zeros((n_classes, coef.shape[1])), np.full(n_classes, -1e4)
    weight[clf.classes_], bias[clf.classes_] = coef, intercept
    state = {"weight": torch.from_numpy(weight.astype(np.float32)),
             "bias": torch.from_numpy(bias.astype(np.float32))}
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return state, {"n_iter": int(np.max(clf.n_iter_)), "converged": converged}


def build_head(meta: dict) -> nn.Module:
    """The plain module a saved head's state_dict loads into, from its JSON metadata."""
    kind, d, c = meta["kind"], int(meta["in_dim"]), int(meta["n_classes"])
    if kind in LINEAR_LAYER:
        return nn.Linear(d, c)
    if kind != "mlp":
        raise UserError(f"unknown head kind {kind!r} in head metadata: expected one of "
                        f"{', '.join(HEADS)}")
    act = _ACTIVATION[meta["activation"]][1]
    dims, layers = [d, *meta["hidden"], c], []
    for i, o in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(i, o), act()]
    return nn.Sequential(*layers[:-1])


RETRAIN = "retrain it with `pipeline train-head`, or pick another run"
WRITE_FIX = "free some space or write the runs to another -o folder"


def save_head(run_dir: str | Path, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write run_dir/head.pt (state_dict) and run_dir/head.json (metadata, plain JSON), each
    under a temporary name first: a full disk leaves the previous files, never a torn one."""
    run_dir = make_folder(run_dir, "run folder", WRITE_FIX)
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    # Serialized in memory, then written by Python: torch.save reports a full disk as a
    # RuntimeError ("unexpected pos ..."), which would read as a bug; a head is small.
    buf = io.BytesIO()
    torch.save(tensors, buf)
    write_file(run_dir / "head.pt", lambda tmp: tmp.write_bytes(buf.getbuffer()), WRITE_FIX)
    write_text(run_dir / "head.json", json.dumps({"format": HEAD_FORMAT, **meta}, indent=2),
               WRITE_FIX)
    return run_dir


def read_head_meta(path: str | Path) -> dict:
    """The metadata in head.json at `path`, checked: every field a reader of heads relies on is
    there with its type, else one UserError naming the file, the field and the fix."""
    path = Path(path)
    f = Fields(path, "head metadata", RETRAIN)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    return check_head_meta(f.load(text), f)


def check_head_meta(meta: dict, f: Fields) -> dict:
    """The checks of `read_head_meta` on parsed metadata (`f` names the file)."""
    if meta.get("format") != HEAD_FORMAT:
        raise UserError(f"{f.path} has head format {meta.get('format')!r}, this tool reads "
                        f"{HEAD_FORMAT!r}: retrain the head")
    kind = f.need(meta, "kind", one_of(*HEADS))
    in_dim = f.need(meta, "in_dim", POSITIVE)
    n_classes = f.need(meta, "n_classes", POSITIVE)
    sizes = Check(lambda v: isinstance(v, list) and all(POSITIVE.ok(h) for h in v),
                  "a list of positive integers")
    if kind == "mlp":
        f.need(meta, "hidden", Check(lambda v: sizes.ok(v) and bool(v),
                                     "a non-empty list of positive integers"))
        f.need(meta, "activation", one_of(*ACTIVATIONS))
    else:
        f.may(meta, "hidden", optional(sizes))
        f.may(meta, "activation", optional(STRING))
    f.may(meta, "class_names", optional(Check(
        lambda v: STRINGS.ok(v) and len(v) == n_classes,
        f"a list of n_classes ({n_classes}) strings")))
    for key in ("run_id", "input"):
        f.may(meta, key, optional(STRING))
    for key in ("hyperparameters", "config", "standardization", "versions"):
        f.may(meta, key, optional(OBJECT))
    for key in ("best_epoch", "weights_epoch"):
        f.may(meta, key, optional(COUNT))
    cache = f.may(meta, "cache", optional(OBJECT))
    if cache is not None:
        for key in ("backbone", "weights", "weights_sha256", "layer", "precision", "dtype"):
            f.need(cache, key, NAME, "cache.")
        for key in ("layer_alias", "pool", "path", "fingerprint"):
            f.may(cache, key, optional(STRING), "cache.")
        f.need(cache, "feature_dim", Check(lambda v: v == in_dim,
                                           f"in_dim ({in_dim}), the width the head takes"),
               "cache.")
        mf.check_preprocessing(f, f.need(cache, "preprocessing", OBJECT, "cache."),
                               "cache.preprocessing.")
    data = f.may(meta, "data", optional(OBJECT))
    if data is not None:
        for key in ("train_rows", "val_rows"):
            f.may(data, key, optional(COUNT), "data.")
        val = data.get("val")
        # Only the kinds this version writes are checked; others are said, not guessed, by
        # the report (which cannot tell where such validation rows came from).
        if isinstance(val, dict) and val.get("kind") == "hash_split":
            f.need(val, "fraction", Check(lambda v: NUMBER.ok(v) and 0 < v < 1,
                                          "a number in (0, 1)"), "data.val.")
        elif isinstance(val, dict) and val.get("kind") == "cache":
            f.need(val, "path", NAME, "data.val.")
    return meta


def load_head(path: str | Path) -> tuple[nn.Module, dict]:
    """(module in eval mode, metadata) of a saved head: a run folder, its head.pt or head.json.

    The weights are read with torch.load(weights_only=True): no code is unpickled. A damaged
    head.json or head.pt is one UserError naming the file.
    """
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    meta_path, weights_path = run_dir / "head.json", run_dir / "head.pt"
    if not meta_path.is_file() or not weights_path.is_file():
        raise UserError(f"{path} is not a trained head: expected head.json and head.pt in "
                         f"{run_dir} (a run folder written by `pipeline train-head`)")
    meta = read_head_meta(meta_path)
    module = build_head(meta)
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated zip, not a torch file, unpickling refused, ...
        raise UserError(f"{weights_path}: damaged head weights ({_reason(e)}): "
                        f"{RETRAIN}") from None
    try:
        module.load_state_dict(state)
    except Exception as e:   # missing or unexpected tensors, other shapes, not a dict
        raise UserError(f"{weights_path}: damaged head weights: they do not fit the head "
                        f"{meta_path.name} describes ({_reason(e)}): {RETRAIN}") from None
    return module.eval(), meta


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


__all__ = ["HeadStack", "StackedOptimizer", "build_head", "evaluate", "fit_logreg",
           "fold_standardization", "load_head", "read_head_meta", "save_head"]
