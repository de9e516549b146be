"""Helpers of the fault suite (tests/faults/): processes stopped by pid, bounded waits.

Every fault there is done for real, and every process a test starts dies with it: a test
registers what it starts with the `procs` fixture (tests/conftest.py); at teardown every
registered process group still alive gets SIGTERM, then SIGKILL after a grace period, by
pid. So a failing assertion never leaves a training run, a server or a worker behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

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


# --- Helpers of the checkpoint, disk and corruption faults (rows 1, 2, 7, 8, 9) --------

BIN = Path(sys.executable).parent

# What an interrupted atomic write leaves (pipeline/core/io.py, pipeline/text/shards.py):
# `.<name>.<pid>.<random>.tmp` / `.<name>.<random>.tmp` files and folders, the swapped-out
# `.<name>.old`, and anything else ending in `.tmp`. DVC's own state (`.dvc/`) is not ours.
_TEMP_NAME = re.compile(r"(^\..+\.tmp$)|(^\..+\.old$)|(\.tmp$)")


def leftover_temporaries(root: Path) -> list[Path]:
    """Every temporary file or folder under `root` (outside `.dvc/`), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == Path(root) and ".dvc" in dirnames:
            dirnames.remove(".dvc")
        for name in [*dirnames, *filenames]:
            if _TEMP_NAME.search(name):
                found.append(Path(dirpath) / name)
    return sorted(found)


def md5_files(root: Path, *rel: str) -> dict[str, str]:
    """{relative path: md5} of every file under the paths `rel` of `root` (files or folders)."""
    out = {}
    for r in rel:
        base = Path(root) / r
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for f in files:
            out[f.relative_to(root).as_posix()] = hashlib.md5(f.read_bytes()).hexdigest()
    return out


def flip_bytes(path: Path, offset: int, count: int = 1, mask: int = 0xFF) -> None:
    """XOR `count` bytes of the file at `offset` (negative: from the end) with `mask`.

    The default inverts every bit; `mask=1` is a one-bit flip (bit rot), which keeps an
    ASCII digit a digit, so a JSON file stays valid JSON with another number in it.
    """
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        start = offset if offset >= 0 else size + offset
        f.seek(start)
        chunk = f.read(count)
        f.seek(start)
        f.write(bytes(b ^ mask for b in chunk))


def truncate(path: Path, keep: int) -> None:
    """Cut the file down to its first `keep` bytes (a torn write, a full copy that stopped)."""
    with open(path, "r+b") as f:
        f.truncate(keep)


def dvc_env(**extra: str) -> dict[str, str]:
    """The environment of a `dvc repro` child: this venv first, no inherited DVC/torchrun vars."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "TORCHELASTIC"))}
    env |= {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    return env | extra


class LineWatcher:
    """Collects a child's output lines on a thread, so waits on them can be bounded."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)
        self.closed.set()

    def wait_for_line(self, pattern: str, timeout_s: float) -> re.Match:
        """The first match of regex `pattern` in a line; fails naming it after `timeout_s`."""
        rx = re.compile(pattern)

        def found():
            hits = (rx.search(line) for line in list(self.lines))
            return next((m for m in hits if m), None) or (self.closed.is_set() and "eof")

        got = wait_for(found, timeout_s, f"a line matching {pattern!r}", interval_s=0.05)
        if got == "eof":
            pytest.fail(f"output ended without {pattern!r}:\n{self.text()[-3000:]}")
        return got

    def text(self) -> str:
        return "".join(self.lines)


def can_mount() -> str | None:
    """None if this process may mount a tmpfs (root on Linux); else why it may not."""
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        return "no Linux mount(8) here"
    if os.geteuid() != 0:
        return f"mounting a tmpfs needs root (uid {os.geteuid()})"
    import tempfile

    with tempfile.TemporaryDirectory() as probe:  # root in a container may still be refused
        mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe]
        done = subprocess.run(mount, capture_output=True, text=True)
        if done.returncode:
            return f"mount refused: {done.stderr.strip()}"
        subprocess.run(["umount", probe], check=False)
    return None


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "64m"):
    """A real, small filesystem (tmpfs of `size`) mounted on `folder`; unmounted at the end.

    `remount(size)` shrinks it later (tmpfs allows any size at or above what is in use),
    so a test fills it exactly: previous outputs in, too little room for the next ones.
    """
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        done = subprocess.run(["umount", str(folder)], capture_output=True)
        if done.returncode:  # something still has a file open there: detach it anyway
            subprocess.run(["umount", "-l", str(folder)], check=False)


def remount(folder: Path, size_bytes: int) -> None:
    """Resize the tmpfs on `folder` to `size_bytes` (rounded up to whole KiB)."""
    size = f"size={-(-size_bytes // 1024)}k"
    subprocess.run(["mount", "-o", f"remount,{size}", str(folder)], check=True)


def used_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def file_size_limit(max_bytes: int):
    """A `preexec_fn` capping files the child writes at `max_bytes` (RLIMIT_FSIZE).

    SIGXFSZ is ignored, so an over-long write fails with EFBIG instead of killing the child:
    the fallback of the disk-full faults where no filesystem can be mounted.
    """

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


def group_memory_kb(pgid: int) -> tuple[int, int]:
    """(sum of VmRSS, sum of VmHWM) in kB over the live processes of group `pgid`.

    Read from /proc/<pid>/status. VmHWM is each process's peak resident size so far, so
    the sum bounds the group's peak from above. A process that exits while being read is
    skipped.
    """
    rss = hwm = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != pgid:
                continue
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f.read().splitlines())
        except (OSError, ValueError):  # gone, or not ours to read
            continue
        rss += int(fields.get("VmRSS", "0 kB").split()[0])
        hwm += int(fields.get("VmHWM", "0 kB").split()[0])
    return rss, hwm


# --- Helpers of the orchestration faults (rows 3, 4, 5, 6, 10): servers, flows, Prefect ---


def free_port() -> int:
    """A loopback port free right now (bound, then released) for a server to listen on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    """Whether GET `url` answers 200 within a few seconds."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_mlflow_server(procs, folder: Path, port: int, timeout_s: float = 240.0):
    """A real `mlflow server` (SQLite store and artifacts in `folder`) on 127.0.0.1:`port`.

    Started with `procs` (its own process group, stopped at teardown); returns once its
    /health answers. One worker: the test needs a server, not throughput, on 2 cores.
    The same `folder` and `port` give the same server back after a kill (same store).
    """
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / f"server-{port}.log", "ab")  # noqa: SIM115 (the child holds it)
    proc = procs.start(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            "--default-artifact-root",
            str(folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dvc_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
    )
    log.close()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            tail = (folder / f"server-{port}.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{tail}")
        return http_ok(f"{url}/health")

    wait_for(up, timeout_s, f"mlflow server on {url}", interval_s=0.5)
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process of `proc`'s group (a crash, not a shutdown) and reap the leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    wait_for(lambda: not group_alive(proc.pid), 30, f"process group {proc.pid} to be gone")


def orchestrated_project(base: Path, overrides: list[str], stages: list) -> Path:
    """A project the real flow runs in: the repo's dvc.yaml and pipeline/ code, git, DVC.

    SMALL_DATA + `overrides` in params.yaml; `stages` (stage modules, in chain order) are
    run in-process and recorded in dvc.lock with `dvc commit`, so DVC sees them up to date
    and the flow skips them. One git commit, for `dvc exp save`.
    """
    from conftest import REPO, prepared_project

    root = prepared_project(base, overrides, stages)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__py*"))
    (root / ".dvcignore").write_text("__pycache__/\n")
    (root / ".gitignore").write_text("__pycache__/\nmlflow.db\n/mlruns/\n/.lmforge/\n/models/\n")
    env = dvc_env(HOME=str(root))

    def run(*argv: str) -> None:
        done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"

    run("git", "init", "-q")
    run(str(BIN / "dvc"), "init", "-q")
    names = [s.__name__.rsplit(".", 1)[-1] for s in stages]
    if names:
        run(str(BIN / "dvc"), "commit", "-f", "-q", *names)
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return root


def flow_env(api_url: str, **extra: str) -> dict[str, str]:
    """Environment of a flow process: the Prefect server at `api_url`, offline, quick to
    give up on a dead tracking server (no HTTP retries inside MLflow: Prefect retries)."""
    return dvc_env(
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONDONTWRITEBYTECODE="1",
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="10",
        **extra,
    )


def flow_run_state(flow_run_id: str):
    """The current state of a flow run, read from the Prefect API."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def task_run_states(flow_run_id: str) -> dict[str, list[str]]:
    """{task run name: [state names]} of a flow run's task runs (the API's record of them)."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(str(flow_run_id))]))
    with get_client(sync_client=True) as client:
        found = client.read_task_runs(flow_run_filter=runs)
    out: dict[str, list[str]] = {}
    for t in found:
        out.setdefault(t.name, []).append(t.state.name if t.state else "?")
    return out


def flow_run_logs(flow_run_id: str) -> str:
    """Every log line the flow run sent to the Prefect API, in order."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    wanted = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(str(flow_run_id))]))
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=wanted, limit=200)
        out, offset = list(logs), len(logs)
        while len(logs) == 200:
            logs = client.read_logs(log_filter=wanted, limit=200, offset=offset)
            out += logs
            offset += len(logs)
    return "\n".join(log.message for log in sorted(out, key=lambda lg: lg.timestamp))


def processes_in(folder: Path) -> list[int]:
    """Pids of the live processes whose working directory is `folder` (or below it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = Path(os.readlink(f"/proc/{entry}/cwd"))
        except OSError:
            continue
        if cwd == folder or folder in cwd.parents:
            pids.append(int(entry))
    return pids


def cmdline(pid: int) -> str:
    """The command line of process `pid` ('' once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""
