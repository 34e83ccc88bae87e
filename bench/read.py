"""Cache reading: head-training epochs from RAM against streamed from HDF5, the raw read rate
against numpy reading the same bytes from a .npy file, and peak memory while streaming a cache
larger than the memory bound.

    .venv/bin/python bench/read.py [--rows 20000] [--epochs 3] [--repeats 5] [--bound-mib 32] [--threads 1]

A synthetic float16 cache (rows x 4096, 10 classes; see bench/_common.synthetic_cache) and the
same array saved with numpy.save. Alternated; medians of --repeats rounds, ratios medians of
per-round ratios:

  train from RAM      train_head, 1 linear AdamW head, batch 256, default --max-memory (the
                      cache fits): features loaded once, epochs shuffle rows in RAM
  train streamed      the same with --max-memory --bound-mib (below the cache size): whole
                      HDF5 chunks in shuffled order, rows shuffled within a window of chunks
  read HDF5 chunks    CacheReader.iter_chunks() over every row (float16, as stored)
  read .npy           numpy.load of the same bytes

Epoch seconds are what train_head reports per epoch to its on_epoch callback (shuffle,
batches, steps), median over epochs and rounds. Files are read from the page cache (just
written; nothing here can drop it), so the read rates are CPU/memory-bound, not disk-bound.
Peak memory: each case runs once more in a fresh subprocess; its peak RSS (getrusage) minus its
RSS after imports.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])   # the repo, not bench/, on the path
import numpy as np  # noqa: E402

from bench._common import (EpochTimes, bench_parser, alternate, apply_threads,  # noqa: E402
                           machine, median, paired, peak_rss_bytes, quiet, scratch, spread,
                           synthetic_cache, table)
from cache import CacheReader  # noqa: E402

MIB = 2 ** 20


def train(cache: Path, runs: Path, epochs: int, max_memory: int | None) -> dict:
    """One head on `cache`; returns epoch seconds and train_head's memory plan."""
    from pipeline.config import TrainConfig
    from pipeline.train_head import train_head

    extra = {} if max_memory is None else {"max_memory": max_memory}
    ep = EpochTimes()
    s = train_head(cache, runs, TrainConfig(epochs=epochs, batch_size=256, val_fraction=0.0,
                                            **extra), on_epoch=ep)
    return {"epochs": ep.seconds, "memory": s.memory, "train_acc": s.leaderboard[0]["train_acc"]}


def child(cache: Path, runs: Path, max_memory: int | None) -> None:
    """Subprocess body: one 1-epoch training, JSON line with RSS before and at peak."""
    import pipeline.train_head  # noqa: F401  (imports count as baseline, not as training)

    quiet()
    before = peak_rss_bytes()
    out = train(cache, runs, 1, max_memory)
    print(json.dumps({"rss_before": before, "rss_peak": peak_rss_bytes(), **out}))


def main() -> None:
    ap = bench_parser(__doc__, repeats=5)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--bound-mib", type=int, default=32, help="--max-memory of the streamed case")
    ap.add_argument("--child", nargs=3, metavar=("CACHE", "RUNS", "MAX_MEMORY"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    apply_threads(args)
    if args.child:
        cache, runs, bound = args.child
        return child(Path(cache), Path(runs), None if bound == "default" else int(bound))
    quiet()
    tmp = scratch("bench-read-")
    cache = synthetic_cache(tmp / "train.h5", args.rows, args.dim)
    with CacheReader(cache) as r:
        array = r.features[: r.n_rows]                     # (N, D) float16
    np.save(tmp / "features.npy", array)
    nbytes, bound = array.nbytes, args.bound_mib * MIB
    if bound >= nbytes:
        ap.error(f"--bound-mib {args.bound_mib} must be below the cache's {nbytes / MIB:.0f} MiB")
    del array
    epochs: dict[str, list[float]] = {"ram": [], "stream": []}
    plans: dict[str, dict] = {}

    def training(name: str, max_memory: int | None):
        def case() -> float:
            out = train(cache, tmp / name, args.epochs, max_memory)
            epochs[name] += out["epochs"]
            plans[name] = out["memory"]
            return median(out["epochs"])
        return case

    def read_hdf5() -> float:
        t0, total = time.perf_counter(), 0
        with CacheReader(cache) as r:
            for _, _, block in r.iter_chunks():
                total += block.nbytes
        assert total == nbytes
        return time.perf_counter() - t0

    def read_npy() -> float:
        t0 = time.perf_counter()
        assert np.load(tmp / "features.npy").nbytes == nbytes
        return time.perf_counter() - t0

    times = alternate({"ram": training("ram", None), "stream": training("stream", bound),
                       "hdf5": read_hdf5, "npy": read_npy}, args.repeats)
    mem = {name: _child(cache, tmp / f"mem-{name}", b, args.threads)
           for name, b in (("ram", "default"), ("stream", str(bound)))}

    ram_epoch, stream_epoch = median(epochs["ram"]), median(epochs["stream"])
    hdf5_s, npy_s = median(times["hdf5"]), median(times["npy"])
    rows = [
        ["train from RAM (1 head)", "epoch", ram_epoch, 1.0, args.rows / ram_epoch, "-",
         _mib(mem["ram"]["rss_peak"] - mem["ram"]["rss_before"]), plans["ram"]["train"]],
        [f"train streamed, --max-memory {args.bound_mib} MiB", "epoch", stream_epoch,
         paired(times, "stream", "ram"), args.rows / stream_epoch, "-",
         _mib(mem["stream"]["rss_peak"] - mem["stream"]["rss_before"]),
         f"{plans['stream']['train']}, window {plans['stream']['window_chunks']} chunks"],
        ["read HDF5 chunks (CacheReader.iter_chunks)", "whole file", hdf5_s,
         paired(times, "hdf5", "npy"),
         args.rows / hdf5_s, f"{nbytes / MIB / hdf5_s:,.0f}", "-", "-"],
        ["read .npy (numpy.load)", "whole file", npy_s, 1.0, args.rows / npy_s,
         f"{nbytes / MIB / npy_s:,.0f}", "-", "-"],
    ]
    print(f"machine: {machine()}")
    print(f"cache {args.rows} x {args.dim} float16 = {nbytes / MIB:.0f} MiB (page cache, warm); "
          f"{args.epochs} epochs per training, {args.repeats} alternated rounds: medians\n")
    print(table(["case", "unit", "seconds", "ratio", "rows/s", "MiB/s", "peak RSS over baseline MiB",
                 "plan"], rows))
    print(f"\nratio: streamed epoch / RAM epoch, HDF5 read / numpy read, medians of per-round "
          f"ratios. spread (s): RAM epoch "
          f"{spread(epochs['ram'])}, streamed epoch {spread(epochs['stream'])}, HDF5 "
          f"{spread(times['hdf5'])}, npy {spread(times['npy'])}")
    s = mem["stream"]
    print(f"memory, fresh subprocess per case, 1 epoch: streaming the {nbytes / MIB:.0f} MiB cache "
          f"under a {args.bound_mib} MiB bound peaked {_mib(s['rss_peak'] - s['rss_before'])} MiB "
          f"over the process's {_mib(s['rss_before'])} MiB after imports (train_head's own count "
          f"of feature bytes held: {_mib(s['memory']['peak_feature_bytes'])} MiB); from RAM: "
          f"{_mib(mem['ram']['rss_peak'] - mem['ram']['rss_before'])} MiB over "
          f"{_mib(mem['ram']['rss_before'])} MiB")


def _child(cache: Path, runs: Path, bound: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--child",
                          str(cache), str(runs), bound],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / MIB:.0f}"


if __name__ == "__main__":
    main()
