"""pipeline.head_file: a saved head loads back as its plain module, damaged weights are one
UserError, and loading a head needs none of the training code."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from cache.errors import UserError
from pipeline.head_file import build_head, load_head, save_head

META = {"kind": "mlp", "in_dim": 5, "n_classes": 3, "hidden": [4], "activation": "tanh"}


def _saved(tmp_path):
    torch.manual_seed(0)
    module = build_head(META)
    return module, save_head(tmp_path / "run", module.state_dict(), META)


def test_a_saved_head_loads_back_with_its_weights(tmp_path):
    module, run = _saved(tmp_path)
    loaded, meta = load_head(run)
    assert isinstance(loaded, nn.Sequential) and isinstance(loaded[1], nn.Tanh)
    assert meta["hidden"] == [4] and not loaded.training
    x = torch.randn(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module(x))


@pytest.mark.parametrize("state, words", [
    ([1, 2], "they do not fit the head head.json describes (TypeError"),
    ({"0.weight": 1}, "they do not fit the head head.json describes (RuntimeError"),
    ({"0.weight": torch.zeros(2, 2)}, "they do not fit the head head.json describes"),
])
def test_weights_that_do_not_fit_are_one_user_error(tmp_path, state, words):
    _, run = _saved(tmp_path)
    torch.save(state, run / "head.pt")
    with pytest.raises(UserError, match="damaged head weights") as e:
        load_head(run)
    assert words in str(e.value) and "retrain it" in str(e.value)


def test_loading_a_head_imports_no_training_code(tmp_path):
    _, run = _saved(tmp_path)
    code = ("import sys; from pipeline.head_file import load_head; import pipeline.export; "
            f"load_head({str(run)!r}); "
            "print(sorted(m for m in ('sklearn', 'pipeline.heads') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
