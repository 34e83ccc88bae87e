"""`demo()`: the pipeline on scikit-learn's digits (1,797 real 8x8 images, no download).

Writes the digits as an image folder with a held-out test part, then runs the stages on it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from .config import ExtractConfig
from .extract import extract

log = logging.getLogger(__name__)


def write_digits(root: str | Path, test_every: int = 5) -> tuple[Path, Path]:
    """Write sklearn's digits as PNGs: root/train/<digit>/<n>.png and root/test/<digit>/<n>.png.

    Every `test_every`-th image (by index) is held out for testing: stable and stratified
    enough for ten balanced classes. Existing files are left as they are.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(root)
    for n, (image, target) in enumerate(zip(digits.images, digits.target)):
        part = "test" if n % test_every == 0 else "train"
        path = root / part / str(target) / f"{n:04d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.round(image * 255 / 16).astype(np.uint8)   # (8, 8), values 0..16
            Image.fromarray(pixels, mode="L").save(path)
    return root / "train", root / "test"


def pick_weights(backbone: str, weights: str | None) -> str:
    """`weights` if given; else the DEFAULT ImageNet weights when already downloaded; else none."""
    if weights:
        return weights
    url = torchvision.models.get_model_weights(backbone).DEFAULT.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    return "DEFAULT" if cached.is_file() else "none"


def demo(out_dir: str | Path = "demo-out", weights: str | None = None, image_size: int = 32,
         progress: bool | None = None) -> dict:
    """Run the pipeline on the digits under `out_dir`; returns what each stage did."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_dir, test_dir = write_digits(out_dir / "digits")
    chosen = pick_weights("vgg16", weights)
    config = ExtractConfig(weights=chosen, image_size=image_size, progress=progress)
    caches = {}
    for part, folder in (("train", train_dir), ("test", test_dir)):
        caches[part] = extract(folder, out_dir / f"{part}.h5", config)
    return {"weights": chosen, "random_weights": chosen == "none", "extract": caches}
