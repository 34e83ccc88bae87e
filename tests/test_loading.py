"""--device names: checked against the machine's GPUs, one line for each mistake."""
from __future__ import annotations

import pytest
import torch

from cache.errors import UserError
from pipeline._loading import resolve_device


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with CUDA devices 0 and 1 (nothing is run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("name, expected", [("cpu", "cpu"), ("cuda", "cuda"),
                                            ("cuda:1", "cuda:1"), ("auto", "cuda")])
def test_devices_of_the_machine_resolve(two_gpus, name, expected):
    assert resolve_device(name) == torch.device(expected)


def test_a_gpu_index_past_the_machines_is_one_line(two_gpus):
    with pytest.raises(UserError, match=r"^--device cuda:2: this machine has 2 CUDA devices "
                                        r"\(cuda:0 to cuda:1\); pick one of them, or cuda$"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["cuda:x", "gpu", "cuda:", "cuda:-1", "mps", " cpu"])
def test_malformed_names_are_one_line(two_gpus, name):
    with pytest.raises(UserError,
                       match=rf"^unknown device {name!r}: use auto, cpu, cuda or cuda:N$"):
        resolve_device(name)


def test_cuda_without_cuda_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="CUDA is not available here; use --device cpu or auto"):
        resolve_device("cuda:0")
