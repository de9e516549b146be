"""The stack's processes: started in their own session, recorded by pidfile, stopped by pid.

A pidfile holds the pid and the process's start time (psutil's `create_time`), so `down`
never signals an unrelated process that reused a pid after a reboot. Stopping signals the
process and every descendant it had when `down` began (a Prefect server's uvicorn, a
worker's flow runs): SIGTERM (or the service's own stop signal), then SIGKILL after a grace
period, because `weed` and `prefect worker` were seen ignoring SIGTERM for 10-18 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from pipeline.ops.stack.layout import Layout, StackError

STOP_GRACE_S = 20.0
KILL_WAIT_S = 10.0


def pidfile(layout: Layout, name: str) -> Path:
    return layout.pids / f"{name}.pid"


def log_path(layout: Layout, name: str) -> Path:
    return layout.logs / f"{name}.log"


def start(
    layout: Layout,
    name: str,
    argv: list[str],
    env: dict[str, str],
    cwd: Path,
    user: str | None = None,
) -> psutil.Process:
    """Start `argv` in a new session, output appended to logs/<name>.log; write its pidfile."""
    layout.pids.mkdir(parents=True, exist_ok=True)
    layout.logs.mkdir(parents=True, exist_ok=True)
    with open(log_path(layout, name), "ab") as log:
        log.write(f"\n--- lmforge stack: starting {argv[0]} ---\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: no terminal signal reaches it by accident
            user=user,
            group=user,
        )
    handle = psutil.Process(proc.pid)
    record = {"pid": proc.pid, "create_time": handle.create_time(), "argv0": argv[0]}
    pidfile(layout, name).write_text(json.dumps(record))
    return handle


def running(layout: Layout, name: str) -> psutil.Process | None:
    """The live process recorded in <name>.pid, or None (no file, dead, or a reused pid)."""
    path = pidfile(layout, name)
    try:
        record = json.loads(path.read_text())
        proc = psutil.Process(int(record["pid"]))
        same = abs(proc.create_time() - float(record["create_time"])) < 1.0
        alive = proc.status() != psutil.STATUS_ZOMBIE
    except (OSError, ValueError, KeyError, psutil.Error):
        return None
    return proc if same and alive else None


def stop(
    layout: Layout, name: str, first_signal: int = signal.SIGTERM, grace_s: float = STOP_GRACE_S
) -> bool:
    """Stop the process of <name>.pid and its descendants; remove the pidfile.

    Returns whether there was a live process to stop.
    """
    proc = running(layout, name)
    if proc is None:
        pidfile(layout, name).unlink(missing_ok=True)
        return False
    with contextlib.suppress(psutil.Error):
        family = [proc, *proc.children(recursive=True)]
    for sig, wait_s in ((first_signal, grace_s), (signal.SIGKILL, KILL_WAIT_S)):
        alive = [p for p in family if _alive(p)]
        if not alive:
            break
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        _, still = psutil.wait_procs(alive, timeout=wait_s)
        if not still:
            break
    left = [p.pid for p in family if _alive(p)]
    if left:
        raise StackError(f"could not stop {name}: pids {left} survived SIGKILL")
    pidfile(layout, name).unlink(missing_ok=True)
    return True


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def log_tail(layout: Layout, name: str, lines: int = 25) -> str:
    path = log_path(layout, name)
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_healthy(
    layout: Layout,
    name: str,
    check: Callable[[], bool],
    timeout_s: float,
    what: str,
    interval_s: float = 0.5,
) -> None:
    """Poll `check` until True; fail early if the process died, and after `timeout_s`.

    The error names the service, the log file and its last lines.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if running(layout, name) is None:
            raise StackError(
                f"{name} exited while waiting for {what}; log {log_path(layout, name)}:\n"
                + log_tail(layout, name)
            )
        time.sleep(interval_s)
    raise StackError(
        f"{name}: no {what} after {timeout_s:.0f} s; log {log_path(layout, name)}:\n"
        + log_tail(layout, name)
    )


def run_checked(argv: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    """Run a short command; a failure raises StackError with its output."""
    kwargs.setdefault("timeout", 120)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise StackError(f"{what} failed: {e}") from None
    if done.returncode != 0:
        raise StackError(
            f"{what} failed (exit {done.returncode}): {' '.join(argv)}\n"
            f"{(done.stdout + done.stderr).strip()[-2000:]}"
        )
    return done


def environ_base() -> dict[str, str]:
    """The caller's environment without settings that would point a service elsewhere.

    This interpreter's bin folder comes first on PATH: flow runs call `dvc` and `torchrun`.
    """
    drop = ("MLFLOW_", "PREFECT_", "AWS_", "PG")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env
