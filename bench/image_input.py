"""How far a model exported with `--input image` (tensor resize inside the model) lands from the
head on the cached features (Pillow resize at extraction): the largest logit difference, as a
fraction of the largest logit, over every image of a few datasets and backbones.

    .venv/bin/python bench/image_input.py [--threads 1]

Datasets: scikit-learn's digits (8x8 grey, upsampled 4x), and random-size noise and smooth
gradient images (downsampled); backbones vgg16 (fc7) and resnet18 (penultimate), random-init;
linear and logreg heads. This is what export's parity tolerance for image input is set from.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import apply_threads, bench_parser  # noqa: E402
from cache import CacheReader  # noqa: E402
from pipeline.config import ExportConfig, ExtractConfig, TrainConfig  # noqa: E402
from pipeline.demo import write_digits  # noqa: E402
from pipeline.export import export  # noqa: E402
from pipeline.head_file import load_head  # noqa: E402
from pipeline.images import read_image  # noqa: E402
from pipeline.extract import extract  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.train_head import train_head  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402


def photos(root: Path, n: int = 40, seed: int = 0) -> Path:
    """Two classes of random-size images: noise, and smooth gradients with noise."""
    rng = np.random.default_rng(seed)
    for c in ("noise", "smooth"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            h, w = int(rng.integers(40, 300)), int(rng.integers(40, 300))
            if c == "noise":
                a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            else:
                yy, xx = np.mgrid[0:h, 0:w]
                a = np.stack([(xx * 255 / w), (yy * 255 / h), ((xx + yy) * 127 / (h + w))], -1)
                a = np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / c / f"{i:03d}.png")
    return root


def measure(source: Path, work: Path, backbone: str, layer: str, size: int) -> list[tuple]:
    cache = work / f"{backbone}.h5"
    extract(source, cache, ExtractConfig(backbone=backbone, weights="none", layer=layer,
                                         image_size=size, workers=0, progress=False))
    summary = train_head(cache, work / f"runs-{backbone}",
                         TrainConfig(head=("linear", "logreg"), epochs=10, val_fraction=0.0))
    out = []
    with CacheReader(cache) as r:
        feats = torch.from_numpy(r.load_features())
        paths, root = r.paths, Path(r.manifest["source_root"])
    for row in summary.leaderboard:
        model_path = work / f"{backbone}-{row['head']}.pt2"
        export(row["path"], model_path, ExportConfig(input="image", parity_check=False))
        model, (head, _) = load_model(model_path), load_head(row["path"])
        with torch.no_grad():
            expected = head(feats)                                            # (N, C)
        got = torch.cat([model.run(TF.pil_to_tensor(read_image(root / p)[0])[None])
                         for p in paths])
        diff = float((got - expected).abs().max())
        same = float((got.argmax(1) == expected.argmax(1)).float().mean())
        out.append((backbone, row["head"], len(paths), diff, float(expected.abs().max()), same))
    return out


def main() -> None:
    ap = bench_parser(__doc__.splitlines()[0], threads=1)
    args = ap.parse_args()
    apply_threads(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        digits, _ = write_digits(tmp / "digits", per_class=8)
        sets = {"digits 8x8 -> 32 px": digits, "random-size images -> 32 px": photos(tmp / "ph")}
        print(f"{'dataset':30s} {'backbone':9s} {'head':7s} {'images':>6s} {'max|diff|':>10s} "
              f"{'max|logit|':>10s} {'ratio':>7s} {'same top-1':>10s}")
        for name, source in sets.items():
            for backbone, layer in (("vgg16", "fc7"), ("resnet18", "penultimate")):
                work = tmp / f"{name[:6]}-{backbone}"
                work.mkdir()
                for b, head, n, diff, top, same in measure(source, work, backbone, layer, 32):
                    print(f"{name:30s} {b:9s} {head:7s} {n:6d} {diff:10.3g} {top:10.3g} "
                          f"{diff / top:7.2%} {same:10.1%}")


if __name__ == "__main__":
    main()
