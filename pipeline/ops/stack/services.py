"""How each service of the team stack starts, and how its health is checked.

Every server binds to 127.0.0.1 only. Secrets reach the servers through their environment
(readable only by their owner), never through argv (readable by every local user in `ps`).
Prefect runs as a subprocess only: pipeline/ never imports prefect.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.ops.stack import processes
from pipeline.ops.stack.layout import (
    ADMIN_USER,
    AUTH_INI,
    BUCKETS,
    INIT_SQL,
    PREFECT_SETTINGS,
    S3_TEMPLATE,
    WORK_POOL,
    Layout,
    Ports,
    StackError,
    read_env_file,
    render_template,
    write_private,
)

PG_INSTALL_HINT = "install it with `make stack-deps` (apt-get install -y postgresql)"


def venv_tool(name: str) -> str:
    """A console script of this environment (mlflow, prefect, weed), else one on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        raise StackError(
            f"`{name}` not found next to {sys.executable} nor on PATH: run `make install`"
        )
    return found


# ----------------------------------------------------------------------------- health probes


def http_status(url: str, auth: tuple[str, str] | None = None, data: bytes | None = None) -> int:
    """The HTTP status of a GET (or a JSON POST when `data`), 0 when nothing answers."""
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    if data:
        request.add_header("Content-Type", "application/json")
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- PostgreSQL


def pg_bin() -> Path:
    """The newest PostgreSQL server binaries (Debian: /usr/lib/postgresql/<major>/bin)."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    found = shutil.which("postgres")
    if found:
        return Path(found).parent
    raise StackError(f"PostgreSQL server binaries not found; {PG_INSTALL_HINT}")


def pg_user() -> str | None:
    """As root, PostgreSQL runs as user `postgres` (it refuses root); else as the caller."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise StackError(
            f"running as root but there is no user `postgres`; {PG_INSTALL_HINT}"
        ) from None
    return "postgres"


def _own(path: Path, user: str | None, mode: int = 0o700) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if user:
        shutil.chown(path, user, user)
    path.chmod(mode)


def start_postgres(layout: Layout, ports: Ports, secret: dict[str, str]) -> None:
    """initdb on the first `up`, then `postgres` on 127.0.0.1, then docker/postgres/init.sql."""
    bindir, user = pg_bin(), pg_user()
    data, sock = layout.data("postgres"), layout.pg_socket_dir
    _own(sock, user)
    if not (data / "PG_VERSION").is_file():
        _own(data, user)
        processes.run_checked(
            [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
             "--auth-host=scram-sha-256", "-E", "UTF8"],
            f"initdb of {data} (as user {user or 'current'}; the path must be reachable by it)",
            user=user, group=user,
        )  # fmt: skip
    if processes.running(layout, "postgres") is None:
        argv = [str(bindir / "postgres"), "-D", str(data), "-c", "listen_addresses=127.0.0.1",
                "-p", str(ports.postgres), "-k", str(sock)]  # fmt: skip
        processes.start(layout, "postgres", argv, processes.environ_base(), data, user=user)
    processes.wait_healthy(
        layout, "postgres", lambda: pg_ready(bindir, sock, ports.postgres), 60, "connections"
    )
    script = (
        "".join(
            f"\\set {var} '{secret[key]}'\n"
            for var, key in (
                ("mlflow_password", "MLFLOW_DB_PASSWORD"),
                ("mlflow_auth_password", "MLFLOW_AUTH_DB_PASSWORD"),
                ("prefect_password", "PREFECT_DB_PASSWORD"),
            )
        )
        + f"\\i {INIT_SQL}\n"
    )  # passwords through stdin, not argv
    processes.run_checked(
        [str(bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(sock),
         "-p", str(ports.postgres), "-U", "postgres", "-d", "postgres", "-f", "-"],
        f"database init ({INIT_SQL})", input=script,
    )  # fmt: skip


def pg_ready(bindir: Path, sock: Path, port: int) -> bool:
    argv = [str(bindir / "pg_isready"), "-q", "-h", str(sock), "-p", str(port), "-U", "postgres"]
    return subprocess.run(argv, capture_output=True, timeout=10, check=False).returncode == 0


# ----------------------------------------------------------------------------- SeaweedFS


def s3_client(ports: Ports, secret: dict[str, str] | None):
    """A boto3 S3 client on the stack's endpoint; anonymous (unsigned) when `secret` is None."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    if secret is None:
        config = Config(signature_version=UNSIGNED, retries={"max_attempts": 1})
        keys = {}
    else:
        config = Config(retries={"max_attempts": 1})
        keys = {"aws_access_key_id": secret["S3_ACCESS_KEY"],
                "aws_secret_access_key": secret["S3_SECRET_KEY"]}  # fmt: skip
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{ports.s3}", region_name="us-east-1",
                        config=config, **keys)  # fmt: skip


def start_seaweedfs(layout: Layout, ports: Ports, secret: dict[str, str]) -> None:
    """`weed server` (master, volume, filer, S3) on loopback with the identities file; buckets."""
    write_private(layout.s3_config, render_template(S3_TEMPLATE, secret))
    data = layout.data("seaweedfs")
    data.mkdir(parents=True, exist_ok=True)
    if processes.running(layout, "seaweedfs") is None:
        argv = [
            venv_tool("weed"), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
            "-master.telemetry=false", f"-master.port={ports.weed_master}",
            f"-volume.port={ports.weed_volume}", f"-filer.port={ports.weed_filer}",
            # the default -volume.max (5) leaves the second bucket with "No writable volumes"
            "-volume.max=100", "-master.volumeSizeLimitMB=64", "-filer", "-s3",
            f"-s3.port={ports.s3}", f"-s3.config={layout.s3_config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]  # fmt: skip
        processes.start(layout, "seaweedfs", argv, processes.environ_base(), data)
    client = s3_client(ports, secret)
    processes.wait_healthy(layout, "seaweedfs", lambda: _lists(client), 120, "S3 answering")
    have = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in BUCKETS:
        if bucket not in have:
            client.create_bucket(Bucket=bucket)


def _lists(client) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.list_buckets()
    except (BotoCoreError, ClientError):
        return False
    return True


# ----------------------------------------------------------------------------- MLflow


def start_mlflow(layout: Layout, ports: Ports, secret: dict[str, str]) -> None:
    """MLflow with basic auth on PostgreSQL; artifacts proxied to s3://mlflow/artifacts."""
    if processes.running(layout, "mlflow") is None:
        env = processes.environ_base() | {
            "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg2://mlflow:{secret['MLFLOW_DB_PASSWORD']}"
            f"@127.0.0.1:{ports.postgres}/mlflow",
            "MLFLOW_AUTH_CONFIG_PATH": str(AUTH_INI),
            "MLFLOW_AUTH_ADMIN_PASSWORD": secret["MLFLOW_AUTH_ADMIN_PASSWORD"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secret["MLFLOW_FLASK_SERVER_SECRET_KEY"],
            # basic_auth.ini's database_uri names no host or password: libpq reads these
            "PGHOST": "127.0.0.1",
            "PGPORT": str(ports.postgres),
            "PGPASSWORD": secret["MLFLOW_AUTH_DB_PASSWORD"],
            "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{ports.s3}",
            "AWS_ACCESS_KEY_ID": secret["S3_ACCESS_KEY"],
            "AWS_SECRET_ACCESS_KEY": secret["S3_SECRET_KEY"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        # One uvicorn process: with more, uvicorn's supervisor kills any worker that misses a
        # 5 s health ping, which a loaded 2-core machine makes happen over and over.
        argv = [venv_tool("mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                "--port", str(ports.mlflow), "--artifacts-destination", "s3://mlflow/artifacts",
                "--serve-artifacts", "--workers", "1"]  # fmt: skip
        processes.start(layout, "mlflow", argv, env, layout.state)
    base = f"http://127.0.0.1:{ports.mlflow}"
    search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
    admin = (ADMIN_USER, secret["MLFLOW_AUTH_ADMIN_PASSWORD"])
    processes.wait_healthy(
        layout, "mlflow", lambda: http_status(search, admin) == 200, 300, "authenticated API"
    )


# ----------------------------------------------------------------------------- Prefect


def prefect_auth(secret: dict[str, str]) -> tuple[str, str]:
    return (ADMIN_USER, secret["PREFECT_AUTH_PASSWORD"])


def start_prefect(layout: Layout, ports: Ports, secret: dict[str, str]) -> None:
    """`prefect server start` on PostgreSQL with an auth string (docker/prefect/prefect.env)."""
    if processes.running(layout, "prefect") is None:
        home = layout.data("prefect")
        home.mkdir(parents=True, exist_ok=True)
        env = processes.environ_base() | read_env_file(PREFECT_SETTINGS) | {
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://prefect:"
            f"{secret['PREFECT_DB_PASSWORD']}@127.0.0.1:{ports.postgres}/prefect",
            "PREFECT_SERVER_API_AUTH_STRING": ":".join(prefect_auth(secret)),
        }  # fmt: skip
        argv = [venv_tool("prefect"), "server", "start", "--host", "127.0.0.1",
                "--port", str(ports.prefect)]  # fmt: skip
        processes.start(layout, "prefect", argv, env, home)
    health = f"http://127.0.0.1:{ports.prefect}/api/ready"
    processes.wait_healthy(layout, "prefect", lambda: http_status(health) == 200, 300, "/api/ready")


def start_worker(layout: Layout, ports: Ports, secret: dict[str, str], client_env: dict) -> None:
    """One process worker on pool lmforge-process, with the client settings of stack.env."""
    if processes.running(layout, "worker") is None:
        home = layout.data("worker")
        home.mkdir(parents=True, exist_ok=True)
        env = processes.environ_base() | client_env | {"PREFECT_HOME": str(home)}
        argv = [venv_tool("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process",
                "--name", f"lmforge-stack-{ports.base}"]  # fmt: skip
        processes.start(layout, "worker", argv, env, layout.root)
    processes.wait_healthy(
        layout, "worker", lambda: worker_registered(ports, secret), 180, "its registration"
    )


def worker_registered(ports: Ports, secret: dict[str, str]) -> bool:
    """Whether the stack's worker has sent a heartbeat to the pool."""
    url = f"http://127.0.0.1:{ports.prefect}/api/work_pools/{WORK_POOL}/workers/filter"
    request = urllib.request.Request(url, data=b"{}", method="POST")
    request.add_header("Content-Type", "application/json")
    token = base64.b64encode(":".join(prefect_auth(secret)).encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            workers = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False
    name = f"lmforge-stack-{ports.base}"
    return any(w.get("name") == name and w.get("status") == "ONLINE" for w in workers)
