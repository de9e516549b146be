"""Helpers of the team-stack tests: the project copy, free ports, the stack's processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from pipeline.ops.stack.layout import PORT_OFFSETS, Layout, Ports
from pipeline.ops.stack.services import pg_bin

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SKIP_TOP = {".venv", ".git", "data", "models", "reports", "mlflow.db", "mlruns", "mlartifacts",
            "dvc.lock", ".lmforge"}  # fmt: skip
CACHES = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*_cache", ".hypothesis", "tmp")


@dataclass
class Stack:
    root: Path
    env: dict[str, str]  # what stack.env exports
    ports: Ports
    up_output: str

    def client_env(self, **extra: str) -> dict[str, str]:
        """A client's environment: the caller's minus any stack setting, plus stack.env's."""
        return clean_env() | self.env | extra


def clean_env() -> dict[str, str]:
    drop = ("MLFLOW_", "PREFECT_", "AWS_", "LMFORGE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["OMP_NUM_THREADS"] = "1"  # a tiny model on a shared 2-core machine
    return env


def lmforge(root: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600):
    return subprocess.run(
        [str(BIN / "lmforge"), *args],
        cwd=root,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True)
    return done.stdout


def _ignore(folder: str, names: list[str]) -> set[str]:
    skip = set(CACHES(folder, names))
    return skip | (SKIP_TOP & set(names) if Path(folder) == REPO else set())


def free_port_base() -> int:
    """A base whose 7 ports and their SeaweedFS gRPC twins (+10000) are all free now."""
    for base in range(21000 + (os.getpid() % 50) * 20, 40000, 20):
        ports = [base + off + extra for off in PORT_OFFSETS.values() for extra in (0, 10000)]
        if all(_free(p) for p in ports):
            return base
    pytest.fail("no free block of loopback ports for the stack")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def require_postgres() -> None:
    """CI must have PostgreSQL (.ci/run installs it); elsewhere its absence skips."""
    try:
        pg_bin()
    except Exception as e:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is missing in CI ({e}); .ci/run should run make stack-deps")
        pytest.skip(f"PostgreSQL not installed ({e}): `make stack-deps`")


def stack_processes(root: Path) -> list[psutil.Process]:
    """Every live process of the stack's pidfiles and their descendants."""
    found = []
    for pidfile in Layout(root).pids.glob("*.pid"):
        with contextlib.suppress(psutil.Error, ValueError, KeyError, OSError):
            proc = psutil.Process(int(json.loads(pidfile.read_text())["pid"]))
            found += [proc, *proc.children(recursive=True)]
    return found


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def copy_project(dest: Path) -> Path:
    """The repo's work tree at `dest`, committed in a git repo of its own (DVC needs one)."""
    shutil.copytree(REPO, dest, ignore=_ignore)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return dest
