"""GPU extraction: images/s at 224 px under float32, bfloat16 and float16 autocast, GPU memory,
and how far bfloat16/float16 features are from float32 ones.

    bash bench/gpu.sh            # on a machine with a CUDA GPU; under 5 minutes
    .venv/bin/python bench/gpu.py --device cpu --images 32 --size 64   # a dry run anywhere
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import machine, table  # noqa: E402
from bench.extract import make_images  # noqa: E402
from cache import CacheReader  # noqa: E402
from pipeline import ExtractConfig, extract  # noqa: E402
from pipeline.backbone import build_backbone, to_float_batch  # noqa: E402

PRECISIONS = ("float32", "bfloat16", "float16")


def bare_forward(args, precision: str) -> float:
    """Images/s of the forward pass alone on uint8 batches already on the device."""
    model, _ = build_backbone("vgg16", "none", "fc7", args.size)
    device = torch.device(args.device)
    model = model.to(device)
    x = torch.randint(0, 256, (args.batch_size, 3, args.size, args.size), dtype=torch.uint8,
                      device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = (torch.autocast(device.type, dtype=getattr(torch, precision))
           if precision != "float32" else torch.autocast(device.type, enabled=False))
    steps = max(2, args.images // args.batch_size)
    with torch.inference_mode(), ctx:
        model(to_float_batch(x))   # warm-up (cuDNN picks its algorithms)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(to_float_batch(x))
        _sync(device)
    return steps * args.batch_size / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=-1)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    src = tmp / "images"
    make_images(src, args.images)
    base = dict(weights="none", image_size=args.size, batch_size=args.batch_size, dtype="float32",
                device=args.device, workers=args.workers, overwrite=True, progress=False)
    extract(src, tmp / "warm.h5", ExtractConfig(**base, precision="float32"))   # warm caches
    rows, feats = [], {}
    for p in PRECISIONS:
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        s = extract(src, tmp / f"{p}.h5", ExtractConfig(**base, precision=p))
        mem = (torch.cuda.max_memory_allocated() / 2**30) if args.device.startswith("cuda") else 0
        bare = bare_forward(args, p)
        with CacheReader(tmp / f"{p}.h5") as r:
            feats[p] = r.load_features()
        rows.append([p, s.images_per_s, bare, s.images_per_s / bare, f"{mem:.2f}"])
    ref = feats["float32"]
    for row, p in zip(rows, PRECISIONS):
        rel = np.linalg.norm(feats[p] - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
        row += [f"{np.median(rel):.2e}", f"{rel.max():.2e}"]
    print(f"machine: {machine()}")
    print(f"{args.images} JPEGs 256x256 -> vgg16 fc7 at {args.size}px, batch {args.batch_size}, "
          f"device {args.device}, random-init weights\n")
    print(table(["precision", "extract images/s", "bare forward images/s", "extract / bare",
                 "peak GPU GiB", "rel. error vs fp32 (median)", "(max)"], rows))


if __name__ == "__main__":
    main()
