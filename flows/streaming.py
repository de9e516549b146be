"""Run a command and stream its output, line by line, into the Prefect task log."""

from __future__ import annotations

import subprocess
from pathlib import Path

from prefect import get_run_logger


def stream_command(argv: list[str], cwd: Path | str, env: dict[str, str], label: str):
    """Run `argv`, logging each output line as `<label> | <line>`; (exit code, lines)."""
    logger = get_run_logger()
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    assert proc.stdout is not None  # stdout=PIPE
    for line in proc.stdout:
        lines.append(line.rstrip())
        logger.info("%s | %s", label, line.rstrip())
    return proc.wait(), lines
