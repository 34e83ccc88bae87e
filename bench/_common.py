"""Shared helpers for the benchmark scripts: machine description, alternating repeats, tables."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable


def machine() -> str:
    """One line: CPU model, cores, torch threads, torch version, GPU if any."""
    import torch

    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, {gpu}")


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
