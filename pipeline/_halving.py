"""Successive halving inside one stacked pass (`train_head --halving`): at epochs r, 2r, 4r, ...
the worse part of the heads still training (by validation loss) stops, and the pass goes on with
a smaller stack of the rest, so the compute goes to the heads that are winning.

    rungs(epochs=20, heads=64, rate=0.5)          # [1, 2, 4, 8, 16]
    keep = survivors(val_losses, rate)             # positions in the stack that go on
    stack, opt = shrink(stack, opt, keep)

A head's updates depend only on its own parameters, the shared batch order and the shared
dropout noise (`heads.HeadStack`), so the survivors train as they would in a pass without the
stopped heads (up to float rounding in the shared matmul).
"""
from __future__ import annotations

import math

import torch

from .heads import HeadStack, StackedOptimizer


def rungs(epochs: int, heads: int, rate: float) -> list[int]:
    """The epochs after which heads stop: r, 2r, 4r, ... before the last epoch, with r the
    largest first rung that leaves room for the halvings that bring `heads` down to one."""
    if heads < 2:
        return []
    cuts = math.ceil(math.log(heads) / -math.log(1 - rate))       # halvings down to one head
    r = max(1, epochs // 2 ** cuts)
    return [r * 2 ** i for i in range(cuts) if r * 2 ** i < epochs]


def survivors(val_losses: list[float], rate: float) -> list[int]:
    """Positions of the heads that go on: all but the floor(rate * n) of highest validation loss
    (NaN highest), at least one; in stack order."""
    n = len(val_losses)
    drop = min(n - 1, math.floor(rate * n))
    order = sorted(range(n), key=lambda h: (math.isnan(val_losses[h]), val_losses[h], h))
    return sorted(order[:n - drop])


@torch.no_grad()
def shrink(stack: HeadStack, opt: StackedOptimizer, keep: list[int]
           ) -> tuple[HeadStack, StackedOptimizer]:
    """A stack and optimizer of the heads at positions `keep` only, with their parameters and
    optimizer state (moments, momentum buffers, step count)."""
    idx = torch.tensor(keep)
    small = HeadStack(stack.in_dim, stack.n_classes, seeds=[0] * len(keep),
                      dropouts=[stack.dropouts[i] for i in keep], hidden=stack.hidden,
                      activation=stack.activation)
    for new, old in zip(small.params, stack.params):
        new.copy_(old[idx])
    small_opt = StackedOptimizer(small.params, opt.kind, opt.lr[idx].tolist(),
                                 opt.weight_decay[idx].tolist(), momentum=opt.momentum,
                                 betas=opt.betas, eps=opt.eps)
    small_opt.state = [{k: v[idx].clone() for k, v in st.items()} for st in opt.state]
    small_opt.steps = opt.steps
    return small, small_opt


@torch.no_grad()
def keep_heads(record: HeadStack, stack: HeadStack, positions: list[int], alive: list[int]
               ) -> None:
    """Copy the heads at `positions` of `stack` into `record` (all the pass's heads), where
    alive[p] is the pass index of the head at stack position p."""
    for p in positions:
        record.set_head(alive[p], stack.head_state(p))
