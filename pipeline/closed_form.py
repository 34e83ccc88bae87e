"""Ridge and LDA heads in closed form: one pass over the training rows, then every alpha (every
shrinkage) for about the price of one.

    stats = statistics(split.blocks(), split.labels, n_classes, shift, scale, dual=n < d)
    fits, loo = ridge(stats, alphas, split.blocks())       # [(weight (C, D), bias (C,))], LOO
    fits = lda(stats, shrinkages)
    fits = fit_heads(experiments, split, n_classes, (mean, std))   # what train_head calls

Both heads work on z = (x - shift) / scale (the training rows' mean and std: standardized, as
the other heads; `fold_standardization` then makes layers that take raw x). The pass sums, in
float64, the Gram matrix ZᵀZ (D, D), the class sums and counts; those are exact and additive
over chunks, so a streamed split gives the bits an in-RAM one gives. A cache of augmented views
contributes its plain view (view 0) of each image, as evaluation does.

Ridge is scikit-learn's RidgeClassifier: least squares on {-1, +1} one-vs-rest targets with an
unpenalized intercept (X and Y centred). With the centred Gram matrix Gc = V diag(lam) Vᵀ (one
eigendecomposition), W(alpha) = V diag(1 / (lam + alpha)) Vᵀ ZcᵀYc: the D x D work is paid once.
When N < D (few rows, wide cuts), the rows are kept and the N x N matrix Zc Zcᵀ = U diag(sig) Uᵀ
is decomposed instead: W(alpha) = Zcᵀ U diag(1 / (sig + alpha)) Uᵀ Yc, the same weights.

Ridge's leave-one-out residuals have a closed form (the hat matrix
H = 11ᵀ/N + Zc (Gc + alpha)⁻¹ Zcᵀ, residual / (1 - H_ii); scikit-learn's RidgeCV): `ridge`
returns, per alpha, the leave-one-out mean squared error on the targets and accuracy, with the
standardization held fixed. The primal form reads the rows a second time for the diagonal of H.

LDA is scikit-learn's LinearDiscriminantAnalysis(solver="lsqr", shrinkage=s): the pooled
within-class covariance S (class priors n_c / N times each class's biased covariance), shrunk
as (1 - s) S + s (trace S / D) I; coef_c = S_s⁻¹ mu_c, intercept_c = -mu_c . coef_c / 2 +
log(prior_c). One eigendecomposition of S serves every s; s = 0 takes the pseudo-inverse, as
lstsq does. The dual form decomposes the class-centred rows' N x N matrix (Woodbury).

A binary problem gives two rows of opposite sign (ridge) or the two classes' discriminants
(lda): their argmax is scikit-learn's sign, their difference its decision value. Classes absent
from the training rows get weight 0 and bias -1e4 (never predicted).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from cache.errors import UserError

ABSENT_BIAS = -1e4          # bias of a class with no training rows: never the argmax
_GROUP_BYTES = 2**25        # float64 rows gathered per Gram update (one large syrk, not many)


@dataclass
class Statistics:
    """Sufficient statistics of standardized training rows z (float64)."""
    n: int                           # rows
    counts: np.ndarray               # (C,) rows per class
    sums: np.ndarray                 # (C, D) per-class sums of z
    gram: np.ndarray | None          # (D, D) ZᵀZ (primal)
    rows: np.ndarray | None          # (N, D) Z, kept for the dual (N < D)
    labels: np.ndarray               # (N,)
    shift: np.ndarray                # (D,) z = (x - shift) / scale
    scale: np.ndarray                # (D,)

    @property
    def mean(self) -> np.ndarray:
        return self.sums.sum(0) / self.n                                   # (D,) ~0

    @property
    def present(self) -> np.ndarray:
        return np.flatnonzero(self.counts)


def check_classes(labels: np.ndarray, kind: str) -> None:
    """One line for a closed-form head on training rows of a single class."""
    if len(np.unique(labels)) < 2:
        raise UserError(f"{kind} needs training rows of at least two classes, these hold one: "
                        "train on images of at least two classes")


def statistics(blocks: Iterable[np.ndarray], labels: np.ndarray, n_classes: int,
               shift: np.ndarray, scale: np.ndarray, dual: bool) -> Statistics:
    """One pass over `blocks` (consecutive row blocks (B, D), any float dtype, whose labels are
    `labels` in order): class counts and sums, and ZᵀZ (primal) or the rows Z (dual)."""
    d = len(shift)
    sums, gram = np.zeros((n_classes, d)), None if dual else np.zeros((d, d))
    kept, group, have, start = [], [], 0, 0
    group_rows = max(1, _GROUP_BYTES // (8 * d))

    def flush():
        z = np.concatenate(group) if len(group) > 1 else group[0]
        if dual:
            kept.append(z)
        else:
            np.add(gram, z.T @ z, out=gram)                           # (D, D)
        group.clear()

    for block in blocks:
        z = (block.astype(np.float64) - shift) / scale                # (B, D)
        y = labels[start:start + len(z)]
        start += len(z)
        _add_class_sums(sums, z, y)
        group.append(z)
        have += len(z)
        if have >= group_rows:
            flush()
            have = 0
    if group:
        flush()
    counts = np.bincount(labels, minlength=n_classes)
    rows = (np.concatenate(kept) if len(kept) > 1 else kept[0]) if dual else None
    return Statistics(len(labels), counts, sums, gram, rows, labels, shift, scale)


def _add_class_sums(sums: np.ndarray, z: np.ndarray, y: np.ndarray) -> None:
    onehot = np.zeros((len(y), sums.shape[0]))
    onehot[np.arange(len(y)), y] = 1.0
    sums += onehot.T @ z                                               # (C, D)


def _targets(stats: Statistics) -> np.ndarray:
    """(N, C) the {-1, +1} one-vs-rest targets of the present classes (absent ones: -1)."""
    y = -np.ones((stats.n, len(stats.counts)))
    y[np.arange(stats.n), stats.labels] = 1.0
    return y


def ridge(stats: Statistics, alphas: Sequence[float], blocks: Iterable[np.ndarray] | None = None
          ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[dict]]:
    """RidgeClassifier(alpha) in z-space for every alpha: [(weight (C, D), bias (C,))], and per
    alpha {"loo_mse", "loo_acc"}. The primal form needs `blocks` (the rows again, as given to
    `statistics`) for the leave-one-out terms."""
    n, counts, zbar = stats.n, stats.counts, stats.mean
    ybar = (2 * counts - n) / n                                         # (C,)
    zty = 2 * (stats.sums - counts[:, None] * zbar).T                   # (D, C) ZcᵀYc
    alphas = np.asarray(alphas, np.float64)
    if stats.rows is None:
        lam, v = np.linalg.eigh(stats.gram - n * np.outer(zbar, zbar))
        lam = np.maximum(lam, 0.0)                                      # (D,)
        b = v.T @ zty                                                   # (D, C)
        coefs = [v @ (b / (lam + a)[:, None]) for a in alphas]          # (D, C) each
        loo = _loo_primal(stats, lam, v, b, alphas, blocks)
    else:
        zc = stats.rows - zbar                                          # (N, D)
        sig, u = np.linalg.eigh(zc @ zc.T)
        sig = np.maximum(sig, 0.0)                                      # (N,)
        q = u.T @ (_targets(stats) - ybar)                              # (N, C)
        p = zc.T @ u                                                    # (D, N)
        coefs = [p @ (q / (sig + a)[:, None]) for a in alphas]
        loo = _loo_dual(stats, sig, u, q, alphas)
    fits = [_absent(stats, c.T, ybar - zbar @ c) for c in coefs]
    return fits, loo


def _loo_dual(stats, sig, u, q, alphas) -> list[dict]:
    """Leave-one-out errors from the N x N decomposition: H_ii = 1/N + sum_j U_ij² sig_j /
    (sig_j + alpha), fitted Yc = U diag(sig / (sig + alpha)) Uᵀ Yc."""
    y = _targets(stats)
    ybar = y.mean(0)
    out = []
    for a in alphas:
        shrink = sig / (sig + a)                                        # (N,)
        fitted = u @ (q * shrink[:, None]) + ybar                       # (N, C)
        h = 1.0 / stats.n + (u * u) @ shrink                            # (N,)
        out.append(_loo_scores(stats, y, fitted, h))
    return out


def _loo_primal(stats, lam, v, b, alphas, blocks) -> list[dict]:
    """Leave-one-out errors from the D x D decomposition, one more pass over the rows:
    with A = Zc V, H_ii = 1/N + sum_j A_ij² / (lam_j + alpha), fitted Yc = A diag(1 / (lam +
    alpha)) Vᵀ ZcᵀYc."""
    n, c = stats.n, len(stats.counts)
    inv = 1.0 / (lam[:, None] + alphas[None, :])                        # (D, K)
    # Every alpha's fitted values in one product: (D, K * C).
    coef = (b[:, None, :] * inv[:, :, None]).reshape(len(lam), -1)
    ybar = (2 * stats.counts - n) / n
    sq, right, start = np.zeros((len(alphas), c)), np.zeros(len(alphas)), 0
    for block in blocks:
        z = (block.astype(np.float64) - stats.shift) / stats.scale - stats.mean
        y_idx = stats.labels[start:start + len(z)]
        start += len(z)
        a = z @ v                                                       # (B, D)
        h = 1.0 / n + (a * a) @ inv                                     # (B, K)
        fitted = (a @ coef).reshape(len(z), len(alphas), c) + ybar      # (B, K, C)
        y = -np.ones((len(z), c))
        y[np.arange(len(z)), y_idx] = 1.0
        err = (y[:, None, :] - fitted) / (1 - h)[:, :, None]            # (B, K, C)
        sq += (err ** 2).sum(0)
        pred = _argmax_present(stats, y[:, None, :] - err)              # (B, K)
        right += (pred == y_idx[:, None]).sum(0)
    present = stats.present
    return [{"loo_mse": float(sq[k, present].sum() / (n * len(present))),
             "loo_acc": float(right[k] / n)} for k in range(len(alphas))]


def _loo_scores(stats, y, fitted, h) -> dict:
    err = (y - fitted) / (1 - h)[:, None]                               # (N, C)
    pred = _argmax_present(stats, (y - err)[:, None, :])[:, 0]
    present = stats.present
    return {"loo_mse": float((err[:, present] ** 2).mean()),
            "loo_acc": float((pred == stats.labels).mean())}


def _argmax_present(stats, scores: np.ndarray) -> np.ndarray:
    """argmax over the present classes of scores (..., C)."""
    present = stats.present
    return present[np.argmax(scores[..., present], -1)]


def lda(stats: Statistics, shrinkages: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """LinearDiscriminantAnalysis(solver="lsqr", shrinkage=s) in z-space for every s:
    [(weight (C, D), bias (C,))]."""
    present, n, d = stats.present, stats.n, len(stats.shift)
    means = stats.sums[present] / stats.counts[present, None]           # (P, D)
    log_prior = np.log(stats.counts[present] / n)                       # (P,)
    eps = np.finfo(np.float64).eps
    fits = []
    if stats.rows is None:
        sums, counts = stats.sums[present], stats.counts[present]
        within = (stats.gram - (sums.T / counts) @ sums) / n               # (D, D) pooled
        lam, v = np.linalg.eigh(within)                                 # (D,), (D, D)
        lam = np.maximum(lam, 0.0)
        mu = np.trace(within) / d
        b = v.T @ means.T                                               # (D, P)
        for s in shrinkages:
            eig = (1 - s) * lam + s * mu
            inv = np.divide(1.0, eig, out=np.zeros_like(eig), where=eig > eps * eig.max())
            fits.append(_lda_layer(stats, v @ (b * inv[:, None]), means, log_prior))
        return fits
    xw = stats.rows - stats.sums[stats.labels] / stats.counts[stats.labels, None]   # (N, D)
    sig, u = np.linalg.eigh(xw @ xw.T)
    sig = np.maximum(sig, 0.0)                                          # (N,)
    mu = sig.sum() / (n * d)                                            # trace S / D
    p, r = xw.T @ u, u.T @ (xw @ means.T)                               # (D, N), (N, P)
    for s in shrinkages:
        a, c = (1 - s) / n, s * mu                                      # S_s = a XwᵀXw + c I
        if c > 0:      # Woodbury: S_s⁻¹ M = M / c - Xwᵀ U diag(a / (c (a sig + c))) Uᵀ Xw M
            coef = means.T / c - p @ (r * (a / (c * (a * sig + c)))[:, None])
        else:          # pseudo-inverse: Xwᵀ U diag(1 / (a sig²)) Uᵀ Xw M over sig > 0
            # numpy's rank cutoff: Xw Xwᵀ squares the rows' rounding, so its null space reads
            # as eigenvalues near max(N, D) eps sig_max, not 0
            rank = sig > max(n, d) * eps * sig.max()
            g = np.divide(1.0, a * sig ** 2, out=np.zeros_like(sig), where=rank)
            coef = p @ (r * g[:, None])
        fits.append(_lda_layer(stats, coef, means, log_prior))
    return fits


def _lda_layer(stats, coef, means, log_prior):
    """coef (D, P) -> (weight (C, D), bias (C,)) with the discriminants' intercepts."""
    weight = coef.T                                                     # (P, D)
    bias = -0.5 * np.einsum("pd,pd->p", means, weight) + log_prior
    full_w = np.zeros((len(stats.counts), weight.shape[1]))
    full_b = np.full(len(stats.counts), ABSENT_BIAS)
    full_w[stats.present], full_b[stats.present] = weight, bias
    return full_w, full_b


def _absent(stats, weight, bias):
    """Classes without training rows: weight 0, bias ABSENT_BIAS."""
    absent = stats.counts == 0
    weight, bias = weight.copy(), bias.copy()
    weight[absent], bias[absent] = 0.0, ABSENT_BIAS
    return weight, bias


def fit_heads(group: Sequence, split, n_classes: int,
              moments: tuple[np.ndarray, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """Every ridge and lda experiment of `group` (`_sweep.Experiment`s) on the training split
    (in RAM or streamed: `split.blocks()`), standardized by moments = (mean, std) (D,):
    [(weight (C, D), bias (C,), facts)] in group order, layers that take raw features."""
    from .heads import fold_standardization

    for kind in dict.fromkeys(e.kind for e in group):
        check_classes(split.labels, kind)
    mean, std = moments
    dual = len(split.labels) < len(mean)
    stats = statistics(split.blocks(), split.labels, n_classes, mean, std, dual)
    alphas = [e.alpha for e in group if e.kind == "ridge"]
    shrinkages = [e.shrinkage for e in group if e.kind == "lda"]
    ridge_fits, loo = ridge(stats, alphas, split.blocks()) if alphas else ([], [])
    fits = {"ridge": iter(zip(ridge_fits, loo)),
            "lda": iter((f, {}) for f in (lda(stats, shrinkages) if shrinkages else []))}
    out = []
    for e in group:
        (weight, bias), facts = next(fits[e.kind])
        weight, bias = fold_standardization(weight, bias, mean, std)
        out.append((weight, bias, {"solver": "dual" if dual else "primal", **facts}))
    return out


__all__ = ["Statistics", "check_classes", "fit_heads", "lda", "ridge", "statistics"]
