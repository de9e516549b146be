"""pipeline.core.progress: log lines off a terminal (fake clock), a rich bar on one."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from pipeline.core.progress import Progress, ProgressLine, parse_line

LINE = re.compile(
    r"(?P<what>[^:]+): (?P<done>[\d.]+) docs / (?P<total>[\d.]+k?) docs \((?P<pct>\d+)%\), "
    r"ETA (?P<eta>\d+)s, (?P<rate>[\d.]+) docs/s, (?P<elapsed>[\d.]+)s elapsed"
)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def plain_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=False)


def tty_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=110), buf


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lmforge.progress"]


@pytest.fixture(autouse=True)
def _rank_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)


def test_log_lines_carry_rate_and_eta_at_most_every_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lmforge.progress")
    clock, total, every = FakeClock(), 1000, 5.0
    progress = Progress("encode", total, " docs", every, clock=clock, console=plain_console())
    schedule = [(1.0, 100), (4.9, 100), (5.0, 50), (7.0, 250), (12.0, 0), (16.0, 100)]
    # The lines a brute-force replay expects: (done, elapsed) whenever `every` has passed.
    expected, done, last = [], 0, 0.0
    for t, n in schedule:
        clock.now = t
        progress.update(n)
        done += n
        if t - last >= every:
            expected.append((done, t))
            last = t
    clock.now = 20.0
    progress.close()
    expected.append((done, 20.0))

    lines = progress_lines(caplog)
    assert [t for _, t in expected] == [5.0, 12.0, 20.0]  # 4.9 and 7 and 16 are too soon
    assert len(lines) == len(expected), lines
    assert lines[-1].endswith(" (done)")
    for line, (want_done, elapsed) in zip(lines, expected, strict=True):
        m = LINE.match(line)
        assert m, f"not a progress line: {line!r}"
        rate = want_done / elapsed
        assert m["what"] == "encode" and m["total"] == "1.00k"
        assert float(m["done"]) == want_done
        assert int(m["pct"]) == round(100 * want_done / total)
        assert float(m["rate"]) == pytest.approx(rate, abs=0.006)
        assert float(m["eta"]) == pytest.approx((total - want_done) / rate, abs=0.5)
        assert float(m["elapsed"]) == pytest.approx(elapsed, abs=0.05)


def test_assigned_start_is_not_counted_in_the_rate(caplog: pytest.LogCaptureFixture) -> None:
    """A resumed run starts at its checkpoint: 60 steps assigned, then 10 steps in 10 s."""
    caplog.set_level(logging.INFO, logger="lmforge.progress")
    clock = FakeClock()
    progress = Progress("pretrain", 100, " docs", 5.0, clock=clock, console=plain_console())
    progress.done = 60
    clock.now = 10.0
    progress.update(10)
    (line,) = progress_lines(caplog)
    m = LINE.match(line)
    assert m, line
    assert (m["done"], m["pct"], m["rate"], m["eta"]) == ("70", "70", "1", "30")


def test_bytes_and_untotalled_work(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lmforge.progress")
    clock = FakeClock()
    docs = Progress("encode", 10, " docs", clock=clock, console=plain_console())
    scan = Progress("scan", unit="B", clock=clock, console=plain_console())
    clock.now = 4.0
    docs.update(5, n_bytes=3_000_000)
    scan.update(2000)
    docs.close()
    scan.close()
    assert progress_lines(caplog) == [
        "encode: 5 docs / 10 docs (50%), ETA 4s, 1.25 docs/s, 4.0s elapsed; "
        "3.0 MB at 0.75 MB/s (done)",
        "scan: 2.00kB, 500B/s, 4.0s elapsed (done)",
    ]


def test_every_log_line_parses_back_to_the_fields_it_was_printed_from(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Round trip: `parse_line` of each line logged gives the `snapshot()` it came from,
    whatever the name (with ": " and ", " in it), unit ("B" after a "k"), bytes, a total
    or none, no progress yet (ETA "?"), a resumed start, overshoot, and the "(done)" line."""
    caplog.set_level(logging.INFO, logger="lmforge.progress")
    clock, plain = FakeClock(), plain_console()
    bars = [  # every=0: a line at every update
        Progress("tokenizer: train BPE, read train", 2500, " docs", 0, clock=clock, console=plain),
        Progress("validate: scanned", unit="B", every=0, clock=clock, console=plain),
        Progress("pretrain", 1000, " steps", 0, clock=clock, console=plain),
        Progress("finetune[swa]", 40, every=0, clock=clock, console=plain),
    ]
    bars[2].done = 300  # resumed from a checkpoint
    expected: list[ProgressLine] = []
    for t, n in [(0.0, 0), (1.5, 7), (3.0, 1234.5), (20.0, 2_000_000)]:
        clock.now = t
        for bar in bars:
            bar.update(n, n_bytes=3 * int(n) if bar.unit == "B" else 0)
            expected.append(bar.snapshot())
    for bar in bars:
        bar.close()
        expected.append(replace(bar.snapshot(), final=True))
    lines = progress_lines(caplog)
    assert len(lines) == len(expected) == 20
    assert [parse_line(line) for line in lines] == expected
    assert [f.line() for f in expected] == lines
    assert {"?", None, "534s", "3s"} <= {f.eta for f in expected}
    assert any(f.mb for f in expected) and any(f.eta and f.eta.startswith("-") for f in expected)


def test_the_eta_in_seconds() -> None:
    fields = ProgressLine("pretrain", "120", " steps", "3.00", "35.0", "1.00k", "12", "40s")
    assert fields.eta_seconds() == 40.0
    assert replace(fields, eta="?").eta_seconds() is None
    assert replace(fields, total=None, pct=None, eta=None).eta_seconds() is None


@pytest.mark.parametrize(
    "text",
    [
        "step 10 loss 2.31",
        "pretrain: 120 steps / 1.00k steps (12%), ETA 40s",
        "pretrain: 120 steps / 1.00k widgets (12%), ETA 40s, 3.00 steps/s, 35.0s elapsed",
        "INFO lmforge.progress: pretrain: 5 steps, 1 steps/s, 5.0s elapsed trailing",
        "",
    ],
)
def test_other_text_is_not_a_progress_line(text: str) -> None:
    assert parse_line(text) is None


def test_terminal_gets_one_bar_redrawn_in_place(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lmforge.progress")
    console, buf = tty_console()
    clock = FakeClock()
    progress = Progress("encode", 100, " docs", clock=clock, console=console)
    clock.now = 5.0
    progress.update(30)
    progress.close()
    out = buf.getvalue()
    assert "━" in out, f"no bar drawn: {out!r}"
    assert "\r\x1b[2K" in out, "the bar is not redrawn in place (carriage return + erase)"
    final = out.rsplit("\r\x1b[2K", 1)[-1]
    plain = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", final)
    assert "encode" in plain
    assert "30 docs / 100 docs (30%), ETA 12s, 6 docs/s, 5.0s elapsed" in plain
    assert progress_lines(caplog) == [], "a terminal gets the bar, not log lines"


def test_log_lines_print_above_the_bar(capsys: pytest.CaptureFixture[str]) -> None:
    """A stage's other log lines go through the bar's console while the bar is shown."""
    console, buf = tty_console()
    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        progress = Progress("encode", 100, " docs", clock=FakeClock(), console=console)
        logging.getLogger("lmforge.test").warning("val_loss 1.25")
        progress.close()
        assert handler.stream is sys.stderr, "the handler's stream was not restored"
    finally:
        root.removeHandler(handler)
    assert "val_loss 1.25" in buf.getvalue()
    assert "val_loss 1.25" not in capsys.readouterr().err


def test_other_ranks_log_instead_of_drawing(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")
    caplog.set_level(logging.INFO, logger="lmforge.progress")
    console, buf = tty_console()
    progress = Progress("pretrain", 10, " docs", clock=FakeClock(), console=console)
    progress.close()
    assert "━" not in buf.getvalue()
    assert len(progress_lines(caplog)) == 1


def test_a_run_that_dies_mid_bar_restores_the_terminal() -> None:
    """A stage that raises never calls close(): at exit the bar still stops, cursor shown."""
    script = (
        "from pipeline.core.progress import Progress\n"
        "p = Progress('pretrain', total=20, unit=' steps')\n"
        "p.update(3)\n"
        "raise SystemExit('interrupted')\n"
    )
    repo = str(Path(__file__).resolve().parents[1])
    pid, fd = pty.fork()
    if pid == 0:  # the child: a real process on a real terminal
        os.chdir(repo)
        os.environ["PYTHONPATH"] = repo
        os.environ.pop("RANK", None)
        os.execv(sys.executable, [sys.executable, "-c", script])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode()
    assert os.waitstatus_to_exitcode(status) == 1 and "interrupted" in text
    assert "\x1b[?25l" in text, f"no bar was drawn: {text!r}"  # rich hides the cursor...
    assert text.rstrip("\r\n").endswith("\x1b[?25h"), f"cursor left hidden: {text[-200:]!r}"
