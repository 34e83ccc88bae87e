"""Augmented views: does caching K augmented views per image buy the accuracy that online
augmentation buys, and what does it cost?

    .venv/bin/python bench/augment.py [--per-class 15] [--views 1,4,8,16] [--epochs 30]
                                      [--threads 1]

Task: few training images (--per-class of each of scikit-learn's digits, 8x8 upscaled to 32 px),
and a test set where augmentation should matter: the other digits, each shifted, cropped and
flipped (RandomResizedCrop(scale=(0.6, 1)) and a horizontal flip with probability 0.5, drawn
once per image and saved). Backbone: random-init VGG16 to fc7 (no pretrained weights here).
For each K: extract the training images with --views K (the default spec: RandomResizedCrop,
RandomHorizontalFlip), train the same sweep of linear heads (lr x weight decay), and report the
test accuracy of the head that validation picks (a path-hash tenth of the training images),
and the sweep's mean and best test accuracy.

Costs, measured in the same run: extraction seconds and cache MiB against K; train-head epoch
seconds with K views against one; and the tutorial's loop with online augmentation (decode,
augment, frozen VGG16 to fc7, new fc8, backward, SGD step: a few steps timed, extrapolated to
the sweep's epochs and heads) against extracting K views once and training the sweep.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])   # the repo, not bench/, on the path
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from bench._common import (EpochTimes, bench_parser, apply_threads, machine,  # noqa: E402
                           quiet, scratch, table)
from pipeline.augment import DEFAULT_SPEC, Augment  # noqa: E402
from pipeline.backbone import build_backbone  # noqa: E402
from pipeline.preprocessing import Preprocessing, to_float_batch  # noqa: E402
from pipeline.config import ExtractConfig, TrainConfig  # noqa: E402
from pipeline.extract import extract  # noqa: E402
from pipeline.images import read_image  # noqa: E402
from pipeline.sources import find_images  # noqa: E402
from pipeline.train_head import train_head  # noqa: E402

SWEEP = dict(head=("linear",), lr=(1e-3, 3e-3, 1e-2), weight_decay=(0.0, 1e-2, 1e-1))


def write_digits(root: Path, per_class: int, seed: int = 0) -> tuple[Path, Path]:
    """train/<digit>/*.png (the first per_class of each digit, plain) and test/<digit>/*.png
    (the others, shifted, cropped and flipped once each), 32 x 32 grey."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    distort = v2.Compose([v2.RandomResizedCrop(32, scale=(0.6, 1.0)), v2.RandomHorizontalFlip()])
    torch.manual_seed(seed)
    seen = np.zeros(10, np.int64)
    for n, (image, target) in enumerate(zip(digits.images, digits.target)):
        pixels = np.round(image * 255 / 16).astype(np.uint8)
        img = Image.fromarray(pixels, mode="L").resize((32, 32), Image.Resampling.BILINEAR)
        part = "train" if seen[target] < per_class else "test"
        seen[target] += 1
        if part == "test":
            img = v2.functional.to_pil_image(distort(v2.functional.pil_to_tensor(img)))
        (root / part / str(target)).mkdir(parents=True, exist_ok=True)
        img.save(root / part / str(target) / f"{n:04d}.png")
    return root / "train", root / "test"


def tutorial_seconds_per_image(train: Path, steps: int = 3, batch: int = 32) -> float:
    """The tutorial's step with online augmentation, timed after a warm-up."""
    backbone, info = build_backbone("vgg16", "none", "fc7", 32)
    pre = Preprocessing.from_dict(info["preprocessing"])
    aug = Augment.parse(DEFAULT_SPEC, pre)
    head = nn.Linear(info["feature_dim"], 10)
    opt = torch.optim.SGD(head.parameters(), lr=1e-3, momentum=0.9)
    images = find_images(train)
    rng = np.random.default_rng(0)

    def step() -> None:
        rows = rng.integers(0, len(images.paths), batch)
        x = torch.stack([aug(*read_image(images.absolute(i)), view=1 + int(rng.integers(99)))
                         for i in rows])
        y = torch.tensor([images.labels[i] for i in rows])
        loss = nn.functional.cross_entropy(head(backbone(to_float_batch(x))), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps / batch


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--per-class", type=int, default=15)
    ap.add_argument("--views", default="1,4,8,16")
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    apply_threads(args)
    quiet()
    tmp = scratch("bench-augment-")
    train, test = write_digits(tmp / "digits", args.per_class)
    cfg = dict(weights="none", layer="fc7", image_size=32, batch_size=32, workers=0,
               progress=False)
    test_cache = tmp / "test.h5"
    extract(test, test_cache, ExtractConfig(**cfg))
    rows, epoch_s = [], {}
    for k in [int(v) for v in args.views.split(",")]:
        cache = tmp / f"train-{k}.h5"
        t0 = time.perf_counter()
        extract(train, cache, ExtractConfig(**cfg, views=k))
        extract_s = time.perf_counter() - t0
        epochs = EpochTimes()
        summary = train_head(cache, tmp / f"runs-{k}", TrainConfig(
            **SWEEP, epochs=args.epochs, batch_size=32), test_path=test_cache,
            on_epoch=epochs)
        epoch_s[k] = statistics.median(epochs.seconds)
        tests = [r["test_acc"] for r in summary.leaderboard]
        rows.append([k, summary.leaderboard[0]["test_acc"], float(np.mean(tests)), max(tests),
                     extract_s, cache.stat().st_size / 2**20, epoch_s[k],
                     epoch_s[k] / epoch_s.get(1, epoch_s[k]), extract_s + summary.seconds])
    n_train = len(find_images(train).paths)
    heads = len(SWEEP["lr"]) * len(SWEEP["weight_decay"])
    tutorial = tutorial_seconds_per_image(train) * n_train * args.epochs * heads
    print(f"machine: {machine()}")
    print(f"{n_train} training digits ({args.per_class} a class), "
          f"{len(find_images(test).paths)} test digits shifted/cropped/flipped, 32 px, "
          f"random-init VGG16 fc7; {heads} linear heads x {args.epochs} epochs\n")
    print(table(["views", "test acc (picked by val)", "test acc mean", "test acc best",
                 "extract s", "cache MiB", "epoch s", "epoch vs 1 view",
                 "extract + sweep s"], rows))
    print(f"\ntutorial's loop with online augmentation, extrapolated from 3 timed steps: "
          f"{tutorial:.0f} s for the same sweep ({n_train} images x {args.epochs} epochs x "
          f"{heads} heads); the cached way with the most views: {rows[-1][-1]:.1f} s, "
          f"{tutorial / rows[-1][-1]:.0f}x less")


if __name__ == "__main__":
    main()
