"""Scheduled and on-demand runs of the flow `lm-pipeline`: Prefect deployments and `serve`.

Team mode, a server and a process worker (the deployments are declared in prefect.yaml):

    prefect server start
    prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api
    lmforge deploy                  # = prefect work-pool create lmforge-process --type process
                                    #   + prefect deploy --all
    prefect worker start --pool lmforge-process
    prefect deployment run 'lm-pipeline/on-demand' --param preset=ci

One machine, no worker: serve the flow with a cron schedule (still needs a server, because an
ephemeral API has no scheduler):

    lmforge serve --cron "0 2 * * *" --timezone Europe/Berlin --preset default

Deployments run the code in place: prefect.yaml's pull step sets the working directory to the
project `prefect deploy` ran in. Nothing is built, pushed or cloned.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from prefect.client.schemas.schedules import CronSchedule
from prefect.schedules import Cron, Schedule
from pydantic import ValidationError

from pipeline.config import load_config
from pipeline.core.errors import LmforgeError

FLOW_NAME = "lm-pipeline"
ENTRYPOINT = "flows/pipeline_flow.py:lm_pipeline"
PREFECT_FILE = "prefect.yaml"
WORK_POOL = "lmforge-process"
SERVE_NAME = "served"
DEPLOY_TIMEOUT_S = 600.0


class DeploymentError(LmforgeError):
    """A deployment could not be created, served or reached; the message says why and what to do."""


class ScheduleError(DeploymentError):
    """A cron string or timezone is invalid (a usage error: nothing was started)."""


# ----------------------------------------------------------------------------- schedules


def cron_schedule(cron: str, timezone: str | None = None) -> Schedule:
    """A Prefect cron schedule, or a ScheduleError naming the bad cron string or timezone.

    `cron` has five fields, "minute hour day-of-month month day-of-week" (e.g. "0 2 * * *"),
    or is a nickname such as "@daily"; `timezone` is an IANA name such as "Europe/Berlin"
    (default UTC). Checked by Prefect's own CronSchedule model (croniter underneath).
    """
    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as e:
        bad = {str(err["loc"][0]) for err in e.errors() if err.get("loc")}
        raise ScheduleError(_schedule_message(cron, timezone, bad)) from None
    return Cron(cron, timezone=timezone)


def _schedule_message(cron: str, timezone: str | None, bad: set[str]) -> str:
    problems = []
    if "cron" in bad:
        problems.append(
            f"invalid cron schedule {cron!r}: expected 5 fields 'minute hour day-of-month month"
            " day-of-week' with values in range, e.g. '0 2 * * *' (every day at 02:00), or a"
            " nickname such as '@daily'"
        )
    if "timezone" in bad or not problems:
        problems.append(
            f"invalid timezone {timezone!r} for the cron schedule {cron!r}: expected an IANA"
            " name such as 'UTC' or 'Europe/Berlin'"
        )
    return "; ".join(problems)


# ----------------------------------------------------------------------------- the API


def api_url() -> str:
    """The configured PREFECT_API_URL after a health check, or a DeploymentError saying what to do.

    Deployments need a real server: an ephemeral API lives only as long as one process and
    runs no scheduler.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise DeploymentError(
            "PREFECT_API_URL is not set: deployments and schedules need a Prefect server. Start"
            " one with `prefect server start` and run `prefect config set"
            " PREFECT_API_URL=http://127.0.0.1:4200/api`"
        )
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise DeploymentError(
            f"the Prefect server at PREFECT_API_URL={url} is unreachable ({failure}): start it"
            " with `prefect server start`, or point PREFECT_API_URL at a running one"
        )
    return url


def subprocess_env(url: str) -> dict[str, str]:
    """Environment for a `prefect` command: this one, plus the API URL and this venv's bin dir.

    The URL is passed explicitly because it may come from a settings context (a profile, the
    test harness) rather than from the environment.
    """
    env = dict(os.environ)
    env["PREFECT_API_URL"] = url
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


# ----------------------------------------------------------------------------- work pool


def ensure_work_pool(pool: str = WORK_POOL, create: bool = True) -> bool:
    """Check the process work pool `pool`, creating it if missing; return whether it was created.

    Creating it is `prefect work-pool create <pool> --type process`. A missing pool with
    `create=False`, or an existing pool of another type, is an error: the deployments run the
    code in place, in a local process.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
        except ObjectNotFound:
            existing = None
        if existing is None and not create:
            raise DeploymentError(
                f"work pool {pool!r} does not exist: create it with `prefect work-pool create"
                f" {pool} --type process` (or let `lmforge deploy` create it)"
            )
        if existing is not None and existing.type != ProcessWorker.type:
            raise DeploymentError(
                f"work pool {pool!r} has type {existing.type!r}; the lmforge deployments need"
                f" a {ProcessWorker.type!r} pool (pick another name with --pool)"
            )
        if existing is not None:
            return False
        return _create_process_pool(client, pool)


def _create_process_pool(client: Any, pool: str) -> bool:
    """Create `pool` with the process worker's default job template (no network needed)."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    try:
        client.create_work_pool(
            WorkPoolCreate(name=pool, type=ProcessWorker.type, base_job_template=template)
        )
    except ObjectAlreadyExists:  # created meanwhile by someone else: fine
        return False
    return True


# ----------------------------------------------------------------------------- prefect.yaml


def load_prefect_file(root: Path) -> dict[str, Any]:
    """Read `root/prefect.yaml`; check it declares deployments of the lm-pipeline flow."""
    path = Path(root) / PREFECT_FILE
    if not path.is_file():
        raise DeploymentError(f"{path}: not found (the deployments are declared there)")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DeploymentError(f"{path}: not valid YAML ({e})") from None
    deployments = spec.get("deployments") if isinstance(spec, dict) else None
    if not deployments or not all(isinstance(d, dict) and d.get("name") for d in deployments):
        raise DeploymentError(f"{path}: expected a list of named `deployments`")
    for d in deployments:
        if d.get("entrypoint") != ENTRYPOINT:
            raise DeploymentError(
                f"{path}: deployment {d['name']!r} has entrypoint {d.get('entrypoint')!r},"
                f" expected {ENTRYPOINT!r}"
            )
        for s in d.get("schedules") or []:
            if "cron" in s:
                cron_schedule(s["cron"], s.get("timezone"))
    return spec


def deployment_names(spec: dict[str, Any]) -> list[str]:
    """Full names ("lm-pipeline/<name>") of the deployments a prefect.yaml declares."""
    return [f"{FLOW_NAME}/{d['name']}" for d in spec["deployments"]]


@contextmanager
def prefect_file_for_pool(root: Path, spec: dict[str, Any], pool: str) -> Iterator[Path]:
    """prefect.yaml itself, or a temporary copy whose deployments target `pool` instead.

    `prefect deploy --all` ignores `--pool` when it deploys several deployments, so another
    pool is set in a copy (outside the project, so that no stray file lands there).
    """
    original = Path(root) / PREFECT_FILE
    if all((d.get("work_pool") or {}).get("name") == pool for d in spec["deployments"]):
        yield original
        return
    spec = copy.deepcopy(spec)
    for d in spec["deployments"]:
        d["work_pool"] = {**(d.get("work_pool") or {}), "name": pool}
    with tempfile.TemporaryDirectory(prefix="lmforge-deploy-") as tmp:
        path = Path(tmp) / PREFECT_FILE
        path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        yield path


# ----------------------------------------------------------------------------- deploy


def run_prefect_deploy(root: Path, prefect_file: Path, url: str) -> str:
    """`prefect --no-prompt deploy --all --prefect-file <file>` in `root`; return its output.

    Run as `python -m prefect` with this interpreter, so `root` comes first on sys.path when
    `prefect deploy` imports the flow to read its parameter schema.
    """
    cmd = [
        sys.executable,
        "-m",
        "prefect",
        "--no-prompt",
        "deploy",
        "--all",
        "--prefect-file",
        str(prefect_file),
    ]
    try:
        proc = subprocess.run(
            cmd,
            cwd=root,
            env=subprocess_env(url),
            capture_output=True,
            text=True,
            timeout=DEPLOY_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise DeploymentError(
            f"`prefect deploy --all` in {root} took more than {DEPLOY_TIMEOUT_S:.0f} s"
        ) from None
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-30:])
        raise DeploymentError(f"`prefect deploy --all` in {root} failed:\n{tail}")
    return output


def check_deployed(names: list[str], root: Path, output: str) -> list[str]:
    """Read each deployment back from the API; return "<name> (<id>)" for each.

    `prefect deploy` skips an invalid prefect.yaml with a warning and exit code 0, so success
    is what the server holds, not what the command says.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    found = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                tail = "\n".join(output.strip().splitlines()[-30:])
                raise DeploymentError(
                    f"deployment {name!r} is not on the server after `prefect deploy --all`"
                    f" in {root}:\n{tail}"
                ) from None
            found.append(f"{name} ({deployment.id})")
    return found


def deploy_all(root: Path, pool: str = WORK_POOL, create_pool: bool = True) -> list[str]:
    """Create or update every deployment of prefect.yaml on the server at PREFECT_API_URL.

    Same as `prefect work-pool create <pool> --type process` (when `create_pool` and the pool
    is missing) followed by `prefect deploy --all` in `root`; a `pool` other than prefect.yaml's
    is set in a temporary copy of it. Returns "lm-pipeline/<name> (<deployment id>)" for each
    deployment. Raises DeploymentError when the server is unreachable, the pool is missing or
    of another type, or prefect.yaml is invalid.
    """
    root = Path(root).resolve()
    spec = load_prefect_file(root)
    url = api_url()
    ensure_work_pool(pool, create=create_pool)
    names = deployment_names(spec)
    with prefect_file_for_pool(root, spec, pool) as prefect_file:
        output = run_prefect_deploy(root, prefect_file, url)
    return check_deployed(names, root, output)


# ----------------------------------------------------------------------------- serve


def serve_with_schedule(
    cron: str,
    timezone: str | None,
    preset: str | None,
    root: str,
    overrides: list[str] | None = None,
    name: str = SERVE_NAME,
) -> None:
    """Serve `lm-pipeline` on this machine with a cron schedule, until interrupted (Ctrl-C).

        lmforge serve --cron "0 2 * * *" --timezone UTC --preset default

    is `lm_pipeline.serve(name="served", schedules=[Cron("0 2 * * *", timezone="UTC")],
    parameters={"preset": "default", "overrides": [], "root": <root>})`: it creates the deployment
    `lm-pipeline/served` and runs its scheduled (and `prefect deployment run`) flow runs in
    subprocesses; no work pool or worker. The cron string, timezone, preset and overrides are
    checked before anything starts, and a server must be reachable (PREFECT_API_URL).

    Stop it with Ctrl-C, or with `kill <pid>` (SIGTERM) when it runs as a background job
    (`lmforge serve ... &` in a script): the shell starts such a job with SIGINT ignored.
    Either way the schedule is paused on the server before the process exits.
    """
    schedule = cron_schedule(cron, timezone)
    root_path = Path(root).resolve()
    load_config(root_path, preset=preset, overrides=overrides or [])  # ConfigError names a key
    api_url()
    from flows.pipeline_flow import lm_pipeline

    parameters = {"preset": preset, "overrides": overrides or [], "root": str(root_path)}
    lm_pipeline.serve(name=name, schedules=[schedule], parameters=parameters)
