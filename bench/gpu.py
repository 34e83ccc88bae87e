"""Extraction at the GPU's speed: `pipeline extract` (the whole command, defaults) against the
bare forward pass, for each backbone and each `--decode`; start-up seconds; peak GPU memory;
feature differences between decoders and precisions on real photos; 12 MP photo rate; predict rate.

    bash bench/gpu.sh             # one CUDA GPU, about 8 minutes
    bash bench/gpu.sh --dry-run   # the same script on the CPU at tiny sizes (about 2 minutes)

Images are made on the machine from scikit-learn's sample photos (crops, resized to 500x375,
JPEG q90; 12 MP: 4000x3000); random-init weights; nothing is downloaded. The bare forward runs
the default precision (float16 autocast on a GPU) on uint8 batches already on the device.
`extract` runs as its own process (`python -m cli extract`), so its wall time includes Python
start-up, imports, CUDA init and the model build: start-up = wall - compute phase (the images/s
of its summary line).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])   # the repo, not bench/, on the path
from bench._common import machine, quiet, scratch, table  # noqa: E402
from bench.decode import photos, write  # noqa: E402
from cache import CacheReader  # noqa: E402
from pipeline import ExtractConfig, extract  # noqa: E402
from pipeline._engine import resolve_precision  # noqa: E402
from pipeline.backbone import build_backbone  # noqa: E402
from pipeline.preprocessing import to_float_batch  # noqa: E402

BACKBONES = "vgg16,resnet50,vit_b_16,convnext_tiny,timm:vit_small_patch14_dinov2"
SUMMARY = re.compile(r": (\d+) rows .* ([\d.]+) images/s on (\S+)")


def bare_forward(backbone: str, size: int, batch: int, device: torch.device, steps: int) -> float:
    """Images/s of the forward pass alone, default precision, uint8 batches on the device."""
    model, _ = build_backbone(backbone, "none", "penultimate", size, "flatten")
    model = model.to(device).eval()
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    precision = resolve_precision("auto", device)
    ctx = (torch.autocast(device.type, dtype=getattr(torch, precision))
           if precision != "float32" else torch.autocast(device.type, enabled=False))
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), ctx:
        model(to_float_batch(x))                  # warm-up (cuDNN picks its algorithms)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(to_float_batch(x))
        _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def num(x: float) -> str:
    """A rate for the table: thousands separated, 3 significant digits below 100."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cli(*args: str) -> tuple[str, float]:
    """Run `python -m cli ARGS`; (stdout, wall seconds)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"pipeline {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout, wall


def extract_cli(src: Path, out: Path, backbone: str, size: int, decode: str, extra=()) -> dict:
    """The whole `pipeline extract` command: images/s of its compute phase, wall, start-up,
    peak GPU memory (read from nvidia-smi's view is not per-process: from torch inside)."""
    out.unlink(missing_ok=True)
    stdout, wall = cli("extract", str(src), "-o", str(out), "--backbone", backbone,
                       "--weights", "none", "--image-size", str(size), "--decode", decode,
                       "-q", *extra)
    m = SUMMARY.search(stdout)
    rows, rate = int(m.group(1)), float(m.group(2))
    compute = rows / rate if rate else 0.0
    return {"rate": rate, "wall": wall, "startup": wall - compute, "rows": rows}


def peak_memory(src: Path, out: Path, backbone: str, size: int, decode: str,
                device: torch.device) -> float:
    """GiB of GPU memory at the peak of an in-process extract (0 on the CPU)."""
    if device.type != "cuda":
        return 0.0
    torch.cuda.reset_peak_memory_stats()
    out.unlink(missing_ok=True)
    extract(src, out, ExtractConfig(backbone=backbone, weights="none", image_size=size,
                                    decode=decode, progress=False))
    return torch.cuda.max_memory_allocated() / 2**30


def feature_differences(root: Path, backbones: list[str], size: int, decoders: list[str],
                        precisions: list[str]) -> list[list]:
    """Relative L2 distance (median, max over images) of each decoder x precision's features
    from pil x float32's, on real photos."""
    src = root / "real"
    write(src / "a", photos(16, (500, 375), seed=7))
    rows = []
    for backbone in backbones:
        feats = {}
        for d in decoders:
            for p in precisions:
                out = root / f"real-{d}-{p}.h5"
                out.unlink(missing_ok=True)
                extract(src, out, ExtractConfig(backbone=backbone, weights="none", image_size=size,
                                                 decode=d, precision=p, dtype="float32",
                                                 progress=False))
                with CacheReader(out) as r:
                    feats[d, p] = r.load_features()                 # (N, D)
        ref = feats["pil", "float32"]
        for (d, p), f in feats.items():
            if (d, p) == ("pil", "float32"):
                continue
            rel = np.linalg.norm(f - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
            rows.append([backbone, d, p, f"{np.median(rel):.2e}", f"{rel.max():.2e}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dry-run", action="store_true",
                    help="on the CPU at tiny sizes: checks the script, measures nothing useful")
    ap.add_argument("--images", type=int, default=16384)
    ap.add_argument("--large", type=int, default=1024, help="12 MP JPEGs")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--backbones", default=BACKBONES)
    args = ap.parse_args()
    if args.dry_run:
        args.images, args.large, args.size = 16, 2, 32
        args.backbones = "resnet18"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type != "cuda" and not args.dry_run:
        ap.error("no CUDA GPU visible to torch: run on a GPU machine, or --dry-run")
    quiet()
    tmp = scratch("bench-gpu-")
    t_make = time.perf_counter()
    src = tmp / "images"
    for c in range(4):
        write(src / f"c{c}", photos(args.images // 4, (500, 375), seed=c))
    big = tmp / "large"
    write(big / "a", photos(args.large, (4000, 3000), seed=9))
    print(f"machine: {machine()}")
    print(f"{args.images} JPEGs 500x375 q90 (made in {time.perf_counter() - t_make:.0f} s), "
          f"{args.size} px, random-init weights, defaults, device {device}\n")
    decoders = ["cpu", "gpu"] if device.type == "cuda" else ["pil", "cpu"]
    backbones = args.backbones.split(",")
    rows = []
    for backbone in backbones:
        bare = bare_forward(backbone, args.size, 256 if device.type == "cuda" else 8, device,
                            steps=20 if device.type == "cuda" else 2)
        for d in decoders:
            e = extract_cli(src, tmp / "c.h5", backbone, args.size, d)
            mem = peak_memory(src, tmp / "m.h5", backbone, args.size, d, device) \
                if backbone == backbones[0] else float("nan")
            rows.append([backbone, d, num(bare), num(e["rate"]),
                         f"{e['rate'] / bare:.2f}", f"{e['wall']:.1f}", f"{e['startup']:.1f}",
                         f"{mem:.1f}"])
    print(table(["backbone", "--decode", "bare forward img/s", "extract img/s", "extract / bare",
                 "whole command s", "start-up s", "peak GPU GiB"], rows))

    big_rows, big_model = [], "resnet50" if not args.dry_run else "resnet18"
    for d in decoders + ["cpu --draft"]:
        name, extra = (d, ()) if " " not in d else ("cpu", ("--draft",))
        e = extract_cli(big, tmp / "big.h5", big_model, args.size, name, extra)
        big_rows.append([d, num(e["rate"])])
    print(f"\n{args.large} JPEGs of 12 MP (4000x3000), {big_model}:")
    print(table(["--decode", "images/s"], big_rows))

    precisions = ["float32", "float16", "bfloat16"] if device.type == "cuda" else ["float32"]
    diff = feature_differences(tmp, ["vgg16", "resnet50"] if not args.dry_run else ["resnet18"],
                               args.size, ["pil"] + [d for d in decoders if d != "pil"],
                               precisions)
    print("\nFeatures on real photos (16 crops of the sample photos) against pil + float32:")
    print(table(["backbone", "--decode", "precision", "rel. diff median", "max"], diff))

    print(f"\npredict --device {device.type}: {num(predict_rate(tmp, src, args, device))} images/s")


def predict_rate(tmp: Path, src: Path, args, device: torch.device) -> float:
    """images/s of `pipeline predict` (the whole command) with a resnet50 + linear head
    exported in torchvision format, over the photo-sized JPEGs."""
    backbone = "resnet50" if not args.dry_run else "resnet18"
    cache, runs, model = tmp / "p.h5", tmp / "runs", tmp / "model.pth"
    small = tmp / "train"
    for c in range(2):
        write(small / f"c{c}", photos(8, (500, 375), seed=20 + c))
    cli("extract", str(small), "-o", str(cache), "--backbone", backbone, "--weights", "none",
        "--image-size", str(args.size), "-q", "--overwrite")
    cli("train-head", str(cache), "-o", str(runs), "--epochs", "1")
    run = next(p for p in sorted(runs.iterdir()) if p.is_dir() and (p / "head.json").exists())
    cli("export", str(run), "-o", str(model), "--format", "torchvision", "--no-parity-check")
    t0 = time.perf_counter()
    cli("predict", str(model), str(src), "--device", device.type, "-q", "--format", "csv",
        "-o", str(tmp / "pred.csv"))
    return args.images / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
