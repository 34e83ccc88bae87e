"""Decoders on the CPU: images/s of each `--decode` (pil: Pillow decode + Pillow resize; cpu:
libjpeg-turbo to a tensor + uint8 tensor resize; with and without --draft) on photo-sized
(500x375) and 12 MP JPEGs, and how far their features are from Pillow + the weights' own
transforms on real photos.

    .venv/bin/python bench/decode.py                      # ~2 min on 2 cores
    .venv/bin/python bench/decode.py --images 8 --repeats 1 --backbones resnet18   # quick

Real photos: scikit-learn's sample images (china.jpg, flower.jpg, 640x427) as JPEG q90 and
crops of them; the 12 MP ones are them upscaled to 4000x3000. One process, so images/s are per
core (workers multiply them alike). Features: random-init weights, relative L2 distance of each
image's feature row (median and max).
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

sys.path[0] = str(Path(__file__).resolve().parents[1])   # the repo, not bench/, on the path
from bench._common import (alternate, apply_threads, bench_parser, machine, median,  # noqa: E402
                           paired, quiet, table)
from pipeline._decode import Decoder  # noqa: E402
from pipeline.backbone import build_backbone  # noqa: E402
from pipeline.images import read_image  # noqa: E402
from pipeline.preprocessing import default_preprocessing, to_float_batch  # noqa: E402

DECODERS = {"pil": Decoder("pil"), "cpu": Decoder("cpu"), "cpu --draft": Decoder("cpu", True)}


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def photos(n: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """n JPEGs of `size` cut from the sample photos at random places and scales."""
    rng = np.random.default_rng(seed)
    samples = [Image.fromarray(a) for a in load_sample_images().images]
    out = []
    for i in range(n):
        img = samples[i % len(samples)]
        scale = rng.uniform(0.6, 1.0)
        w, h = int(img.width * scale), int(img.height * scale)
        x, y = rng.integers(0, img.width - w + 1), rng.integers(0, img.height - h + 1)
        out.append(jpeg(img.crop((x, y, x + w, y + h)).resize(size, Image.BICUBIC)))
    return out


def write(root: Path, files: list[bytes]) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(files):
        paths.append(root / f"{i:04d}.jpg")
        paths[-1].write_bytes(data)
    return paths


def rate(paths: list[Path], decoder: Decoder, pre) -> float:
    for p in paths:
        read_image(p, lambda fp: decoder.load(fp, pre))
    return None


def features(backbone: str, xs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model, _ = build_backbone(backbone, "none", "penultimate", None, "flatten")
    with torch.inference_mode():
        return {k: model(to_float_batch(x)) for k, x in xs.items()}      # (N, D) each


def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=1) / b.norm(dim=1)                         # (N,)


def main() -> None:
    ap = bench_parser(__doc__, repeats=3)
    ap.add_argument("--images", type=int, default=64, help="500x375 JPEGs timed")
    ap.add_argument("--large", type=int, default=4, help="12 MP JPEGs timed")
    ap.add_argument("--backbones", default="resnet50,vgg16")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-decode"))
    args = ap.parse_args()
    apply_threads(args)
    quiet()
    print(machine())
    pre = default_preprocessing("resnet50")
    sets = {"500x375": write(args.out / "small", photos(args.images, (500, 375))),
            "4000x3000": write(args.out / "large", photos(args.large, (4000, 3000), seed=1))}
    rows = []
    for name, paths in sets.items():
        times = alternate({k: (lambda d=d: rate(paths, d, pre)) for k, d in DECODERS.items()},
                          args.repeats)
        for k in DECODERS:
            rows.append([name, k, len(paths) / median(times[k]),
                         paired(times, "pil", k)])
    print(table(["JPEGs", "--decode", "images/s (1 process)", "x pil"], rows))

    # Features of real photos: the samples as they are, crops of them, and 12 MP ones.
    real = [jpeg(Image.fromarray(a)) for a in load_sample_images().images]
    real += photos(6, (500, 375), seed=2)
    big = photos(4, (4000, 3000), seed=3)
    xs = {}
    for k, d in DECODERS.items():
        xs[k] = torch.stack([d.load(io.BytesIO(b), pre) for b in real])
        xs[k + " 12MP"] = torch.stack([d.load(io.BytesIO(b), pre) for b in big])
    rows = []
    for backbone in args.backbones.split(","):
        f = features(backbone, xs)
        for k in ("cpu", "cpu --draft"):
            for suffix, what in (("", "photos"), (" 12MP", "12 MP photos")):
                r = rel(f[k + suffix], f["pil" + suffix])
                px = (xs[k + suffix].float() - xs["pil" + suffix].float()).abs().mean()
                rows.append([backbone, what, k, float(px), float(r.median()), float(r.max())])
    print(table(["backbone (random init)", "images", "--decode vs pil", "mean |pixel diff|",
                 "median rel. diff", "max rel. diff"], rows))


if __name__ == "__main__":
    main()
