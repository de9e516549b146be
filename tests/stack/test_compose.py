"""docker/compose.yaml, checked without Docker: its services, ports, health checks, volumes and
secrets, and that it mounts the very config files `lmforge stack up` uses.

CI cannot pull images, so nothing here starts a container. `docker compose config` (or
Debian's docker-compose 1.29) also validates the file where one is installed.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.ops.stack.layout import (
    AUTH_INI,
    CONFIG_DIR,
    CONFIG_FILES,
    INIT_SQL,
    PREFECT_SETTINGS,
    S3_TEMPLATE,
    read_env_file,
)

COMPOSE = CONFIG_DIR / "compose.yaml"
ENV_EXAMPLE = CONFIG_DIR / ".env.example"
SERVICES = {"postgres", "init-db", "render-s3-config", "seaweedfs", "init-buckets", "mlflow",
            "prefect", "worker", "trainer"}  # fmt: skip
ONE_SHOTS = {"init-db", "render-s3-config", "init-buckets"}
PUBLISHED = {"seaweedfs": 8333, "mlflow": 5000, "prefect": 4200}
SECRET_WORDS = ("PASSWORD", "SECRET", "KEY", "AUTH_STRING")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume entry (short syntax `src:dst[:mode]`)."""
    out = []
    for entry in service.get("volumes", []):
        src, dst = entry.split(":")[:2]
        out.append((src, dst))
    return out


def _command(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return cmd if isinstance(cmd, list) else cmd.split()


def test_every_service_is_there_with_a_health_check(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no health check"
        assert service.get("image") or service.get("build"), name
    for name in ONE_SHOTS:
        assert services[name]["restart"] == "no", name
    for name in SERVICES - ONE_SHOTS:
        assert services[name]["restart"] == "unless-stopped", name


def test_ports_are_published_on_loopback_by_default(compose: dict) -> None:
    env = read_env_file(ENV_EXAMPLE)
    for name, port in PUBLISHED.items():
        (mapping,) = compose["services"][name]["ports"]
        host, container = mapping.rsplit(":", 1)
        assert int(container) == port, name
        var = re.fullmatch(r"\$\{(\w+):-([\d.:]+)\}", host)
        assert var, f"{name}: publish address should be ${{VAR:-127.0.0.1:PORT}}, got {host}"
        assert var.group(2) == f"127.0.0.1:{port}" and env[var.group(1)] == var.group(2)
    for name in SERVICES - set(PUBLISHED):
        assert "ports" not in compose["services"][name], f"{name} should not be published"


def test_named_volumes_are_declared_and_used(compose: dict) -> None:
    declared = set(compose["volumes"])
    used = {src for s in compose["services"].values() for src, _ in _mounts(s)
            if not src.startswith(".")}  # fmt: skip
    assert used == declared == {"postgres-data", "seaweedfs-data", "seaweedfs-config"}
    assert ("postgres-data", "/var/lib/postgresql/data") in _mounts(compose["services"]["postgres"])
    assert ("seaweedfs-data", "/data") in _mounts(compose["services"]["seaweedfs"])


def test_compose_mounts_the_process_launchers_config_files(compose: dict) -> None:
    """Each bind mount exists, and the config files are exactly the launcher's (layout.py)."""
    mounted: set[Path] = set()
    for name, service in compose["services"].items():
        for src, _ in _mounts(service):
            if src.startswith("."):
                path = (CONFIG_DIR / src).resolve()
                assert path.exists(), f"{name}: mounts missing {path}"
                if path.is_file():
                    mounted.add(path)
        for env_file in service.get("env_file", []):
            mounted.add((CONFIG_DIR / env_file).resolve())
    assert mounted == {p.resolve() for p in CONFIG_FILES}
    services = compose["services"]
    assert (
        "./mlflow/basic_auth.ini",
        services["mlflow"]["environment"]["MLFLOW_AUTH_CONFIG_PATH"],
    ) in _mounts(services["mlflow"])
    assert services["prefect"]["env_file"] == [f"./{PREFECT_SETTINGS.relative_to(CONFIG_DIR)}"]
    rendered = _command(services["render-s3-config"])[-2]
    assert ("./" + str(S3_TEMPLATE.relative_to(CONFIG_DIR)), rendered) in _mounts(
        services["render-s3-config"]
    )
    sql_arg = _command(services["init-db"])[-1].split("-f ")[-1].strip()
    assert ("./postgres/init.sql", sql_arg) in _mounts(services["init-db"])


def test_secrets_come_from_env_and_every_variable_has_an_example(compose: dict) -> None:
    text = COMPOSE.read_text()
    assert not re.search(r"\$\{[^}]*\$\{", text), "compose v1 rejects nested ${A:-${B}}"
    example = read_env_file(ENV_EXAMPLE)
    used = set(re.findall(r"\$\{(\w+)", text))
    assert used <= set(example), f"not in .env.example: {sorted(used - set(example))}"
    for key, value in example.items():
        if any(word in key for word in SECRET_WORDS):
            assert value == "change-me", f".env.example must not hold a real secret: {key}"
            assert f"${{{key}:?" in text, f"{key}: a missing secret must stop compose"
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in SECRET_WORDS) and key != "MLFLOW_AUTH_CONFIG_PATH":
                assert "${" in str(value), f"{name}.{key} is a literal secret"
    assert "/docker/.env" in (CONFIG_DIR.parent / ".gitignore").read_text().splitlines()


def test_mlflow_prefect_and_workers_are_configured_for_team_mode(compose: dict) -> None:
    services = compose["services"]
    mlflow = _command(services["mlflow"])
    assert mlflow[:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    assert "--serve-artifacts" in mlflow and "--allowed-hosts" in mlflow
    assert mlflow[mlflow.index("--artifacts-destination") + 1] == "s3://mlflow/artifacts"
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://mlflow:")
    prefect_db = services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://prefect:")
    seaweed = _command(services["seaweedfs"])
    assert "-s3.config=/rendered/s3.json" in seaweed and "-master.telemetry=false" in seaweed
    worker, trainer = _command(services["worker"]), _command(services["trainer"])
    assert worker[:3] == trainer[:3] == ["prefect", "worker", "start"]
    assert worker[worker.index("--pool") + 1] == "lmforge-process"
    assert "--type" in trainer and trainer[trainer.index("--type") + 1] == "process"
    (device,) = services["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert services["trainer"]["profiles"] == ["gpu"]
    for name in ("worker", "trainer"):
        client = services[name]["environment"]
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_URL",
                    "PREFECT_API_AUTH_STRING", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY"):  # fmt: skip
            assert key in client, f"{name}: missing {key}"


def test_dockerfiles_build_the_project_on_the_right_bases(compose: dict) -> None:
    for name, dockerfile in (("mlflow", "Dockerfile"), ("trainer", "Dockerfile.trainer")):
        assert compose["services"][name]["build"]["dockerfile"] == f"docker/{dockerfile}"
        text = (CONFIG_DIR / dockerfile).read_text()
        assert "pip install -e ." in text, dockerfile
        ignore = (CONFIG_DIR / f"{dockerfile}.dockerignore").read_text().splitlines()
        assert {"docker/.env", ".lmforge", ".venv"} <= set(ignore), dockerfile
    trainer_base = re.search(r"ARG BASE=(\S+)", (CONFIG_DIR / "Dockerfile.trainer").read_text())
    assert trainer_base and "pytorch/pytorch" in trainer_base.group(1)
    assert "cuda" in trainer_base.group(1)


def test_service_config_files_hold_no_secret_and_agree_on_names() -> None:
    ini = configparser.ConfigParser()
    ini.read(AUTH_INI)
    auth = ini["mlflow"]
    assert auth["default_permission"] == "NO_PERMISSIONS"
    assert auth["admin_username"] == "admin" and "admin_password" not in auth
    assert auth["database_uri"] == "postgresql+psycopg2://mlflow_auth@/mlflow_auth"
    sql = INIT_SQL.read_text()
    for role in ("mlflow", "mlflow_auth", "prefect"):
        assert f"ALTER ROLE {role} WITH LOGIN PASSWORD :'{role}_password';" in sql
    s3 = S3_TEMPLATE.read_text()
    assert "${S3_ACCESS_KEY}" in s3 and "${S3_SECRET_KEY}" in s3 and "anonymous" not in s3
    settings = read_env_file(PREFECT_SETTINGS)
    assert settings["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert not any(word in k for k in settings for word in ("PASSWORD", "AUTH_STRING"))


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    """Only where Docker's compose is installed (not in CI: no images can be pulled there)."""
    for argv in (["docker", "compose"], ["docker-compose"]):
        if (
            shutil.which(argv[0])
            and subprocess.run([*argv, "version"], capture_output=True, check=False).returncode == 0
        ):
            break
    else:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    done = subprocess.run(
        [*argv, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
