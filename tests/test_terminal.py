"""What `lmforge run` shows on the terminal: DVC's hints kept out, one timestamp per line,
one progress line per stage redrawn in place, and the end-of-run summary table.

    .venv/bin/python -m pytest tests/test_terminal.py -q
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from flows.artifacts import gx_markdown, key_metrics, print_run_end, summary_line
from flows.stage_line import stage_line
from flows.streaming import LogFilter, stream_command
from pipeline.core.progress import Progress
from pipeline.ops.launch import run_group

# `dvc repro hello` of a one-stage dvc.yaml in a fresh `git init` + `dvc init`, as DVC 3.67.1
# printed it (captured with `cat -A`; ^I is a tab), then a second run of the same stage.
DVC_RAN = [
    "Running stage 'hello':",
    "> echo hi > out.txt",
    "Generating lock file 'dvc.lock'",
    "Updating lock file 'dvc.lock'",
    "",
    "To track the changes with git, run:",
    "",
    "\tgit add dvc.lock .gitignore",
    "",
    "To enable auto staging, run:",
    "",
    "\tdvc config core.autostage true",
    "Use `dvc push` to send your updates to remote storage.",
]
DVC_SKIPPED = ["Stage 'hello' didn't change, skipping", "Data and pipelines are up to date."]


def shown(lines: list[str]) -> list[str]:
    keep = LogFilter()
    return [s for s in map(keep, lines) if s is not None]


def test_dvc_hints_are_dropped_and_the_stage_line_kept():
    assert shown(DVC_RAN) == ["Running stage 'hello':", "> echo hi > out.txt"]
    assert shown(DVC_SKIPPED) == ["Stage 'hello' didn't change, skipping"]


def test_stage_output_after_a_hint_is_kept_and_its_timestamp_cut():
    lines = [
        "To enable auto staging, run:",
        "",
        "\tdvc config core.autostage true",
        "2026-12-02 02:57:07,123 INFO pipeline.stages.pretrain: step 10 loss 2.31",
        "\tan indented line of a stage's own output",
        "a date 2026-12-02 02:57:07,123 inside a message stays",
    ]
    assert shown(lines) == [
        "INFO pipeline.stages.pretrain: step 10 loss 2.31",
        "\tan indented line of a stage's own output",
        "a date 2026-12-02 02:57:07,123 inside a message stays",
    ]


def dvc_project(tmp_path: Path) -> tuple[str, dict[str, str]]:
    """A one-stage DVC project in `tmp_path` whose stage logs as the stages do; (dvc, env)."""
    dvc = str(Path(sys.executable).with_name("dvc"))
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid"}
    for argv in (["git", "init", "-q"], [dvc, "init", "-q"]):
        subprocess.run(argv, cwd=tmp_path, env=env, check=True, timeout=120)
    (tmp_path / "stage.py").write_text(
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr,\n"
        "    format='%(asctime)s %(levelname)s %(name)s: %(message)s')\n"
        "logging.getLogger('pipeline.stages.hello').info('made it')\n"
        "open('out.txt', 'w').write('hi')\n"
    )
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  hello:\n    cmd: python stage.py\n    deps:\n      - stage.py\n"
        "    outs:\n      - out.txt\n"
    )
    return dvc, env


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="`dvc init` needs git")


@needs_git
def test_a_real_dvc_repro_streams_only_the_stage_lines(tmp_path: Path):
    """A real `dvc repro` run twice through `run_group` with the flow's filter: the log
    gets the stage line (ran, then skipped) and the stage's output, none of DVC's hints."""
    dvc, env = dvc_project(tmp_path)
    logs: list[list[str]] = []
    printed: list[list[str]] = []
    for _ in range(2):
        keep, logged = LogFilter(), []
        code, lines = run_group(
            [dvc, "repro", "hello"], tmp_path, env, lambda s, k=keep, o=logged: o.append(k(s))
        )
        assert code == 0, lines
        printed.append(lines)
        logs.append([s for s in logged if s is not None])
    assert any("autostage" in line for line in printed[0])  # DVC did print its hints
    assert logs[0] == [
        "Running stage 'hello':",
        "> python stage.py",
        "INFO pipeline.stages.hello: made it",
    ]
    assert logs[1] == ["Stage 'hello' didn't change, skipping"]


@pytest.mark.slow
@needs_git
def test_the_flow_log_of_a_real_dvc_repro_has_no_hints(tmp_path: Path, prefect_api: str):
    """`stream_command` in a real Prefect flow run; its log, read back from the Prefect API,
    has the stage line and the stage's message with no second timestamp, and no hint."""
    from fault_helpers import flow_run_logs
    from prefect import flow
    from prefect.logging.handlers import APILogWorker
    from prefect.runtime import flow_run

    dvc, env = dvc_project(tmp_path)

    @flow(name="terminal-test")
    def repro() -> str:
        code, _ = stream_command([dvc, "repro", "hello"], tmp_path, env, "hello")
        assert code == 0
        return str(flow_run.id)

    run_id = repro()
    APILogWorker.drain_all(timeout=30)  # the logs reach the API in background batches
    logs = flow_run_logs(run_id).splitlines()
    assert "hello | Running stage 'hello':" in logs, logs
    assert "hello | INFO pipeline.stages.hello: made it" in logs, logs
    assert not [x for x in logs if "git add" in x or "autostage" in x or "dvc push" in x]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recorded(logging.Handler):
    """What a handler off a terminal gets (the Prefect API log): every message."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def flow_log(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """A logger like the task run's: a Prefect console handler (on a terminal when the
    test is parametrized True, on a file when False) and a recording handler; (logger,
    console output, recorded messages, the console handler)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    monkeypatch.setenv("TERM", "xterm-256color")  # not "dumb", whatever CI sets
    buf = io.StringIO()
    console = PrefectConsoleHandler(stream=buf)
    console.console = Console(file=buf, force_terminal=request.param, width=120)
    api = Recorded()
    logger = logging.getLogger(f"lmforge.test.{request.node.name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.handlers = [console, api]
    yield logger, buf, api.messages, console
    logger.handlers = []


def stage_output() -> list[tuple[float, str]]:
    """(time, line) of a pretrain stage as `stream_command` logs them: DVC's lines, then a
    progress line every 10 s (200 steps each; `Progress` makes them, so the format is the
    real one) with a warning in between, and the last one, "(done)"."""
    clock = FakeClock()
    plain = Console(file=io.StringIO(), force_terminal=False)
    bar = Progress("pretrain", 1000, " steps", 10.0, clock=clock, console=plain)
    out = [(0.0, "Running stage 'pretrain':"), (0.5, "> python -m pipeline.ops.launch ...")]
    for t in (10.0, 20.0, 30.0, 40.0, 50.0):
        clock.now = t
        bar.update(200)
        out.append((t, f"INFO lmforge.progress: {bar.line()}"))
        if t == 20.0:
            out.append((25.0, "WARNING pipeline.train.loop: val_loss rose"))
    out.append((50.0, f"INFO lmforge.progress: {replace(bar.snapshot(), final=True).line()}"))
    return out


def feed(logger: logging.Logger, clock: FakeClock, label: str, timed: list[tuple[float, str]]):
    for t, line in timed:
        clock.now = t
        logger.info("%s | %s", label, line)  # as `stream_command` logs a line


CONTROL = re.compile(r"\x1b\[\??([\d;]*)([A-Za-z])|\r|\n|[^\x1b\r\n]+")


def screen(output: str) -> list[str]:
    """What a terminal shows once `output` is written: text, \\r, \\n, cursor up, erase
    line; colours and the cursor's visibility do not matter here."""
    rows, row, col = [""], 0, 0
    for m in CONTROL.finditer(output):
        token, code = m[0], m[2]
        if token == "\n":
            row, col = row + 1, 0
            rows += [""] * (row + 1 - len(rows))
        elif token == "\r":
            col = 0
        elif code == "K":
            rows[row] = ""
        elif code == "A":
            row = max(row - int(m[1] or 1), 0)
        elif code is None:
            text = rows[row].ljust(col)
            rows[row], col = text[:col] + token + text[col + len(token) :], col + len(token)
    while rows and not rows[-1].strip():
        rows.pop()
    return [r.rstrip() for r in rows]


def plain_text(output: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", output)


@pytest.mark.parametrize("flow_log", [True], indirect=True)
def test_a_terminal_gets_one_progress_line_redrawn_in_place(flow_log):
    """The progress lines redraw one line (the last state stays, marked done); the other
    lines print above it, once each; the log off the terminal still gets every line."""
    logger, buf, recorded, console_handler = flow_log
    clock = FakeClock()
    timed = stage_output()
    progress = [line for _, line in timed if "lmforge.progress: " in line]
    assert len(progress) == 6 and progress[-1].endswith("(done)")
    with stage_line("pretrain", logger, clock=clock, auto_refresh=False):
        feed(logger, clock, "pretrain", timed)
        assert "pretrain | Running stage 'pretrain':" in screen(buf.getvalue())
    out = buf.getvalue()
    assert screen(out) == [
        "pretrain | Running stage 'pretrain':",
        "pretrain | > python -m pipeline.ops.launch ...",
        "pretrain | WARNING pipeline.train.loop: val_loss rose",
        "pretrain ✓ 1.00k steps / 1.00k steps (100%) · 20 steps/s · 50s",
    ]
    drawn = plain_text(out)
    # Each progress line redrew the line in place (a carriage return, an erase), and so
    # did each line printed above it: there the ETA has counted down since the last one.
    assert "pretrain ⠋ 0s" in drawn and out.count("\r\x1b[2K") >= len(timed)
    assert "200 steps / 1.00k steps (20%) ETA 40s · 20 steps/s · 10s" in drawn
    assert "400 steps / 1.00k steps (40%) ETA 25s · 20 steps/s · 25s" in drawn
    assert "steps/s, " not in drawn, "a plain progress line reached the terminal"
    assert recorded == [f"pretrain | {line}" for _, line in timed]  # the API log: all
    assert console_handler.filters == []


@pytest.mark.parametrize("flow_log", [False], indirect=True)
def test_off_a_terminal_every_line_prints_as_before(flow_log):
    logger, buf, recorded, console_handler = flow_log
    clock = FakeClock()
    timed = stage_output()
    with stage_line("pretrain", logger, clock=clock, auto_refresh=False) as line:
        assert line is None and console_handler.filters == []
        feed(logger, clock, "pretrain", timed)
    assert buf.getvalue().splitlines() == [f"pretrain | {line}" for _, line in timed]
    assert recorded == [f"pretrain | {line}" for _, line in timed]


@pytest.mark.parametrize("flow_log", [True], indirect=True)
def test_a_failed_stage_keeps_its_line_marked_and_a_skipped_one_leaves_none(flow_log):
    logger, buf, _, console_handler = flow_log
    clock = FakeClock()
    timed = stage_output()[:3]  # killed after its first progress line
    failed = stage_line("pretrain", logger, clock=clock, auto_refresh=False)
    with pytest.raises(RuntimeError), failed:
        feed(logger, clock, "pretrain", timed)
        raise RuntimeError("stage pretrain failed")
    with stage_line("evaluate", logger, clock=clock, auto_refresh=False):
        feed(logger, clock, "evaluate", [(9.0, "Stage 'evaluate' didn't change, skipping")])
        feed(logger, clock, "pretrain", [timed[-1]])  # another stage's progress: printed
    assert screen(buf.getvalue())[2:] == [
        "pretrain ✗ 200 steps / 1.00k steps (20%) ETA 40s · 20 steps/s · 10s",
        "evaluate | Stage 'evaluate' didn't change, skipping",
        f"pretrain | {timed[-1][1]}",
    ]
    assert console_handler.filters == []


def render(result: dict, push: bool = True) -> str:
    """What `lmforge run` prints at its end, as plain text (no terminal needed)."""
    console = Console(record=True, width=140, file=io.StringIO(), color_system=None)
    print_run_end(console, result, "sqlite:///mlruns.db", push)
    return console.export_text()


def write_report(reports: Path, stage: str, report: dict) -> None:
    reports.mkdir(parents=True, exist_ok=True)
    (reports / f"{stage}.json").write_text(json.dumps(report))


def test_where_to_look_points_at_the_server_in_team_mode():
    """A tracking server has its own UI: no `mlflow ui --backend-store-uri http://...`."""
    console = Console(record=True, width=140, file=io.StringIO(), color_system=None)
    print_run_end(console, {"stages": []}, "http://mlflow.team:5000", False)
    text = console.export_text()
    assert "MLflow:  open http://mlflow.team:5000" in text
    assert "mlflow ui" not in text


def test_the_end_of_run_table_then_where_to_look(tmp_path: Path):
    """Rows from the reports on disk: a real-text run has no story-world KL, so the row is
    absent; the figures it has are shown, formatted; the where-to-look block follows."""
    reports = tmp_path / "reports"
    write_report(reports, "evaluate", {"test": {"bits_per_byte": 2.12834}, "task_accuracy": 0.0})
    write_report(reports, "pretrain", {"train_loss": 1.5, "val_bpb": 2.0961, "tokens_seen": 123456})
    result = {
        "stages": [
            {
                "stage": "pretrain",
                "status": "ran",
                "seconds": 448.2,
                "metrics": key_metrics(reports, "pretrain"),
            },
            {
                "stage": "evaluate",
                "status": "skipped (unchanged)",
                "seconds": 1.3,
                "metrics": key_metrics(reports, "evaluate"),
            },
        ],
        "mlflow_parent_run_id": "abc123",
        "dvc_experiment": "exp-1",
        "dvc_pushed": False,
    }
    assert result["stages"][1]["metrics"]["KL bits/byte (story world)"] is None
    text = render(result)
    assert "KL bits/byte" not in text and "None" not in text and "n/a" not in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert {"pretrain", "evaluate"} <= set(rows)
    assert "ran" in rows["pretrain"] and "448.2" in rows["pretrain"]
    assert "skipped (unchanged)" in rows["evaluate"] and "test bits/byte: 2.128" in text
    assert "tokens: 123,456" in text and "val bits/byte: 2.096" in text
    table_end = max(i for i, line in enumerate(text.splitlines()) if "└" in line or "─" in line)
    look = text.splitlines().index("Where to look:")
    assert look > table_end
    assert "parent run abc123" in text and "experiment exp-1" in text
    assert "NOT pushed" in text
    # The flow log's copy of a row: the same figures, formatted, the absent ones left out.
    line = summary_line(result["stages"][1])
    assert line.startswith("evaluate    skipped (unchanged)     1.3s  test bits/byte: 2.128")
    assert "None" not in line and "KL" not in line and "2.12834" not in line


def test_the_story_world_kl_is_shown_when_it_applies(tmp_path: Path):
    reports = tmp_path / "reports"
    write_report(
        reports,
        "evaluate",
        {
            "test": {"bits_per_byte": 0.324},
            "source_kl": {"storyworld": {"kl_bits_per_byte": 0.062}},
        },
    )
    stage = {
        "stage": "evaluate",
        "status": "ran",
        "seconds": 121,
        "metrics": key_metrics(reports, "evaluate"),
    }
    text = render({"stages": [stage]}, push=False)
    assert "KL bits/byte (story world): 0.062" in text and "121.0" in text
    assert "task accuracy" not in text  # absent from this report
    assert "Remote:" not in text and "MLflow:  mlflow ui --backend-store-uri sqlite" in text


def test_the_gx_artifact_marks_sampled_checks_that_do_not_decide(tmp_path: Path):
    reports = tmp_path / "reports"
    row = {"suite": "rows", "expectation": "e", "column": "text", "kwargs": {}}
    gate = {
        "success": True,
        "expectations": [
            {**row, "success": False, "decides": False, "unexpected_percent": 2.5},
            {**row, "success": False, "decides": True, "unexpected_percent": 1.0},
        ],
    }
    write_report(reports, "validate", {"gate": gate})
    rows = gx_markdown(reports).splitlines()[-2:]
    assert "| no (sample; the exact share decides) | 2.5 |" in rows[0]
    assert "| **no** | 1 |" in rows[1]


def test_the_cli_turns_off_prefects_telemetry_unless_the_user_set_it():
    """Offline, Prefect's temporary server logged "ERROR ... Failed to send telemetry" at
    start-up and every ten minutes of `lmforge run` (measured on the default preset)."""
    probe = (
        "import flows.cli; from prefect.settings import get_current_settings; "
        "print(get_current_settings().server.analytics_enabled)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_ANALYTICS_ENABLED"}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[-1] == "False"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "true"  # the user's choice wins
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[-1] == "True"
