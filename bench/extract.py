"""Extraction efficiency: `pipeline extract` from image files against the bare forward pass.

    .venv/bin/python bench/extract.py [--images 256] [--size 64] [--repeats 3]

A: the bare backbone forward over uint8 tensors already in memory (no decoding, no
writing), B: extract() from JPEG files to an HDF5 cache (decoding in DataLoader workers,
writing in a thread), same batch size, cut and input size. Alternated, median of repeats.
Also float16 against float32 storage: file size and speed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import alternate, machine, median, table  # noqa: E402
from pipeline import ExtractConfig, extract  # noqa: E402
from pipeline.backbone import Preprocessing, build_backbone, to_float_batch  # noqa: E402


def make_images(root: Path, n: int) -> None:
    """n photo-sized (256x256) JPEGs of smooth noise: decoding costs what real photos cost."""
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
        img.filter(ImageFilter.GaussianBlur(3)).save(root / f"c{i % 4}" / f"{i:05d}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layer", default="fc7")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    src = tmp / "images"
    make_images(src, args.images)
    cfg = dict(weights="none", image_size=args.size, batch_size=args.batch_size,
               layer=args.layer, overwrite=True, progress=False)
    model, info = build_backbone("vgg16", "none", args.layer, args.size)
    pre = Preprocessing.from_dict(info["preprocessing"])
    paths = sorted(src.rglob("*.jpg"))
    tensors = torch.stack([pre(Image.open(p).convert("RGB")) for p in paths])   # (N, 3, S, S) uint8

    def bare() -> None:
        with torch.inference_mode():
            for k in range(0, len(tensors), args.batch_size):
                model(to_float_batch(tensors[k:k + args.batch_size]))

    stats = {}

    def run_extract(dtype: str):
        def case() -> float:
            out = tmp / f"{dtype}.h5"
            out.unlink(missing_ok=True)   # extract everything each time
            s = extract(src, out, ExtractConfig(**cfg, dtype=dtype))
            stats[dtype] = (out.stat().st_size, s.seconds)
            return len(paths) / s.images_per_s   # compute phase: decode + forward + write
        return case

    times = alternate({"bare forward": bare, "extract float16": run_extract("float16"),
                       "extract float32": run_extract("float32")}, args.repeats)
    base = median(times["bare forward"])
    rows = []
    for name, ts in times.items():
        t = median(ts)
        size = stats.get(name.split()[-1], (None,))[0]
        rows.append([name, len(paths) / t, base / t, f"{size / 2**20:.2f}" if size else "-"])
    print(f"machine: {machine()}")
    print(f"{len(paths)} JPEGs 256x256 -> vgg16 {args.layer} at {args.size}px, batch "
          f"{args.batch_size}, median of {args.repeats} alternated runs\n")
    print(table(["case", "images/s", "vs bare forward", "cache MiB"], rows))
    print("\n(extract times exclude model building and file hashing, which happen once per run; "
          f"whole-run seconds for float16: {stats['float16'][1]:.1f})")


if __name__ == "__main__":
    main()
