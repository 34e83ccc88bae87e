"""The saved k-NN head: its module, rebuilt from head.json by `head_file.build_head`, and the
rounding bound that export's parity check uses. No search or training code here: loading a
k-NN head for export or predict needs only this module.

    head = KNNHead(in_dim, n_classes, rows, k, temperature)   # buffers filled by load_state_dict
    logits = head(x)                 # (B, D) raw features -> (B, C) log vote shares
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FLOOR = 1e-7            # smallest vote share: a class no neighbour votes for gets log(FLOOR)

class KNNHead(nn.Module):
    """(B, D) raw features -> (B, C) logits: the weighted vote of the k most similar of `rows`
    training rows, held as buffers `features` (rows, D) float16, L2-normalized, and
    `labels` (rows,) int64."""

    def __init__(self, in_dim: int, n_classes: int, rows: int, k: int, temperature: float):
        super().__init__()
        self.n_classes, self.k, self.temperature = n_classes, k, temperature
        self.register_buffer("features", torch.zeros(rows, in_dim, dtype=torch.float16))
        self.register_buffer("labels", torch.zeros(rows, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = normalize(x) @ self.features.float().t()                        # (B, rows)
        top = s.topk(self.k, dim=1)                                         # (B, k), sorted
        return vote_logits(top.values, self.labels[top.indices], self.temperature,
                           self.n_classes)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, float32 (a zero row stays zero: similarity 0 to all)."""
    return F.normalize(x.float(), dim=1)


def vote_logits(sims: torch.Tensor, labels: torch.Tensor, temperature: float,
                n_classes: int) -> torch.Tensor:
    """(Q, C) log vote shares from the similarities (Q, k) of each query's k neighbours,
    most similar first, and their labels (Q, k). Weights are exp((s - s_1) / T): the shift by
    the top similarity s_1 cancels in the shares and keeps exp in range for any T."""
    w = torch.exp((sims - sims[:, :1]) / temperature)                       # (Q, k)
    votes = torch.zeros(sims.shape[0], n_classes, dtype=w.dtype).scatter_add(1, labels, w)
    return torch.log((votes / votes.sum(1, keepdim=True)).clamp_min(FLOOR))  # (Q, C)


def parity_sigma(head: KNNHead, feats: torch.Tensor, eps: float, sigmas: float) -> torch.Tensor:
    """(B, C) standard deviation of each logit when every feature of feats (B, D) carries an
    independent relative error of size `eps`; inf for an image whose k-th and (k+1)-th
    neighbours are within `sigmas` such deviations of each other (rounding may swap them, and
    the vote jumps), which export's parity check then leaves out.

    A similarity s_j = x.t_j / |x| moves by (t_j - s_j x^).dx / |x| (first order); a logit
    log(V_c / V) by at most 2 max_j |ds_j| / T over the k voters."""
    x = feats.float()
    xh, norm = normalize(x), x.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (B, D), (B, 1)
    n = min(head.k + 1, len(head.features))
    top = (xh @ head.features.float().t()).topk(n, dim=1)                   # (B, n)
    t = head.features.float()[top.indices]                                  # (B, n, D)
    resid = (t - top.values[:, :, None] * xh[:, None, :]) * (x / norm)[:, None, :]
    sd = eps * resid.square().sum(2).sqrt()                                 # (B, n)
    logit_sd = 2 * sd[:, :head.k].max(1).values / head.temperature          # (B,)
    if n > head.k:
        gap = top.values[:, head.k - 1] - top.values[:, head.k]
        logit_sd[gap <= sigmas * (sd[:, head.k - 1] + sd[:, head.k])] = math.inf
    return logit_sd[:, None].expand(-1, head.n_classes)


__all__ = ["FLOOR", "KNNHead", "normalize", "parity_sigma", "vote_logits"]
