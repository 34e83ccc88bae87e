"""Whole `pipeline train-head` commands: ridge over 32 alphas against one alpha, LDA over 8
shrinkages, and a 64-head SGD sweep with --halving against the same sweep in full.

    .venv/bin/python bench/closed_form.py [--rows 10000] [--dim 4096] [--epochs 8] [--repeats 2]
                                          [--threads 1]

The caches are bench/_common.synthetic_cache's (float16 fc7-like features, 10 classes; a
validation cache of the same problem, --val-rows). Each case is one `python -m cli train-head`
process, timed from outside (start-up, loading, the moments pass, training, evaluation and
records included), into an empty runs folder; cases alternate, --repeats rounds; seconds are
medians, ratios medians of per-round ratios. `--threads N` sets OMP_NUM_THREADS for the
command (torch's and numpy's threads). Ridge: alphas log-spaced 1e-2..1e6 (the one-alpha case
takes the 17th of them); LDA: shrinkages 0..1; the 64 heads: the SGD grid of bench/sweep.py
(8 lrs x 4 weight decays x seeds 0, 1), --epochs epochs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])   # the repo, not bench/, on the path
import numpy as np  # noqa: E402

from bench._common import machine, median, paired, scratch, synthetic_cache, table  # noqa: E402
from bench.sweep import LRS, WDS  # noqa: E402

ALPHAS = np.logspace(-2, 6, 32).tolist()
SHRINKAGES = (0.0, 0.01, 0.03, 0.1, 0.2, 0.4, 0.7, 1.0)


def _list(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=10000, help="training rows")
    ap.add_argument("--val-rows", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=8, help="epochs of the 64-head sweeps")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS; 0: the default")
    args = ap.parse_args()
    tmp = scratch("bench-closed-form-")
    train = synthetic_cache(tmp / "train.h5", args.rows, args.dim)
    val = synthetic_cache(tmp / "val.h5", args.val_rows, args.dim, split=1)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    sgd = ["--head", "linear", "--optimizer", "sgd", "--lr", _list(LRS), "--weight-decay",
           _list(WDS), "--seed", "0,1", "--epochs", str(args.epochs)]
    cases = {"ridge1": ["--head", "ridge", "--alpha", f"{ALPHAS[16]:g}"],
             "ridge32": ["--head", "ridge", "--alpha", _list(ALPHAS)],
             "lda8": ["--head", "lda", "--shrinkage", _list(SHRINKAGES)],
             "full64": sgd, "halving64": [*sgd, "--halving"]}
    times = {name: [] for name in cases}
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, extra in cases.items():
            out = tmp / name
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "cli", "train-head", str(train), "--val",
                                   str(val), "-o", str(out), "--json", *extra], env=env,
                                  capture_output=True, text=True, cwd=Path(__file__).parents[1])
            times[name].append(time.perf_counter() - t0)
            if done.returncode:
                sys.exit(f"{name} failed:\n{done.stderr}")
            best[name] = max(r["val_acc"] for r in json.loads(done.stdout)["leaderboard"])
    t = {name: median(ts) for name, ts in times.items()}
    print(f"machine: {machine()} (the commands: OMP_NUM_THREADS={args.threads or 'default'})")
    print(f"train {args.rows} x {args.dim} float16 (10 classes), val {args.val_rows} rows; "
          f"{args.repeats} alternated rounds: seconds are medians, ratios medians of per-round "
          "ratios\n")
    rows = [["ridge, 1 alpha", t["ridge1"], 1.0, best["ridge1"]],
            [f"ridge, {len(ALPHAS)} alphas", t["ridge32"], paired(times, "ridge32", "ridge1"),
             best["ridge32"]],
            [f"lda, {len(SHRINKAGES)} shrinkages", t["lda8"], paired(times, "lda8", "ridge1"),
             best["lda8"]],
            [f"64 SGD heads, {args.epochs} epochs", t["full64"], paired(times, "full64", "ridge1"),
             best["full64"]],
            ["64 SGD heads, --halving", t["halving64"], paired(times, "halving64", "ridge1"),
             best["halving64"]]]
    print(table(["train-head command", "s", "vs ridge 1 alpha", "best val"], rows))
    ratio = paired(times, "ridge32", "ridge1")
    print(f"\ngoal: {len(ALPHAS)} alphas take at most 1.5x one alpha (whole command): "
          f"{ratio:.2f}x ({'met' if ratio <= 1.5 else 'NOT met'})")
    half = paired(times, "halving64", "full64")
    ok = best["halving64"] >= best["full64"] - 0.01 and half <= 0.6
    print(f"goal: --halving finds a head within one point of the full sweep's best in at most "
          f"0.6x the time: {best['halving64']:.4f} against {best['full64']:.4f}, {half:.2f}x "
          f"({'met' if ok else 'NOT met'})")


if __name__ == "__main__":
    main()
