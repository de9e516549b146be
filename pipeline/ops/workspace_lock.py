"""One pipeline run per workspace: an exclusive OS file lock on `<root>/.lmforge/run.lock`.

Two runs in one work tree would interleave stages over the same outputs and params.yaml.
The second run therefore fails at once with a message naming the run that holds the lock
(`flock` is released by the OS when the holder dies, so a crashed run never blocks the
next one). DVC's own repo lock only covers one `dvc` command, not a whole pipeline run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.errors import LmforgeError

LOCK_FILE = Path(".lmforge") / "run.lock"


class WorkspaceBusy(LmforgeError):
    """Another pipeline run holds this workspace."""


# How long to wait for the holder's record: a run that has just taken the lock writes it next.
HOLDER_WAIT_S = 2.0


def _read_holder(path: Path) -> dict | None:
    """The holder's record, waiting briefly while it is still empty; None if unreadable."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        try:
            text = path.read_text()
        except OSError:
            return None
        if text or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _holder(path: Path) -> str:
    info = _read_holder(path)
    if not info:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("started", 0)))
    return (
        f"pid {info.get('pid')} on {info.get('host')} "
        f"(flow run {info.get('owner') or 'n/a'}, started {started})"
    )


@contextlib.contextmanager
def workspace_lock(root: Path, owner: str = "") -> Iterator[Path]:
    """Hold the workspace for the duration of the block, or raise `WorkspaceBusy`."""
    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkspaceBusy(
                f"{Path(root).resolve()} is in use by another pipeline run: {_holder(path)}. "
                "Wait for it to finish, or run in a separate clone of the repository."
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "owner": owner}
        record = json.dumps({**info, "started": time.time()}).encode()
        # write, then cut to length: a reader sees the old empty file or the whole record
        os.pwrite(fd, record, 0)
        os.ftruncate(fd, len(record))
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
