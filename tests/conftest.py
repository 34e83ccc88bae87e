"""Shared fixtures: tiny synthetic image folders, random-init VGG16, no network."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def make_folder(root: Path, classes=("cat", "dog"), per_class=6, size=(40, 48), seed=0) -> Path:
    """An ImageFolder tree of random RGB PNGs: root/<class>/<i>.png."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i:03d}.png")
    return root


def error_lines(text: str) -> list[str]:
    """The `Error:` lines of a command's output."""
    return [line for line in text.splitlines() if line.startswith("Error:")]


def one_error_line(text: str, *words) -> str:
    """The output's only `Error:` line, without its prefix, holding every word; no traceback."""
    assert "Traceback" not in text, text[-3000:]
    errors = error_lines(text)
    assert len(errors) == 1, text[-3000:]
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0][len("Error: "):]


def one_line(result, *words, exit_code: int = 1) -> str:
    """A CliRunner result that ended with `exit_code` and exactly one `Error:` line, last,
    holding every word (the line is returned, prefix included)."""
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    one_error_line(result.output, *words)
    line = error_lines(result.output)[0]
    assert result.output.rstrip().endswith(line), result.output
    return line


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "images")


class FailOnBatch:
    """Stands in for a backbone: runs it, but calls `action` (default: raise) at batch `n`,
    so an extraction fails mid-run with some batches committed."""

    def __init__(self, inner, n: int = 2, action=None):
        self.inner, self.n, self.calls = inner, n, 0
        self.action = action or self._raise

    @staticmethod
    def _raise():
        raise RuntimeError("simulated failure in batch 2")

    def to(self, *args, **kwargs):
        return self

    def __call__(self, x):
        self.calls += 1
        if self.calls == self.n:
            self.action()
        return self.inner(x)


def failing_build(module, **kwargs):
    """A stand-in for pipeline.extract's `build_model` whose model is wrapped in FailOnBatch."""
    build = module.build_model
    return lambda config: (lambda m, i: (FailOnBatch(m, **kwargs), i))(*build(config))
