"""Progress of long work: amount done, %, rate, ETA and elapsed time, on a terminal and in logs.

    progress = Progress("pretrain", total=1000, unit=" steps", every=10.0)
    progress.update(1)          # per step; `update(n, n_bytes=...)` also counts bytes (MB/s)
    progress.close()

On a terminal this is one `rich.progress` line redrawn in place. Without a terminal (DVC and
Prefect capture stage output into log files) it is a plain `logging` line at most every
`every` seconds, plus a last one on `close()`, with the same fields:

    pretrain: 120 steps / 1.00k steps (12%), ETA 40s, 3.00 steps/s, 35.0s elapsed

`parse_line` reads such a line back into its fields (`ProgressLine`): the flow draws a
stage's progress from it as one line on its own terminal (flows/stage_line.py).

`rich` is on every machine this runs on, the GPU ones included (see DESIGN.md).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, ProgressColumn, Task, TextColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

LOGGER_NAME = "lmforge.progress"
log = logging.getLogger(LOGGER_NAME)
Clock = Callable[[], float]

# One console for every bar of the process, so bars that overlap in time share one live
# display (rich nests them) instead of two displays redrawing over each other.
_console: Console | None = None


def default_console() -> Console:
    """The process's stderr console (stdout carries a stage's JSON summary)."""
    global _console
    if _console is None:
        _console = Console(stderr=True)
    return _console


@dataclass(frozen=True)
class ProgressLine:
    """The fields of one log line, each as the text it prints (`done="1.00k"`, `eta="40s"`).

    `line()` is the log line; `parse_line(line())` gives the same fields back. Without a
    total, `total`, `pct` and `eta` are None; without bytes, `mb` and `mb_rate` are.
    """

    what: str
    done: str
    unit: str
    rate: str
    elapsed: str
    total: str | None = None
    pct: str | None = None
    eta: str | None = None  # "40s", or "?" before any progress
    mb: str | None = None
    mb_rate: str | None = None
    final: bool = False  # the line of `close()`, ending in " (done)"

    def count(self) -> str:
        """`done unit / total unit`, or only `done unit` without a total."""
        text = f"{self.done}{self.unit}"
        return f"{text} / {self.total}{self.unit}" if self.total else text

    def fields(self) -> str:
        """Everything after the count: `(12%), ETA 40s, 3.00 steps/s, 35.0s elapsed[; MB]`."""
        parts = [f"({self.pct}%), ETA {self.eta}"] if self.total else []
        parts.append(f"{self.rate}{self.unit}/s, {self.elapsed}s elapsed")
        text = ", ".join(parts)
        if self.mb is not None:
            text += f"; {self.mb} MB at {self.mb_rate} MB/s"
        return text

    def line(self) -> str:
        """The log line: `what: count fields`, and ` (done)` on the last one."""
        sep = " " if self.total else ", "
        done = " (done)" if self.final else ""
        return f"{self.what}: {self.count()}{sep}{self.fields()}{done}"

    def eta_seconds(self) -> float | None:
        """The ETA in seconds; None without a total or before any progress (`?`)."""
        return float(self.eta[:-1]) if self.eta and self.eta != "?" else None


_NUMBER = r"-?\d+(?:\.\d+)?[kMG]?"  # what `_fmt` prints
_LINE = re.compile(
    rf"(?P<what>.+?): (?P<done>{_NUMBER})(?P<unit>.*?)"
    rf"(?: / (?P<total>{_NUMBER})(?P=unit) \((?P<pct>-?\d+)%\), ETA (?P<eta>\?|-?\d+s))?"
    rf", (?P<rate>{_NUMBER})(?P=unit)/s, (?P<elapsed>\d+\.\d)s elapsed"
    r"(?:; (?P<mb>\d+\.\d) MB at (?P<mb_rate>\d+\.\d\d) MB/s)?(?P<final> \(done\))?"
)


def parse_line(text: str) -> ProgressLine | None:
    """The fields of a log line that `ProgressLine.line()` printed; None for other text."""
    m = _LINE.fullmatch(text)
    if m is None:
        return None
    return ProgressLine(**{**m.groupdict(), "final": m["final"] is not None})


class Progress:
    """Report `done/total unit` with %, rate, ETA and elapsed time; see the module docstring.

    `done` may also be assigned (a resumed run starts at its checkpoint's step): what is
    assigned moves the count but not the rate, which counts only work done since start.
    `clock` and `console` are injectable so tests can drive time and the terminal.
    """

    def __init__(
        self,
        what: str,
        total: float | None = None,
        unit: str = "",
        every: float = 5.0,
        *,
        clock: Clock = time.perf_counter,
        console: Console | None = None,
    ) -> None:
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self._clock = clock
        self._done = 0.0
        self._not_timed = 0.0  # assigned rather than updated: excluded from the rate
        self.n_bytes = 0
        self.start = self._last = clock()
        console = console or default_console()
        self._bar: RichProgress | None = None
        self._moved: list[tuple[logging.StreamHandler[Any], Any]] = []
        if _draws_bar(console):
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=30),
                _FieldsColumn(self),
                console=console,
                get_time=clock,
            )
            self._task = self._bar.add_task(what, total=total)
            self._start_bar(self._bar)

    @property
    def done(self) -> float:
        return self._done

    @done.setter
    def done(self, value: float) -> None:
        self._not_timed += value - self._done
        self._done = value
        self._redraw()

    def update(self, amount: float, n_bytes: int = 0) -> None:
        """Count `amount` more units (and `n_bytes` more bytes, shown as MB and MB/s)."""
        self._done += amount
        self.n_bytes += n_bytes
        if self._bar is not None:
            self._redraw()
            return
        now = self._clock()
        if now - self._last >= self.every:
            self._last = now
            log.info(self.line())

    def rate(self) -> float:
        """Units per second since start (assigned amounts excluded)."""
        return (self._done - self._not_timed) / self._elapsed()

    def eta(self) -> float | None:
        """Seconds left at the current rate; None without a total, inf with no progress."""
        if not self.total:
            return None
        rate = self.rate()
        return (self.total - self._done) / rate if rate > 0 else float("inf")

    def snapshot(self) -> ProgressLine:
        """The fields of the log line now, formatted."""
        eta, elapsed = self.eta(), self._elapsed()
        total = pct = eta_text = mb = mb_rate = None
        if self.total:
            total, pct = _fmt(self.total), f"{100 * self._done / self.total:.0f}"
            eta_text = "?" if eta is None or eta == float("inf") else f"{eta:.0f}s"
        if self.n_bytes:
            megabytes = self.n_bytes / 1e6
            mb, mb_rate = f"{megabytes:.1f}", f"{megabytes / elapsed:.2f}"
        done, rate = _fmt(self._done), _fmt(self.rate())
        return ProgressLine(
            self.what, done, self.unit, rate, f"{elapsed:.1f}", total, pct, eta_text, mb, mb_rate
        )

    def fields(self) -> str:
        """Everything after the count: `(12%), ETA 40s, 3.00 steps/s, 35.0s elapsed[; MB]`."""
        return self.snapshot().fields()

    def count(self) -> str:
        """`done unit / total unit`, or only `done unit` without a total."""
        return self.snapshot().count()

    def line(self) -> str:
        """The log line: `what: count fields`."""
        return self.snapshot().line()

    def close(self) -> None:
        """The last line: the final state of the bar, or a log line ending in `(done)`."""
        if self._bar is not None:
            self._redraw()
            self._stop_bar()
            return
        log.info(replace(self.snapshot(), final=True).line())

    def _start_bar(self, bar: RichProgress) -> None:
        """Start the live display, and send the log lines of stderr handlers above it.

        rich redirects `sys.stderr` through its console while the bar is shown, but a
        logging handler keeps the stream it was given: its lines would cut through the
        bar. Pointing those handlers at the redirected stream until `close()` prints them
        above the bar, which stays one line.
        """
        original = sys.stderr
        bar.start()
        # Work that raises never reaches close(): stop at exit all the same, or the terminal
        # is left with a hidden cursor and the handlers pointing at rich's proxy.
        atexit.register(self._stop_bar)
        if sys.stderr is original:  # not redirected (nested bar, or not our stderr)
            return
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is original:
                self._moved.append((handler, handler.setStream(sys.stderr)))

    def _stop_bar(self) -> None:
        if self._bar is None:
            return
        self._bar.stop()
        for handler, stream in self._moved:
            handler.setStream(stream)
        self._moved, self._bar = [], None
        atexit.unregister(self._stop_bar)

    def _elapsed(self) -> float:
        return max(self._clock() - self.start, 1e-9)

    def _redraw(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self._done)


class _FieldsColumn(ProgressColumn):
    """The text of the log line after the bar, computed by the owning `Progress`."""

    def __init__(self, owner: Progress) -> None:
        super().__init__()
        self.owner = owner

    def render(self, task: Task) -> Text:
        # Cut rather than wrap on a narrow terminal: a wrapped bar is no longer one line.
        fields = self.owner.snapshot()
        text = f"{fields.count()} {fields.fields()}"
        return Text(text, no_wrap=True, overflow="ellipsis")


def _draws_bar(console: Console) -> bool:
    """A redrawn bar only on a real terminal, and only from the first process of a torchrun.

    Other ranks share rank 0's terminal: several bars redrawing there would garble it, so
    they keep to (rate-limited) log lines.
    """
    rank = os.environ.get("RANK", "0")
    return console.is_terminal and not console.is_dumb_terminal and rank == "0"


def _fmt(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.2f}"
