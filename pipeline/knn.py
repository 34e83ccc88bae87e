"""The weighted k-nearest-neighbour probe on cached features (DINO's k-NN evaluation): no training.

    pipeline train-head train.h5 -o runs/ --head knn --k 10,20,100,200 --temperature 0.07
    head, meta = head_file.load_head("runs/knn-k20-T0.07-.../")  # a knn_head.KNNHead
    logits = head(x)                 # (B, D) raw features -> (B, C) log vote shares

Features are L2-normalized; a query's k most cosine-similar training rows vote for their class
with weight exp(s / T). That is scikit-learn's KNeighborsClassifier(n_neighbors=k,
metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / T)), since the cosine
distance d is 1 - s. The logits are log(votes_c / sum of votes), floored at log(1e-7) for the
classes no neighbour votes for: their softmax is scikit-learn's predict_proba.

Every (k, T) of a sweep for the price of the largest k: each query chunk's similarities to the
training rows are one matrix product per block of training rows (read from RAM, or streamed
from HDF5 chunk by chunk when the training features exceed --max-memory), merged into the
top max(k); each (k, T) is then scored from those. The saved head is its training rows (the
L2-normalized features in float16, and their labels): every run of a sweep holds the same
ones, so its head.pt is written once and hard-linked into the other run folders.

Without validation data, the runs are measured on the training rows leaving each row out of
its own neighbours (leave-one-out), so that a row does not vote for itself.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from cache.errors import UserError

from ._feature_splits import Context, Split
from ._records import Result
from ._sweep import Experiment
from .heads import evaluate
from .knn_head import normalize, vote_logits

BANK_ROWS = 4096        # training rows per similarity block at most (HDF5 chunks joined)


def check_rows(sweep: list[Experiment], train_rows: int) -> None:
    """Refuse a k larger than the training rows, before anything is trained."""
    ks = [e.k for e in sweep if e.kind == "knn"]
    if ks and max(ks) > train_rows:
        raise UserError(f"--k {max(ks)} is more neighbours than the {train_rows} training rows: "
                        f"use k <= {train_rows}, or train on a larger cache")


# ------------------------------------------------------------------------------- train-head

def fit_knn(group: list[Experiment], ctx: Context):
    """Every (k, T) of `group` scored on val and test (and on the training rows, leaving each
    out, when there is no validation data) from one top-max(k) search per split. Returns the
    runs as `_records.Result`s sharing one state (the training rows) and one `shared` dict,
    so that their head.pt is written once."""
    kmax = max(e.k for e in group)
    finals = [{} for _ in group]
    for split in (ctx.train if ctx.val is None else None, ctx.val, ctx.test):
        if split is not None:
            scored = _scored(split, ctx, group, kmax, leave_out=split is ctx.train)
            for f, m in zip(finals, evaluate(_Given(len(group)), scored, ctx.class_names)):
                f[split.role] = m
    features = torch.cat([normalize(torch.from_numpy(b)).half()
                          for b in ctx.train.blocks()])                       # (N, D) float16
    state = {"features": features, "labels": torch.from_numpy(ctx.train.labels.astype(np.int64))}
    shared: dict = {}
    return [Result(e, state, [], None, finals[h],
                   {"k": e.k, "temperature": e.temperature, "bank_rows": len(features)},
                   shared=shared) for h, e in enumerate(group)]


class _Given:
    """`heads.evaluate` reads every head's logits through `stack.forward(x)`; the k-NN scores
    come already computed, (B, R, C) for R runs, so this stack hands them through."""

    def __init__(self, k: int):
        self.k = k

    @staticmethod
    def forward(logits: torch.Tensor) -> torch.Tensor:
        return logits


def _scored(split: Split, ctx: Context, group: list[Experiment], kmax: int, leave_out: bool
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits (Q, R, C) of the R runs of `group`, labels (Q,)) for each query group of the
    split's rows, in file order."""
    c, dim, budget = len(ctx.class_names), ctx.train.reader.feature_dim, ctx.cfg.max_memory // 4
    kmax = min(kmax, len(ctx.train.rows))
    # A quarter of --max-memory for a block of training rows (float32, up to BANK_ROWS rows,
    # at least one HDF5 chunk), another for the queries (float32), their similarities to
    # a block, the running top-k (values and indices) and every run's logits (with the
    # log-softmax `evaluate` takes of them).
    block = max(ctx.train.reader.chunk_rows, min(BANK_ROWS, budget // (4 * dim)))
    rows = max(1, budget // (4 * dim + 4 * block + 12 * (kmax + block) + 8 * len(group) * c))
    train_labels = torch.from_numpy(ctx.train.labels.astype(np.int64))   # (N,)
    start = 0
    for x, y in split.batches(rows):
        own = torch.arange(start, start + len(y)) if leave_out else None
        sims, idx = top_neighbours(normalize(x), _bank(ctx.train, block), kmax, own)  # (Q, K)
        start += len(y)
        labels = train_labels[idx]
        yield torch.stack([vote_logits(sims[:, :e.k], labels[:, :e.k], e.temperature, c)
                           for e in group], 1), y


def _bank_block(block: np.ndarray) -> torch.Tensor:
    """Training rows as the saved head holds them: L2-normalized, rounded to float16, as float32."""
    return normalize(torch.from_numpy(block)).half().float()


def _bank(train: Split, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, block (n, D) float32 as `_bank_block`) over the training rows in file order,
    HDF5 chunks joined into blocks of about `rows` rows (fewer, larger matrix products and
    top-k merges)."""
    start, parts, have = 0, [], 0
    for block in train.blocks():
        parts.append(block)
        have += len(block)
        if have >= rows:
            yield start, _bank_block(np.concatenate(parts))
            start, parts, have = start + have, [], 0
    if parts:
        yield start, _bank_block(np.concatenate(parts))


def top_neighbours(queries: torch.Tensor, blocks, k: int, own: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, row indices), each (Q, k), most similar first, of the k training rows
    nearest each of the normalized `queries` (Q, D), over `blocks` of (first row, (n, D)
    normalized rows). `own` (Q,): each query's own training row, left out (similarity -inf)."""
    q = len(queries)
    best_s = torch.empty(q, 0)
    best_i = torch.empty(q, 0, dtype=torch.int64)
    for start, block in blocks:
        s = queries @ block.t()                                             # (Q, n)
        if own is not None:
            hit = (own >= start) & (own < start + len(block))
            s[hit.nonzero().flatten(), own[hit] - start] = -math.inf
        cand = torch.cat([best_s, s], 1)                                    # (Q, K + n)
        top = cand.topk(min(k, cand.shape[1]), dim=1)
        kept = best_s.shape[1]
        best_i = torch.where(top.indices < kept,
                             best_i.gather(1, top.indices.clamp_max(max(kept - 1, 0)))
                             if kept else top.indices, top.indices - kept + start)
        best_s = top.values
    return best_s, best_i


__all__ = ["check_rows", "fit_knn", "top_neighbours"]
