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


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "images")
