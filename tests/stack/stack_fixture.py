"""The team stack of `lmforge stack up`, once per test module, in a throwaway git copy of the repo.

`running_stack` is the body of the module-scoped `stack` fixture in tests/conftest.py (a
conftest.py here would shadow that one's `from conftest import ...` for the whole run).

The project lives under /tmp, not pytest's tmp folder: as root, PostgreSQL runs as user
`postgres`, which must reach its data folder, and pytest's base folder is 0700 root-only.
At teardown `lmforge stack down` runs and the fixture asserts that no process the stack
started (nor any child of one) is still alive; a stray one is then killed, by pid.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
from stack_helpers import (
    Stack,
    alive,
    copy_project,
    free_port_base,
    lmforge,
    require_postgres,
    stack_processes,
)

from pipeline.ops.stack.layout import Layout, Ports, read_env_file


def running_stack() -> Iterator[Stack]:
    require_postgres()
    base = Path(tempfile.mkdtemp(prefix="lmforge-stack-"))
    base.chmod(0o755)
    root = copy_project(base / "repo")
    started: list[psutil.Process] = []
    try:
        up = lmforge(root, "stack", "up", "--port-base", str(free_port_base()), timeout=600)
        started = stack_processes(root)
        assert up.returncode == 0, up.stdout + up.stderr
        env = read_env_file(Layout(root).client_env)
        ports = Ports(int(read_env_file(Layout(root).server_env)["LMFORGE_STACK_PORT_BASE"]))
        yield Stack(root, env, ports, up.stdout)
        started += stack_processes(root)  # with the worker's flow runs, if any
    finally:
        down = lmforge(root, "stack", "down", timeout=300)
        left = alive(started)
        for p in left:  # never leave a server behind, even when the assertion below fails
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(base, ignore_errors=True)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not left, f"stack processes still alive after `lmforge stack down`: {left}"
