"""Shared helpers for the benchmark scripts: machine description, alternating repeats, tables,
synthetic caches.

Every script measures the cases it compares in the same run, alternating them round by round,
and reports medians and ratios: the machine is shared and its load changes from minute to minute.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

def machine() -> str:
    """One line: CPU model, cores, load, torch threads, torch version, GPU if any, date."""
    import torch

    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    try:
        load = f", load average {os.getloadavg()[0]:.1f}"
    except OSError:
        load = ""
    return (f"{model}, {os.cpu_count()} cores{load}, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, {gpu}, {datetime.date.today().isoformat()}")


def alternate(cases: dict[str, Callable[[], float | None]], repeats: int) -> dict[str, list[float]]:
    """Run each case once per round, alternating, `repeats` rounds; seconds per run.

    A case may return its own timing (seconds) instead of being timed from outside.
    Alternating inside one run keeps a shared, noisy machine from favouring one side.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            own = fn()
            times[name].append(own if own is not None else time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """'min..max' of repeated timings, to show how noisy a median is."""
    return f"{_fmt(min(values))}..{_fmt(max(values))}"


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (what bench/README.md holds)."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def quiet() -> None:
    """Warnings only: the stages log progress at INFO, and --weights none warns on every build
    (warnings the stages mark with the record attribute `random_init`: dropped, others kept)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("pipeline.extract", "pipeline.export"):
        logging.getLogger(name).addFilter(_not_random_init)


def _not_random_init(record: logging.LogRecord) -> bool:
    return not getattr(record, "random_init", False)


def synthetic_cache(path: Path, rows: int, dim: int = 4096, classes: int = 10,
                    dtype: str = "float16", separation: float = 0.05, split: int = 0) -> Path:
    """A complete cache of `rows` fc7-like features written directly with CacheWriter (no VGG).

    Row i of class y is relu(mu_y + noise): mu_y ~ N(0, separation^2) per dimension (the same
    means for every call), noise ~ N(0, 1) drawn under `split`, so split=1 gives a validation
    cache of the same problem. With 4096 dimensions and separation 0.05, linear heads reach
    roughly 60-95 % depending on their settings: best-accuracy columns mean something.
    """
    from cache import CacheWriter, partial_path

    means = np.random.default_rng(0).normal(0, separation, (classes, dim)).astype(np.float32)
    rng = np.random.default_rng(1 + split)
    labels = rng.integers(0, classes, rows)
    manifest = {"backbone": "vgg16", "weights": "none", "weights_sha256": "0" * 64,
                "layer": "classifier.4", "layer_alias": "fc7", "feature_dim": dim,
                "preprocessing": {"resize_size": 256, "crop_size": 224,
                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                  "interpolation": "bilinear", "antialias": True},
                "precision": "float32", "dtype": dtype,
                "class_names": [f"c{i}" for i in range(classes)], "source_root": str(path.parent)}
    writer = CacheWriter.create(partial_path(path), manifest)
    for start in range(0, rows, 4096):
        y = labels[start:start + 4096]
        x = np.maximum(means[y] + rng.standard_normal((len(y), dim), dtype=np.float32), 0)
        paths = [f"c{v}/{path.stem}-{start + i:06d}.jpg" for i, v in enumerate(y)]
        writer.commit(x.astype(dtype), y.tolist(), paths, ["0" * 64] * len(y))
    return writer.finish(path, {"rows": rows, "errors": 0})


def scratch(prefix: str) -> Path:
    """A temporary folder removed when the process exits (caches here reach hundreds of MiB)."""
    import atexit
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far.

    VmHWM from /proc (this process's own high-water mark). getrusage's ru_maxrss is the
    fallback only: on Linux it survives fork + exec, so a subprocess starts with its parent's.
    """
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kib * 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class EpochTimes:
    """Collects the per-epoch seconds `train_head` reports through its `on_epoch` callback.

        epochs = EpochTimes()
        train_head(..., on_epoch=epochs)
        epochs.seconds      # [0.61, 0.52, ...] one per epoch and pass

    The stage times its own epochs (shuffle, batches, optimizer steps, validation), so this
    excludes loading the cache and writing the runs.
    """

    def __init__(self):
        self.seconds: list[float] = []

    def __call__(self, epoch: dict) -> None:
        self.seconds.append(epoch["seconds"])


def paired(times: dict[str, list[float]], case: str, base: str) -> float:
    """Median over rounds of times[case] / times[base] in the same round: a slow spell of the
    shared machine that spans a round cancels out of the ratio."""
    return median([a / b for a, b in zip(times[case], times[base])])


def bench_parser(doc: str, repeats: int | None = None, threads: int | None = 0
                 ) -> argparse.ArgumentParser:
    """The argument parser of a benchmark script: its docstring as --help, --repeats (alternated
    rounds, if `repeats` is given: its default) and --threads (torch intra-op threads, if
    `threads` is given: its default, 0 for torch's own); `apply_threads` applies the latter."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    if repeats is not None:
        ap.add_argument("--repeats", type=int, default=repeats,
                        help="alternated rounds of every case (medians are reported)")
    if threads is not None:
        ap.add_argument("--threads", type=int, default=threads,
                        help="torch threads; 0: torch's default (one per core). On a shared "
                             "machine whose cores are busy, 1 avoids stalls of ~20 ms per op "
                             "while a parallel region waits for a descheduled thread")
    return ap


def apply_threads(args) -> None:
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
