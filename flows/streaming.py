"""Run a command and stream its output, line by line, into the Prefect task log.

`dvc repro` prints, after each stage it ran, hints meant for someone at a shell ("To track
the changes with git, run: git add dvc.lock", "To enable auto staging, run: dvc config
core.autostage true", "Use `dvc push` to send your updates to remote storage."); the flow
commits nothing and pushes on its own, so `LogFilter` keeps them out of the log, along with
the lock-file chatter. The one line DVC prints per stage ("Running stage 'x':" or "Stage 'x'
didn't change, skipping") stays. Stage log lines carry their own timestamp
(`pipeline/ops/stage_runner.py`'s format) and the Prefect logger adds another; the stage's
one is cut here, so each line shows one.
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect import get_run_logger

from pipeline.ops.launch import run_group

# A line that opens one of DVC's hint blocks; the block's body is blank lines and
# tab-indented commands (dvc/repo/scm_context.py, dvc 3.67).
HINT_HEADERS = ("To track the changes with git, run:", "To enable auto staging, run:")
# Single lines DVC prints that tell a flow user nothing.
DVC_CHATTER = re.compile(
    r"^(Use `dvc push` to send your updates to remote storage\."
    r"|(Generating|Updating) lock file '[^']*'"
    r"|Data and pipelines are up to date\.)$"
)
# `%(asctime)s ` as logging prints it: "2026-12-02 02:57:07,123 ".
STAGE_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


class LogFilter:
    """What of a `dvc repro` output line goes to the log: `filter(line)` -> text or None.

    Stateful: after a hint header, the blank and tab-indented lines that follow are the
    hint's body and are dropped too, up to the next other line.
    """

    def __init__(self) -> None:
        self.in_hint = False

    def __call__(self, line: str) -> str | None:
        if line in HINT_HEADERS:
            self.in_hint = True
            return None
        if self.in_hint and (not line.strip() or line.startswith("\t")):
            return None
        self.in_hint = False
        if not line.strip() or DVC_CHATTER.match(line):
            return None
        return STAGE_TIMESTAMP.sub("", line, count=1)


def stream_command(argv: list[str], cwd: Path | str, env: dict[str, str], label: str):
    """Run `argv`, logging each output line as `<label> | <line>`; (exit code, lines).

    DVC's hints are left out of the log (`LogFilter`) but not out of the returned lines,
    which the caller reads whole (a failure's tail, "Running stage").
    The command runs in its own process group, which gets SIGTERM (and is waited for) if
    this process is stopped meanwhile, e.g. by a cancelled flow run (`run_group`).
    """
    logger = get_run_logger()
    keep = LogFilter()

    def on_line(line: str) -> None:
        shown = keep(line)
        if shown is not None:
            logger.info("%s | %s", label, shown)

    return run_group(argv, cwd, env, on_line)
