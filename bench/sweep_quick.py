"""Head sweeps: one 32-head `train_head` pass against the same 32 heads trained one run each.

    .venv/bin/python bench/sweep_quick.py [--rows 10000] [--dim 4096] [--classes 10] [--epochs 2]

A synthetic float16 cache (rows x dim, Gaussian clusters) in a temporary folder. The sweep is
the issue's example grown to 32 heads: --lr 1e-3,1e-2 --weight-decay 0,1e-4 --dropout 0,0.5
--seed 0,1,2,3 (linear heads, AdamW, batch 256). A: one train_head() call training all 32
in one pass per batch; B: 32 train_head() calls of one head each (each loads the cache, as a
user running 32 commands would). Alternated, median of repeats; the ratio is B / A.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import alternate, machine, median, table  # noqa: E402
from cache.store import CacheWriter, partial_path  # noqa: E402
from pipeline.config import TrainConfig  # noqa: E402
from pipeline.train_head import train_head  # noqa: E402

AXES = {"lr": (1e-3, 1e-2), "weight_decay": (0.0, 1e-4), "dropout": (0.0, 0.5),
        "seed": (0, 1, 2, 3)}


def make_cache(path: Path, rows: int, dim: int, classes: int) -> Path:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, rows)
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    manifest = {"backbone": "vgg16", "weights": "none", "weights_sha256": "0" * 64,
                "layer": "classifier.4", "feature_dim": dim, "preprocessing": {},
                "precision": "float32", "dtype": "float16",
                "class_names": [f"c{i}" for i in range(classes)]}
    writer = CacheWriter.create(partial_path(path), manifest)
    for start in range(0, rows, 4096):
        y = labels[start:start + 4096]
        x = np.maximum(centers[y] + 2 * rng.normal(size=(len(y), dim)).astype(np.float32), 0)
        paths = [f"c{v}/{start + i}.jpg" for i, v in enumerate(y)]
        writer.commit(x.astype(np.float16), y.tolist(), paths, ["0" * 64] * len(y))
    return writer.finish(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    shared = dict(epochs=args.epochs, batch_size=256, val_fraction=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = make_cache(tmp / "train.h5", args.rows, args.dim, args.classes)
        heads = list(itertools.product(*AXES.values()))

        def sweep():
            return train_head(cache, tmp / "sweep", TrainConfig(**AXES, **shared))["seconds"]

        def singles():
            return sum(train_head(cache, tmp / "single", TrainConfig(
                **{k: (v,) for k, v in zip(AXES, values)}, **shared))["seconds"]
                for values in heads)

        times = alternate({f"A: one sweep of {len(heads)} heads": sweep,
                           f"B: {len(heads)} single-head runs": singles}, args.repeats)
    (name_a, a), (name_b, b) = ((k, median(v)) for k, v in times.items())
    print(machine())
    print(f"{args.rows} rows x {args.dim} float16, {args.classes} classes, {args.epochs} epochs, "
          f"batch 256, AdamW, median of {args.repeats}\n")
    print(table(["case", "seconds", "per head (s)"],
                [[name_a, a, a / len(heads)], [name_b, b, b / len(heads)]]))
    print(f"\n{len(heads)} single runs cost {b / a:.1f}x one {len(heads)}-head sweep")


if __name__ == "__main__":
    main()
