"""On a terminal, one line for the running stage, redrawn in place from its progress lines.

    with stage_line("pretrain"):
        code, lines = stream_command(["dvc", "repro", "pretrain"], root, env, "pretrain")

Under DVC a stage has no terminal, so its `Progress` logs plain lines every few seconds,
which `stream_command` logs as `pretrain | INFO lmforge.progress: pretrain: 120 steps / ...`.
While the block runs, and only if the flow's log prints on a terminal, those lines are kept
off the terminal and redraw one line instead (a spinner, then the mark of how it ended):

    pretrain ⠋ 120 steps / 1.00k steps (12%) ETA 40s · 3.00 steps/s · 35s

Every other line (DVC's "Running stage", warnings, errors) still prints, above it: the line
is drawn on the very console the terminal's log handler prints through, which rich keeps
under what is printed. Only the handlers that print on a terminal are filtered, so the
Prefect API log (the UI) keeps every plain line with rate and ETA; off a terminal (a worker,
CI, a log file) nothing changes at all. Before its first progress line, the line shows the
time since the stage started; if none ever comes (DVC skipped the stage), it is erased.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from pipeline.core.progress import LOGGER_NAME, ProgressLine, parse_line

RUN_LOGGER = "prefect.task_runs"  # the logger under `get_run_logger()` in a task


def terminal_handlers(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers `logger`'s records reach that print through a rich console on a terminal.

    Prefect's `PrefectConsoleHandler` (on the root logger) is one, when stderr is a terminal.
    """
    found: list[logging.Handler] = []
    node: logging.Logger | None = logger
    while node is not None:
        found += [h for h in node.handlers if _on_terminal(getattr(h, "console", None))]
        node = node.parent if node.propagate else None
    return found


def _on_terminal(console: Any) -> bool:
    return isinstance(console, Console) and console.is_terminal and not console.is_dumb_terminal


def stage_line(
    label: str, logger: logging.Logger | None = None, **options: Any
) -> contextlib.AbstractContextManager[StageLine | None]:
    """A context manager: `StageLine` on a terminal, else one that does nothing.

    `label` is the one `stream_command` prefixes the lines with; `logger` the one it logs to
    (default: Prefect's task run logger); `options` go to `StageLine`.
    """
    handlers = terminal_handlers(logger or logging.getLogger(RUN_LOGGER))
    if not handlers:
        return contextlib.nullcontext()
    console: Console = handlers[0].console  # type: ignore[attr-defined]
    return StageLine(label, console, handlers, **options)


class StageLine:
    """One stage's line on `console`, fed by the records `handlers` would print.

    A logging filter on each of `handlers`: a progress line of `label` updates the line
    and is not printed; any other record passes. `clock` and `auto_refresh` (10 redraws a
    second, for the spinner and the elapsed time) are injectable for tests.
    """

    def __init__(
        self,
        label: str,
        console: Console,
        handlers: list[logging.Handler],
        *,
        clock: Callable[[], float] = time.monotonic,
        auto_refresh: bool = True,
    ) -> None:
        self.label, self.handlers, self._clock = label, handlers, clock
        self.latest: ProgressLine | None = None
        self.failed = False
        self._start = self._seen = clock()
        self._end: float | None = None
        self._spinner = Spinner("dots")
        self._live = Live(self, console=console, auto_refresh=auto_refresh, refresh_per_second=10)

    def __enter__(self) -> StageLine:
        for handler in self.handlers:
            handler.addFilter(self)
        self._live.start()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        """Freeze the line with ✓ (or ✗ when the block raised); erase it if it never moved."""
        self.failed, self._end = exc_type is not None, self._clock()
        try:
            self._live.transient = self.latest is None
            self._live.stop()
        finally:
            for handler in self.handlers:
                handler.removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        """The logging filter: False (not printed) for this stage's progress lines."""
        progress = self.progress_of(record.getMessage())
        if progress is None:
            return True
        self.latest, self._seen = progress, self._clock()
        self._live.refresh()
        return False

    def progress_of(self, message: str) -> ProgressLine | None:
        """The progress in a `<label> | <stage log line>` message, if it is one of `label`'s."""
        label, sep, line = message.partition(" | ")
        _, found, text = line.partition(f"{LOGGER_NAME}: ")  # after "<LEVEL> "
        if label != self.label or not sep or not found:
            return None
        return parse_line(text)

    def __rich__(self) -> Text:
        """The line: label, spinner or mark, the latest progress, the stage's time so far."""
        now = self._end if self._end is not None else self._clock()
        text = Text(no_wrap=True, overflow="ellipsis").append(self.label, style="bold")
        text.append(" ").append_text(self._mark(now))
        if self.latest is not None:
            text.append(f" {self.describe(self.latest, now - self._seen)} ·")
        return text.append(f" {duration(now - self._start)}", style="dim")

    def describe(self, p: ProgressLine, since: float) -> str:
        """`[what ]count (pct%) ETA t · rate`; the ETA counted down `since` the line came."""
        what = p.what.removeprefix(self.label).removeprefix(": ")
        text = f"{what} {p.count()}".lstrip()
        text += f" ({p.pct}%)" if p.pct is not None else ""
        eta = p.eta_seconds()
        if not p.final and eta is not None:
            text += f" ETA {duration(max(eta - since, 0.0))}"
        return text + f" · {p.rate}{p.unit}/s"

    def _mark(self, now: float) -> Text:
        if self._end is None:
            frames, step = self._spinner.frames, self._spinner.interval / 1000
            return Text(frames[int((now - self._start) / step) % len(frames)], style="cyan")
        return Text("✗", style="red") if self.failed else Text("✓", style="green")


def duration(seconds: float) -> str:
    """`35s`, `5m 20s`, `2h 05m`."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"
