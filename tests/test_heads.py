"""pipeline.heads: a stack of K heads trains exactly like K separate torch.optim runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cache.errors import UserError
from pipeline.config import ACTIVATIONS, OPTIMIZERS
from pipeline.head_file import build_head, load_head, save_head
from pipeline.heads import HeadStack, StackedOptimizer, fold_standardization

D, C, B = 12, 5, 8


def _batches(n_steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, D, generator=g), torch.randint(0, C, (B,), generator=g))
            for _ in range(n_steps)]


def _reference_module(stack: HeadStack, k: int) -> nn.Module:
    meta = {"kind": "mlp" if stack.hidden else "linear", "in_dim": D, "n_classes": C,
            "hidden": list(stack.hidden), "activation": stack.activation}
    module = build_head(meta)
    module.load_state_dict(stack.head_state(k))
    return module


@pytest.mark.parametrize("hidden", [(), (7,), (6, 4)])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_stack_equals_separate_torch_optim_runs(hidden, kind):
    lrs, wds, smooth = [1e-2, 3e-2, 1e-1], [0.0, 1e-2, 0.1], [0.0, 0.1, 0.2]
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    stack = HeadStack(D, C, seeds=[0, 1, 2], hidden=hidden, activation="tanh")
    opt = StackedOptimizer(stack.params, kind, lrs, wds, momentum=0.9)
    refs = [_reference_module(stack, k) for k in range(3)]
    ref_opts = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=wd) if kind == "adamw"
                else torch.optim.SGD(m.parameters(), lr=lr, weight_decay=wd, momentum=0.9)
                for m, lr, wd in zip(refs, lrs, wds)]
    for x, y in _batches(6):
        losses = stack.losses(stack.forward(x), y, torch.tensor(smooth), weight)
        losses.sum().backward()
        opt.step()
        for k, (m, o) in enumerate(zip(refs, ref_opts)):
            ref_loss = F.cross_entropy(m(x), y, weight=weight, label_smoothing=smooth[k])
            torch.testing.assert_close(losses[k], ref_loss, rtol=1e-5, atol=1e-6)
            o.zero_grad()
            ref_loss.backward()
            o.step()
            for name, t in m.state_dict().items():
                torch.testing.assert_close(stack.head_state(k)[name], t, rtol=1e-5, atol=1e-6)


def test_init_depends_only_on_the_head_seed():
    alone = HeadStack(D, C, seeds=[7], hidden=(4,))
    among = HeadStack(D, C, seeds=[3, 7, 9], hidden=(4,), dropouts=[0.5, 0.0, 0.2])
    for name, t in alone.head_state(0).items():
        assert torch.equal(among.head_state(1)[name], t)
    bound = 1 / D ** 0.5     # nn.Linear's default init: U(-1/sqrt(D), 1/sqrt(D))
    assert alone.weights[0].abs().max() <= bound and alone.weights[0].std() > bound / 3


def test_inactive_heads_do_not_move():
    stack = HeadStack(D, C, seeds=[0, 1])
    opt = StackedOptimizer(stack.params, "adamw", [0.1, 0.1], [0.1, 0.1])
    before = stack.head_state(1)
    x, y = _batches(1)[0]
    stack.losses(stack.forward(x), y).sum().backward()
    opt.step(active=torch.tensor([True, False]))
    assert torch.equal(stack.head_state(1)["weight"], before["weight"])
    fresh = HeadStack(D, C, [0]).head_state(0)
    assert not torch.equal(stack.head_state(0)["weight"], fresh["weight"])


def test_dropout_masks_are_shared_noise_and_scaled():
    stack = HeadStack(D, C, seeds=[0, 0, 0], dropouts=[0.0, 0.5, 0.5])
    x = torch.rand(B, D) + 0.1
    logits = stack.forward(x, noise=torch.Generator().manual_seed(1))
    u = torch.rand(B, D, generator=torch.Generator().manual_seed(1))
    ref = F.linear(x * (u >= 0.5) / 0.5, stack.weights[0][1], stack.biases[0][1])
    torch.testing.assert_close(logits[:, 1], ref)
    torch.testing.assert_close(logits[:, 2], ref)                    # same p, same mask
    torch.testing.assert_close(logits[:, 0], F.linear(x, stack.weights[0][0], stack.biases[0][0]))
    # A head alone draws the same noise as in the stack.
    alone = HeadStack(D, C, seeds=[0], dropouts=[0.5])
    torch.testing.assert_close(alone.forward(x, noise=torch.Generator().manual_seed(1))[:, 0], ref)


def test_mlp_hidden_dropout_matches_a_manual_forward():
    stack = HeadStack(D, C, seeds=[0, 1], dropouts=[0.25, 0.5], hidden=(6,), activation="relu")
    x = torch.randn(B, D)
    out = stack.forward(x, noise=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    u_in, u_h = torch.rand(B, D, generator=g), torch.rand(B, 6, generator=g)
    for k, p in enumerate([0.25, 0.5]):
        h = F.relu(F.linear(x * (u_in >= p) / (1 - p), stack.weights[0][k], stack.biases[0][k]))
        ref = F.linear(h * (u_h >= p) / (1 - p), stack.weights[1][k], stack.biases[1][k])
        torch.testing.assert_close(out[:, k], ref)


def test_saved_head_loads_back_weights_only(tmp_path):
    stack = HeadStack(D, C, seeds=[0, 1], hidden=(6, 4), activation="gelu")
    meta = {"kind": "mlp", "in_dim": D, "n_classes": C, "hidden": [6, 4], "activation": "gelu"}
    save_head(tmp_path / "run", stack.head_state(1), meta)
    state = torch.load(tmp_path / "run" / "head.pt", weights_only=True)
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    module, loaded = load_head(tmp_path / "run")
    assert loaded["format"] == "pipeline-head/1" and not module.training
    x = torch.randn(B, D)
    with torch.no_grad():
        torch.testing.assert_close(module(x), stack.forward(x)[:, 1])
    linear, _ = load_head(save_head(tmp_path / "lin", HeadStack(D, C, [0]).head_state(0),
                                    {"kind": "linear", "in_dim": D, "n_classes": C}) / "head.pt")
    assert isinstance(linear, nn.Linear)


def test_fold_standardization_makes_a_layer_on_raw_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * 0.05 + 3       # (B, D) raw
    mean, std = x.mean(0), x.std(0)
    w = torch.randn(4, C, D, generator=g, dtype=torch.float64)             # 4 stacked heads
    b = torch.randn(4, C, generator=g, dtype=torch.float64)
    on_standardized = torch.einsum("bd,kcd->bkc", (x - mean) / std, w) + b
    w2, b2 = fold_standardization(w, b, mean, std)
    torch.testing.assert_close(torch.einsum("bd,kcd->bkc", x, w2) + b2, on_standardized)
    # numpy arrays (logreg's coef_ and intercept_) fold the same way
    w3, b3 = fold_standardization(w[0].numpy(), b[0].numpy(), mean.numpy(), std.numpy())
    np.testing.assert_allclose(w3, w2[0].numpy())
    np.testing.assert_allclose(b3, b2[0].numpy())


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_configured_activation_trains_and_saves(activation, tmp_path):
    stack = HeadStack(D, C, seeds=[0], hidden=(5,), activation=activation)
    meta = {"kind": "mlp", "in_dim": D, "n_classes": C, "hidden": [5], "activation": activation}
    module, _ = load_head(save_head(tmp_path / activation, stack.head_state(0), meta))
    x = torch.randn(B, D)
    with torch.no_grad():
        torch.testing.assert_close(module(x), stack.forward(x)[:, 0])
    for kind in OPTIMIZERS:
        StackedOptimizer(stack.params, kind, [0.1], [0.0])          # every one is accepted


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(UserError, match="dropout"):
        HeadStack(D, C, seeds=[0], dropouts=[1.0])
    with pytest.raises(UserError, match="activation"):
        HeadStack(D, C, seeds=[0], hidden=(3,), activation="swish")
    with pytest.raises(UserError, match="optimizer"):
        StackedOptimizer([], "lbfgs", [], [])
    with pytest.raises(UserError, match="not a trained head"):
        load_head(tmp_path)
