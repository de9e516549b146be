"""`lmforge stack up | down | status`: the team stack as local processes on loopback.

lmforge stack up          # PostgreSQL, SeaweedFS, MLflow (basic auth), Prefect, a worker
source .lmforge/stack.env # or: lmforge --stack run --preset ci
lmforge stack status      # each service's URL, pid and health
lmforge stack down        # stops exactly what `up` started; the data stays for next `up`
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline.ops.stack import processes, services
from pipeline.ops.stack.layout import (
    ADMIN_USER,
    DVC_REMOTE,
    Layout,
    Ports,
    StackError,
    check_config_files,
    client_settings,
    env_file_text,
    load_server_secrets,
    read_env_file,
    write_private,
)

# Start order; `down` stops the others together, then PostgreSQL, which stops fast on
# SIGINT ("fast shutdown": SIGTERM would wait for every client to disconnect).
SERVICES = ("postgres", "seaweedfs", "mlflow", "prefect", "worker")
STOP_SIGNAL = {"postgres": signal.SIGINT}
# Seconds from the first signal to SIGKILL. weed and the worker were seen ignoring SIGTERM
# for 10-18 s: a longer wait for them would only slow `down`.
STOP_GRACE_S = {"postgres": 30.0, "seaweedfs": 8.0, "mlflow": 15.0, "prefect": 15.0, "worker": 8.0}
CLIENT_HEADER = """lmforge team stack (`lmforge stack up`): URLs and credentials. Never commit it.
Load it with `source .lmforge/stack.env`, or run `lmforge --stack <command>`."""


@dataclass(frozen=True)
class Health:
    name: str
    url: str
    pid: int | None
    healthy: bool


def _ports(layout: Layout) -> tuple[Ports, dict[str, str]]:
    if not layout.server_env.is_file():
        raise StackError(f"no stack here: {layout.server_env} is missing (run `lmforge stack up`)")
    secret = read_env_file(layout.server_env)
    return Ports(int(secret["LMFORGE_STACK_PORT_BASE"])), secret


def up(root: Path, port_base: int | None = None, echo: Callable[[str], None] = print) -> Path:
    """Start every service not yet running, wait for each to be healthy; return stack.env.

    A service that fails to come up stops everything this stack runs, so a failed `up`
    leaves no half-started stack behind; its error names the service and its log.
    """
    check_config_files()
    layout = Layout(root.resolve())
    secret = load_server_secrets(layout, port_base)
    ports = Ports(int(secret["LMFORGE_STACK_PORT_BASE"]))
    client = client_settings(secret, ports)
    write_private(layout.client_env, env_file_text(client, CLIENT_HEADER))
    steps: list[tuple[str, Callable[[], None]]] = [
        ("postgres", lambda: services.start_postgres(layout, ports, secret)),
        ("seaweedfs", lambda: services.start_seaweedfs(layout, ports, secret)),
        ("mlflow", lambda: services.start_mlflow(layout, ports, secret)),
        ("prefect", lambda: services.start_prefect(layout, ports, secret)),
        ("worker", lambda: services.start_worker(layout, ports, secret, client)),
    ]
    try:
        for name, step in steps:
            began = time.monotonic()
            was = processes.running(layout, name)
            echo(f"{name:10s} {'already running' if was else 'starting'} ...")
            step()
            echo(f"{name:10s} healthy ({time.monotonic() - began:.0f} s)  {_url(name, ports)}")
        use_dvc_remote(layout.root, echo)
    except (StackError, OSError) as e:
        echo(f"stack up failed, stopping what runs: {e}")
        down(root, echo=echo)
        raise StackError(str(e)) from None
    echo(f"\nwrote {layout.client_env}: `source {layout.client_env}` or `lmforge --stack ...`")
    return layout.client_env


def use_dvc_remote(root: Path, echo: Callable[[str], None] = print) -> None:
    """Make the committed S3 remote `stack` this checkout's default, in .dvc/config.local.

    The committed .dvc/config names the bucket only; the endpoint and keys come from
    stack.env's AWS_* variables. Outside a DVC project there is nothing to do.
    """
    if not (root / ".dvc").is_dir():
        return
    argv = [services.venv_tool("dvc"), "remote", "default", "--local", DVC_REMOTE]
    processes.run_checked(argv, "dvc remote default", cwd=root)
    echo(f"dvc: default remote of this checkout is now `{DVC_REMOTE}` (.dvc/config.local)")


def down(root: Path, echo: Callable[[str], None] = print) -> list[str]:
    """Stop, by pid, every process `up` started; return the names stopped.

    The worker and the servers stop together (each may take its grace period before the
    SIGKILL), PostgreSQL last, once nothing writes to it any more.
    """
    layout = Layout(root.resolve())

    def stop_one(name: str) -> str | None:
        sig = STOP_SIGNAL.get(name, signal.SIGTERM)
        return name if processes.stop(layout, name, sig, STOP_GRACE_S[name]) else None

    stopped: list[str] = []
    for group in (SERVICES[1:], SERVICES[:1]):
        with ThreadPoolExecutor(max_workers=len(group)) as pool:
            done = list(pool.map(stop_one, group))  # re-raises a StackError of any
        for name in filter(None, done):
            echo(f"{name:10s} stopped")
            stopped.append(name)
    with contextlib.suppress(OSError):  # PostgreSQL's socket folder, empty once it stopped
        layout.pg_socket_dir.rmdir()
    if not stopped:
        echo("no stack process was running")
    return stopped


def status(root: Path) -> list[Health]:
    """Each service's URL, pid (None when not running) and whether it answers."""
    layout = Layout(root.resolve())
    ports, secret = _ports(layout)
    checks: dict[str, Callable[[], bool]] = {
        "postgres": lambda: services.port_open(ports.postgres),
        "seaweedfs": lambda: services.http_status(f"http://127.0.0.1:{ports.s3}/") != 0,
        "mlflow": lambda: services.http_status(f"http://127.0.0.1:{ports.mlflow}/health") == 200,
        "prefect": lambda: (
            services.http_status(f"http://127.0.0.1:{ports.prefect}/api/ready") == 200
        ),
        "worker": lambda: services.worker_registered(ports, secret),
    }
    report = []
    for name in SERVICES:
        proc = processes.running(layout, name)
        report.append(Health(name, _url(name, ports), proc.pid if proc else None,
                             bool(proc) and checks[name]()))  # fmt: skip
    return report


def _url(name: str, ports: Ports) -> str:
    return {
        "postgres": f"postgresql://127.0.0.1:{ports.postgres}",
        "seaweedfs": f"http://127.0.0.1:{ports.s3} (S3)",
        "mlflow": f"http://127.0.0.1:{ports.mlflow} (user {ADMIN_USER})",
        "prefect": f"http://127.0.0.1:{ports.prefect}/api",
        "worker": "pool lmforge-process",
    }[name]


def load_client_env(root: Path) -> dict[str, str]:
    """stack.env's settings, for `lmforge --stack`; a clear error when it is missing."""
    path = Layout(root.resolve()).client_env
    if not path.is_file():
        raise StackError(f"{path} not found: start the stack with `lmforge stack up` first")
    return read_env_file(path)
