"""Progress lines for long work: amount done, rate and ETA, on the terminal and in logs.

Plain log lines (not a redrawing bar) because stages usually run under DVC or Prefect,
whose captured output should read well in a log file too.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("lmforge.progress")


class Progress:
    """Report `done/total unit` at most every `every` seconds, with rate and ETA."""

    def __init__(self, what: str, total: float | None = None, unit: str = "", every: float = 5.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.done = 0.0
        self.start = self._last = time.perf_counter()

    def update(self, amount: float) -> None:
        self.done += amount
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            log.info(self.line())

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.what}: {_fmt(self.done)}{self.unit}"
        if self.total:
            pct = 100 * self.done / self.total
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            text += f" / {_fmt(self.total)}{self.unit} ({pct:.0f}%), ETA {eta:.0f}s"
        return text + f", {_fmt(rate)}{self.unit}/s, {elapsed:.1f}s elapsed"

    def close(self) -> None:
        log.info(self.line() + " (done)")


def _fmt(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.2f}"
