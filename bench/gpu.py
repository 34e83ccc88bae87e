"""GPU extraction: images/s at 224 px under float32, bfloat16 and float16 autocast, GPU memory,
and how far bfloat16/float16 features are from float32 ones.

    bash bench/gpu.sh            # on a machine with a CUDA GPU; under 5 minutes
    .venv/bin/python bench/gpu.py --device cpu --images 32 --size 32 --batch-size 16   # dry run

2048 JPEGs (256x256) extracted at --size px by `extract` (decoding in DataLoader workers, pinned
memory, channels-last, autocast), and the bare forward on uint8 batches already on the device
(same batch, same autocast): images/s, their ratio, peak GPU memory of the extract run, and the
relative error of each row's bfloat16/float16 features against float32 ones (median, max).
Random-init weights (no download).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])   # the repo, not bench/, on the path
from bench._common import (alternate, bench_parser, machine, median, quiet,  # noqa: E402
                           scratch, table)
from bench.extract import make_images  # noqa: E402
from cache import CacheReader  # noqa: E402
from pipeline import ExtractConfig, extract  # noqa: E402
from pipeline.backbone import build_backbone  # noqa: E402
from pipeline.preprocessing import to_float_batch  # noqa: E402

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
    ap = bench_parser(__doc__, repeats=2, threads=None)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=-1)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("no CUDA GPU visible to torch: run on a GPU machine, or --device cpu for a dry run")
    quiet()
    tmp = scratch("bench-gpu-")
    src = tmp / "images"
    make_images(src, args.images)
    base = dict(weights="none", image_size=args.size, batch_size=args.batch_size, dtype="float32",
                device=args.device, workers=args.workers, overwrite=True, progress=False)
    extract(src, tmp / "warm.h5", ExtractConfig(**base, precision="float32"))   # warm caches
    cuda = args.device.startswith("cuda")
    runs = {p: {"extract": [], "bare": [], "mem": []} for p in PRECISIONS}

    def case(p: str):
        def run() -> None:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            (tmp / f"{p}.h5").unlink(missing_ok=True)          # compute every row again
            s = extract(src, tmp / f"{p}.h5", ExtractConfig(**base, precision=p))
            runs[p]["mem"].append(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)
            runs[p]["extract"].append(s.images_per_s)
            runs[p]["bare"].append(bare_forward(args, p))
        return run

    alternate({p: case(p) for p in PRECISIONS}, args.repeats)
    rows, feats = [], {}
    for p in PRECISIONS:
        r = runs[p]
        with CacheReader(tmp / f"{p}.h5") as reader:
            feats[p] = reader.load_features()
        ratio = median([e / b for e, b in zip(r["extract"], r["bare"])])
        rows.append([p, median(r["extract"]), median(r["bare"]), ratio, f"{max(r['mem']):.2f}"])
    ref = feats["float32"]
    for row, p in zip(rows, PRECISIONS):
        rel = np.linalg.norm(feats[p] - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
        row += [f"{np.median(rel):.2e}", f"{rel.max():.2e}"]
    print(f"machine: {machine()}")
    print(f"{args.images} JPEGs 256x256 -> vgg16 fc7 at {args.size}px, batch {args.batch_size}, "
          f"device {args.device}, random-init weights; {args.repeats} alternated rounds, medians "
          "(extract / bare: median of per-round ratios)\n")
    print(table(["precision", "extract images/s", "bare forward images/s", "extract / bare",
                 "peak GPU GiB", "rel. error vs fp32 (median)", "(max)"], rows))


if __name__ == "__main__":
    main()
