"""`lmforge stage <x>` and `python -m pipeline.stages.<x>` exit with the same code.

Both are real processes started in a throwaway project, and the bad input is real too: a
tracking server that is down (a closed loopback port, so the connection is refused). The
flow retries a stage only on exit code 75, so a CLI that turned "tracking down" into 1
would hide a transient failure.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from pipeline.core.errors import EXIT_TRANSIENT

BIN = Path(sys.executable).parent


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_both(root: Path, stage: str, overrides: list[str]) -> list[subprocess.CompletedProcess]:
    """The stage run by the `lmforge` script and by `python -m`, with the same overrides."""
    sets = [arg for item in overrides for arg in ("--set", item)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    # One refused connection is enough: no retries with back-off, no long timeout.
    env |= {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    commands = [
        [str(BIN / "lmforge"), "stage", stage, *sets],
        [sys.executable, "-m", f"pipeline.stages.{stage}", *sets],
    ]
    return [
        subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        for cmd in commands
    ]


def test_cli_stage_exits_like_python_m_when_tracking_is_down(project):
    """Both exit 75 (transient, the flow retries it), with a message and no traceback.

    The old `lmforge stage` caught only LmforgeError/ValueError itself, so this exited 1
    with MLflow's traceback; a bad config (2) or bad data (1) already agreed.
    """
    port = closed_port()
    overrides = ["tracking.enabled=true", f"tracking.uri=http://127.0.0.1:{port}"]
    cli, module = run_both(project, "validate", overrides)
    assert cli.returncode == module.returncode == EXIT_TRANSIENT, (
        f"lmforge stage: {cli.returncode}\n{cli.stderr[-2000:]}\n"
        f"python -m: {module.returncode}\n{module.stderr[-2000:]}"
    )
    for done in (cli, module):
        assert "error: stage validate failed" in done.stderr
        assert f"cannot reach the MLflow tracking server at http://127.0.0.1:{port}" in done.stderr
        assert "transient failure (exit 75" in done.stderr
        assert "Traceback" not in done.stderr
    assert not (project / "data" / "validated").exists()  # no partial outputs either way
