"""A small progress line on stderr (items/s and ETA), silent when stderr is not a terminal."""
from __future__ import annotations

import sys
import time


class Progress:
    """`with Progress(total, "extract") as p: p.update(n)` redraws one line at most 10 times a second."""

    def __init__(self, total: int, label: str, enabled: bool | None = None, unit: str = "img"):
        self.total, self.label, self.unit = total, label, unit
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            sys.stderr.write("\r" + self.line(now) + "\033[K")
            sys.stderr.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = "--:--" if eta != eta else f"{int(eta) // 60}:{int(eta) % 60:02d}"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.label} {self.done}/{self.total} ({pct:.0f}%) "
                f"{rate:.1f} {self.unit}/s ETA {eta_text}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.enabled and self._last:
            sys.stderr.write("\n")
            sys.stderr.flush()
