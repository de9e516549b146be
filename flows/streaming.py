"""Run a command and stream its output, line by line, into the Prefect task log."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger

from pipeline.ops.launch import run_group


def stream_command(argv: list[str], cwd: Path | str, env: dict[str, str], label: str):
    """Run `argv`, logging each output line as `<label> | <line>`; (exit code, lines).

    The command runs in its own process group, which gets SIGTERM (and is waited for) if
    this process is stopped meanwhile, e.g. by a cancelled flow run (`run_group`).
    """
    logger = get_run_logger()
    return run_group(argv, cwd, env, lambda line: logger.info("%s | %s", label, line))
