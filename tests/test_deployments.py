"""Prefect deployments of `lm-pipeline`: prefect.yaml, `deploy_all`, a process worker, `serve`.

The fast tests read prefect.yaml and check the schedule validation. The slow ones run against
a real temporary Prefect server (`prefect_test_harness`, one per test session, in
conftest.py): they register the deployments from a throwaway copy of the repository,
trigger `lm-pipeline/on-demand` and let `prefect worker start --run-once` execute the whole
pipeline there on a tiny config, and serve the flow with a cron schedule.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from flows.deployments import (
    ENTRYPOINT,
    FLOW_NAME,
    WORK_POOL,
    DeploymentError,
    ScheduleError,
    cron_schedule,
    deploy_all,
    load_prefect_file,
    serve_with_schedule,
)

BIN = Path(sys.executable).parent

# `ci` made smaller still: every stage runs, in about a minute on 2 cores. MLflow is off (the
# end-to-end test covers it); the worker's MLFLOW_TRACKING_URI points into tmp regardless.
TINY = [
    "validate.sources=[{kind: storyworld, name: storyworld, num_docs: 300}]",
    "synthesize.entropy_docs=200",
    "synthesize.finetune_docs=40",
    "synthesize.max_synthetic_docs=200",
    "tokenizer.vocab_size=300",
    "pretrain.max_steps=4",
    "pretrain.eval_interval=4",
    "pretrain.checkpoint_interval=4",
    "pretrain.warmup_steps=1",
    "pretrain.eval_batches=1",
    "finetune.compare=false",
    "finetune.method=adamw",
    "finetune.max_steps=2",
    "finetune.warmup_steps=1",
    "finetune.eval_examples=8",
    "finetune.sharpness_steps=1",
    "finetune.hessian_iters=1",
    "evaluate.prompts=8",  # generation metrics need a few samples on each side
    "evaluate.source_docs=20",
    "evaluate.test_windows=8",
    "evaluate.max_new_tokens=8",
    "evaluate.num_beams=1",
    "evaluate.sharpness_batches=1",
    "register.gate.max_test_bits_per_byte=100.0",
    "register.gate.max_ece=1.0",
    "register.compare_docs=20",
    "register.decoding.max_new_tokens=8",
    "tracking.enabled=false",
]


# ----------------------------------------------------------------------------- fast


def test_prefect_yaml_declares_nightly_and_on_demand() -> None:
    spec = load_prefect_file(REPO)
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert sorted(by_name) == ["nightly", "on-demand"]
    for d in by_name.values():
        assert d["entrypoint"] == ENTRYPOINT
        assert d["work_pool"]["name"] == WORK_POOL
    (nightly,) = by_name["nightly"]["schedules"]
    schedule = cron_schedule(nightly["cron"], nightly["timezone"])
    assert (schedule.cron, schedule.timezone) == ("0 2 * * *", "UTC")
    assert nightly.get("active", True)
    assert by_name["nightly"]["parameters"] == {"preset": "default"}
    assert not by_name["on-demand"].get("schedules")
    # Local code: the pull step runs the flow where `prefect deploy` ran; nothing is pushed.
    (pull,) = spec["pull"]
    assert list(pull) == ["prefect.deployments.steps.set_working_directory"]
    assert not spec.get("push")
    assert not any("docker" in str(step) or "git_clone" in str(step) for step in spec["build"])


def test_prefect_yaml_passes_prefects_own_schema() -> None:
    """`prefect deploy` skips (with a warning, exit code 0) a file its model rejects."""
    from prefect.cli.deploy._models import PrefectYamlModel  # 3.8's model of prefect.yaml

    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(raw)
    assert [d.name for d in model.deployments] == ["nightly", "on-demand"]


@pytest.mark.parametrize(
    ("cron", "timezone", "message"),
    [
        ("0 25 * * *", None, "invalid cron schedule '0 25 * * *'"),
        ("every night", "UTC", "invalid cron schedule 'every night'"),
        ("0 2 * *", None, "expected 5 fields"),
        ("0 2 * * *", "Mars/Olympus", "invalid timezone 'Mars/Olympus'"),
    ],
)
def test_serve_rejects_bad_schedule_before_starting(
    cron: str, timezone: str | None, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.pipeline_flow import lm_pipeline

    def must_not_serve(*args: object, **kwargs: object) -> None:
        raise AssertionError("serve started despite a bad schedule")

    monkeypatch.setattr(lm_pipeline, "serve", must_not_serve)
    with pytest.raises(ScheduleError, match=re.escape(message)):
        serve_with_schedule(cron, timezone, "ci", str(REPO))


def test_deploy_names_an_unreachable_server() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}),
        pytest.raises(DeploymentError, match=r"127\.0\.0\.1:9/api is unreachable"),
    ):
        deploy_all(REPO)


def test_serve_needs_a_server() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(restore_defaults={PREFECT_API_URL}),
        pytest.raises(DeploymentError, match="PREFECT_API_URL is not set"),
    ):
        serve_with_schedule("0 2 * * *", "UTC", "ci", str(REPO))


# ----------------------------------------------------------------------------- slow

TOP_LEVEL_SKIP = {
    ".venv",
    ".git",
    "data",
    "models",
    "reports",
    "mlflow.db",
    "mlruns",
    "mlartifacts",
    "dvc.lock",
    ".lmforge",
}
CACHES = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*_cache", ".hypothesis", "tmp")


def _ignore(folder: str, names: list[str]) -> set[str]:
    """Skip outputs and environments at the top level only (pipeline/data is source code)."""
    skip = set(CACHES(folder, names))
    return skip | (TOP_LEVEL_SKIP & set(names) if Path(folder) == REPO else set())


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway copy of the repository with its own git repo (DVC needs one)."""
    root = tmp_path_factory.mktemp("deploy") / "repo"
    shutil.copytree(REPO, root, ignore=_ignore)
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return root


@pytest.fixture(scope="module")
def deployed(project: Path, prefect_api: str) -> list[str]:
    return deploy_all(project)


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _worker_env(project: Path, api: str) -> dict[str, str]:
    """What a worker on this machine has: the API URL, the venv on PATH, a private home.

    One torch thread: the model is tiny, and on a shared 2-core machine two threads per
    process contend with everything else (evaluate took 35 s instead of 9 s under load).
    """
    home = project.parent / "prefect-home"
    return dict(
        os.environ,
        PREFECT_API_URL=api,
        PREFECT_HOME=str(home),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{project.parent / 'mlflow.db'}",
        OMP_NUM_THREADS="1",
    )


@pytest.mark.slow
def test_deploy_all_registers_schedule_and_parameters(deployed: list[str], project: Path) -> None:
    assert [d.split(" ")[0] for d in deployed] == [f"{FLOW_NAME}/nightly", f"{FLOW_NAME}/on-demand"]
    with _client() as client:
        pool = client.read_work_pool(WORK_POOL)
        nightly = client.read_deployment_by_name(f"{FLOW_NAME}/nightly")
        on_demand = client.read_deployment_by_name(f"{FLOW_NAME}/on-demand")
    assert pool.type == "process"
    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == "0 2 * * *"
    assert schedule.schedule.timezone == "UTC"
    assert schedule.active
    assert nightly.parameters == {"preset": "default"}
    assert on_demand.schedules == [] and on_demand.parameters == {}
    for d in (nightly, on_demand):
        assert d.work_pool_name == WORK_POOL
        assert d.entrypoint == ENTRYPOINT
        assert d.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(project)}}
        ]
    again = deploy_all(project)  # an update, not a second set of deployments
    assert again == deployed


@pytest.mark.slow
def test_on_demand_run_completes_on_a_process_worker(
    deployed: list[str], project: Path, prefect_api: str
) -> None:
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment

    params = {"preset": "ci", "overrides": TINY}
    flow_run = run_deployment(f"{FLOW_NAME}/on-demand", parameters=params, timeout=0)
    assert flow_run.state is not None and flow_run.state.type == StateType.SCHEDULED

    worker = subprocess.run(
        [str(BIN / "prefect"), "worker", "start", "--pool", WORK_POOL, "--run-once"],
        cwd=project.parent,
        env=_worker_env(project, prefect_api),
        capture_output=True,
        text=True,
        timeout=420,
    )
    log = (worker.stdout + worker.stderr)[-6000:]
    assert worker.returncode == 0, log
    with _client() as client:
        final = client.read_flow_run(flow_run.id)
    assert final.state is not None and final.state.type == StateType.COMPLETED, log
    # The run happened in the project the deployment came from, with the run's parameters.
    params_file = yaml.safe_load((project / "params.yaml").read_text())
    assert params_file["pretrain"]["max_steps"] == 4
    assert (project / "reports" / "register.json").is_file()
    assert (project / "dvc.lock").is_file()


@pytest.mark.slow
def test_deploy_all_to_another_pool(deployed: list[str], project: Path) -> None:
    with pytest.raises(DeploymentError, match="work pool 'nowhere' does not exist"):
        deploy_all(project, pool="nowhere", create_pool=False)
    moved = deploy_all(project, pool="lmforge-other")
    assert moved == deployed  # the same deployments, now on the other pool
    with _client() as client:
        assert client.read_work_pool("lmforge-other").type == "process"
        for name in moved:
            deployment = client.read_deployment_by_name(name.split(" ")[0])
            assert deployment.work_pool_name == "lmforge-other"
    assert sorted(p.name for p in project.glob("prefect*")) == ["prefect.yaml"]


@pytest.mark.slow
def test_serve_creates_a_cron_deployment(project: Path, prefect_api: str) -> None:
    """`serve_with_schedule` in its own process: the served deployment carries the schedule."""
    # A background job of a non-interactive shell (`make test &`, `nohup ... &`) inherits
    # SIGINT as ignored, and so would this child: Ctrl-C would then never reach serve. Give it
    # the handler a terminal's foreground process has, so the test means the same everywhere.
    code = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler);"
        "from flows.deployments import serve_with_schedule;"
        " serve_with_schedule('0 2 1 1 *', 'Europe/Berlin', 'ci', '.')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=project,
        env=_worker_env(project, prefect_api),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deployment = _wait_for_deployment(f"{FLOW_NAME}/served", proc, timeout=120)
    finally:
        proc.send_signal(signal.SIGINT)
        # communicate, not wait: it drains the pipe, so a chatty shutdown never blocks on a
        # full stdout buffer (which would read as "Ctrl-C does not stop serve").
        try:
            output, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 1 1 *", "Europe/Berlin")
    assert deployment.parameters == {"preset": "ci", "overrides": [], "root": str(project)}
    assert proc.returncode == 0, f"serve exited {proc.returncode} after Ctrl-C:\n{output[-3000:]}"
    with _client() as client:  # Ctrl-C pauses the schedule; serving again resumes it
        assert client.read_deployment_by_name(f"{FLOW_NAME}/served").paused


def _wait_for_deployment(name: str, proc: subprocess.Popen, timeout: float):
    """The deployment `name` once its runner polls for work (status READY), so that it is up."""
    from prefect.client.schemas.objects import DeploymentStatus
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with _client() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"serve exited ({proc.returncode}):\n{proc.stdout.read()}")
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                deployment = None
            if deployment is not None and deployment.status == DeploymentStatus.READY:
                return deployment
            time.sleep(1)
    pytest.fail(f"no ready deployment {name!r} after {timeout} s")
