"""Helpers of the fault suite (tests/faults/): processes stopped by pid, bounded waits.

Every fault there is done for real, and every process a test starts dies with it: a test
registers what it starts with the `procs` fixture (tests/conftest.py); at teardown every
registered process group still alive gets SIGTERM, then SIGKILL after a grace period, by
pid. So a failing assertion never leaves a training run, a server or a worker behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import pytest


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is still alive (signal 0 checks, sends nothing)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop every process of `proc`'s group (its own session): SIGTERM, then SIGKILL.

    The group, not only `proc`: a launcher that died may leave workers behind (torchrun's
    children, a server's subprocesses). Waits up to `grace_s` after SIGTERM.
    """
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, so its pid stops counting as alive
            if not group_alive(proc.pid):
                break
            time.sleep(0.1)
        else:
            continue
        break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


class Procs:
    """Starts processes in their own session (process group) and stops them all at teardown."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, args: list[str], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("start_new_session", True)  # one group to signal, as a scheduler would
        proc = subprocess.Popen(args, **kwargs)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            stop_group(proc)


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    """Poll `predicate` until it returns a truthy value; fail naming `what` after `timeout_s`.

    A bound on waiting for a fault's precondition, not a timed assertion on speed.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
