"""Where the team stack keeps its files, its ports and its generated credentials.

Everything lives under `<project>/.lmforge/` (git-ignored):

    .lmforge/stack.env           client settings: URLs + credentials (0600), `source`-able
    .lmforge/stack/server.env    server-only secrets (database passwords, Flask key), 0600
    .lmforge/stack/pids/         one pidfile per process `lmforge stack up` started
    .lmforge/stack/logs/         one log per service
    .lmforge/stack/data/         PostgreSQL, SeaweedFS and Prefect data, kept by `down`

The service config files come from the checkout's `docker/` folder, the same files that
docker/compose.yaml mounts; nothing here duplicates them.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shlex
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import LmforgeError

# The checkout's docker/ folder: pipeline/ops/stack/layout.py -> parents[3] is the checkout.
CONFIG_DIR = Path(__file__).resolve().parents[3] / "docker"
AUTH_INI = CONFIG_DIR / "mlflow" / "basic_auth.ini"
INIT_SQL = CONFIG_DIR / "postgres" / "init.sql"
S3_TEMPLATE = CONFIG_DIR / "seaweedfs" / "s3.json.template"
PREFECT_SETTINGS = CONFIG_DIR / "prefect" / "prefect.env"
CONFIG_FILES = (AUTH_INI, INIT_SQL, S3_TEMPLATE, PREFECT_SETTINGS)

DEFAULT_PORT_BASE = 15400
BUCKETS = ("mlflow", "dvc")
ADMIN_USER = "admin"
WORK_POOL = "lmforge-process"
DVC_REMOTE = "stack"
PORT_OFFSETS = {
    "postgres": 0,
    "mlflow": 1,
    "prefect": 2,
    "s3": 3,
    "weed_master": 4,
    "weed_volume": 5,
    "weed_filer": 6,
}
# SeaweedFS also listens on each of its ports + 10000 (gRPC): keep the base low enough.
MAX_PORT_BASE = 65535 - 10000 - max(PORT_OFFSETS.values())

# Server-only secrets, generated once and kept in server.env: the MLflow admin password is
# written into the auth database on the first start and must stay the same afterwards.
SERVER_SECRETS = (
    "MLFLOW_DB_PASSWORD",
    "MLFLOW_AUTH_DB_PASSWORD",
    "PREFECT_DB_PASSWORD",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "PREFECT_AUTH_PASSWORD",
    "S3_ACCESS_KEY",
    "S3_SECRET_KEY",
)


class StackError(LmforgeError):
    """The team stack could not be started, reached or stopped; the message says why."""


@dataclass(frozen=True)
class Layout:
    """The paths of one project's stack."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / ".lmforge" / "stack"

    @property
    def client_env(self) -> Path:
        return self.root / ".lmforge" / "stack.env"

    @property
    def server_env(self) -> Path:
        return self.state / "server.env"

    @property
    def pids(self) -> Path:
        return self.state / "pids"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    def data(self, service: str) -> Path:
        return self.state / "data" / service

    @property
    def s3_config(self) -> Path:
        return self.state / "s3.json"

    @property
    def pg_socket_dir(self) -> Path:
        """PostgreSQL's socket folder: short (a socket path has ~107 bytes), one per stack."""
        digest = hashlib.sha1(str(self.state.resolve()).encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"lmforge-pg-{digest}"


@dataclass(frozen=True)
class Ports:
    base: int

    def __getattr__(self, name: str) -> int:
        if name in PORT_OFFSETS:
            return self.base + PORT_OFFSETS[name]
        raise AttributeError(name)


def check_config_files() -> None:
    """Fail naming the missing docker/ file (e.g. a non-editable install has no docker/)."""
    for path in CONFIG_FILES:
        if not path.is_file():
            raise StackError(
                f"missing stack config file {path}: `lmforge stack` needs the checkout's "
                "docker/ folder (install the project with `pip install -e .`)"
            )


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically with mode 0600 (the file holds credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp creates the file with mode 0600
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_env_file(path: Path) -> dict[str, str]:
    """`KEY=VALUE` / `export KEY=VALUE` lines (shell quoting), comments and blanks skipped."""
    values: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        if words and words[0] == "export":
            words = words[1:]
        if len(words) != 1 or "=" not in words[0]:
            raise StackError(f"{path}:{lineno}: expected KEY=VALUE, got {raw!r}")
        key, value = words[0].split("=", 1)
        values[key] = value
    return values


def env_file_text(values: dict[str, str], header: str) -> str:
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def load_server_secrets(layout: Layout, port_base: int | None) -> dict[str, str]:
    """server.env's secrets and port base, generating what is missing (kept across `up`s)."""
    known = read_env_file(layout.server_env) if layout.server_env.is_file() else {}
    for key in SERVER_SECRETS:
        known.setdefault(key, secrets.token_hex(16))  # hex: safe in URLs, ini, JSON, shell
    if port_base is not None:
        known["LMFORGE_STACK_PORT_BASE"] = str(port_base)
    known.setdefault("LMFORGE_STACK_PORT_BASE", str(DEFAULT_PORT_BASE))
    base = int(known["LMFORGE_STACK_PORT_BASE"])
    if not 1024 <= base <= MAX_PORT_BASE:
        raise StackError(f"port base {base} out of range: expected 1024..{MAX_PORT_BASE}")
    header = "lmforge team stack: server-only secrets (generated). Never commit this file."
    write_private(layout.server_env, env_file_text(known, header))
    return known


def client_settings(secret: dict[str, str], ports: Ports) -> dict[str, str]:
    """What a client, a worker or `lmforge --stack` needs: URLs and credentials."""
    return {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports.mlflow}",
        "MLFLOW_TRACKING_USERNAME": ADMIN_USER,
        "MLFLOW_TRACKING_PASSWORD": secret["MLFLOW_AUTH_ADMIN_PASSWORD"],
        "PREFECT_API_URL": f"http://127.0.0.1:{ports.prefect}/api",
        "PREFECT_API_AUTH_STRING": f"{ADMIN_USER}:{secret['PREFECT_AUTH_PASSWORD']}",
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{ports.s3}",
        "AWS_ACCESS_KEY_ID": secret["S3_ACCESS_KEY"],
        "AWS_SECRET_ACCESS_KEY": secret["S3_SECRET_KEY"],
    }


def render_template(template: Path, values: dict[str, str]) -> str:
    """`${NAME}` placeholders of `template` filled from `values`; a missing one is an error."""
    try:
        return string.Template(template.read_text()).substitute(values)
    except KeyError as e:
        raise StackError(f"{template}: no value for placeholder ${{{e.args[0]}}}") from None
