"""Fault rows 4 and 5: the MLflow tracking server dies before a stage starts.

The server is a real `mlflow server` process (SQLite store in a temporary folder, a free
loopback port). The flow runs as its own process (`python -m flows.pipeline_flow`) against
the session's Prefect server, with `MLFLOW_TRACKING_URI` pointing at the tracking server.
Once the flow has opened its MLflow parent run, the server's whole process group gets
SIGKILL, so the next stage finds it gone:

- row 4: the stage exits 75, Prefect schedules a retry (AwaitingRetry); the test starts a
  new server on the same port and store during the backoff; the run completes, and MLflow
  holds the parent run and a child run for every stage;
- row 5: the server stays down; the run fails after its retries with a message naming the
  tracking URI and the variable to set; the last good run's outputs are byte-identical.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from fault_helpers import (
    BIN,
    Procs,
    flow_env,
    free_port,
    http_ok,
    kill_group,
    leftover_temporaries,
    md5_files,
    orchestrated_project,
    start_mlflow_server,
    wait_for,
)

from pipeline.stages import validate

pytestmark = pytest.mark.slow

GOOD_OUTPUTS = ("data/validated", "reports/data_docs", "reports/validate.json")


class TrackingServer:
    """One real MLflow server for the module: the same store and port across restarts."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.procs = Procs()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ensure_up(self) -> None:
        if self.proc is None or self.proc.poll() is not None or not http_ok(f"{self.uri}/health"):
            self.proc = start_mlflow_server(self.procs, self.folder, self.port)

    def kill(self) -> None:
        assert self.proc is not None
        kill_group(self.proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = TrackingServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield srv
    finally:
        srv.procs.stop_all()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The last good run: validated data in place (recorded by DVC)."""
    return orchestrated_project(tmp_path_factory.mktemp("tracking-fault"), [], [validate])


def start_flow(procs, root: Path, api: str, uri: str, marker: str, delays: str):
    """The flow as its own process, up to synthesize; `marker` (a param) finds its run."""
    argv = [str(BIN / "python"), "-m", "flows.pipeline_flow", "--no-push", "--until"]
    argv += ["synthesize", "--retry-delays", delays, "--set", "tracking.enabled=true"]
    argv += ["--set", marker]  # a validate param: validate and synthesize are stale
    return procs.start(
        argv,
        cwd=root,
        env=flow_env(api, MLFLOW_TRACKING_URI=uri),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def the_flow_run(marker: str):
    """The flow run whose overrides include `marker` (once the flow process created it)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = client.read_flow_runs(limit=200)
    mine = [r for r in found if marker in (r.parameters.get("overrides") or [])]
    return mine[0] if mine else None


def task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=runs)


def task_in_state(flow_run_id, name_prefix: str, state: str):
    """The task run named `name_prefix*` of the flow run, if it is in `state` now."""
    for t in task_runs(flow_run_id):
        if t.name.startswith(name_prefix) and t.state and t.state.name == state:
            return t
    return None


def kill_after_parent_run_opened(server: TrackingServer, proc, marker: str):
    """SIGKILL the server once the parent run is open, before the first stage reaches it."""

    def opened():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        run = the_flow_run(marker)
        return run and task_in_state(run.id, "open-mlflow-parent-run", "Completed") and run

    run = wait_for(opened, 300, "the flow to open its MLflow parent run")
    server.kill()
    return run


def test_server_restarted_during_the_backoff_completes_the_run(server, project, procs, prefect_api):
    import mlflow

    server.ensure_up()
    marker = "validate.min_chars=21"
    proc = start_flow(procs, project, prefect_api, server.uri, marker, "20,60")
    run = kill_after_parent_run_opened(server, proc, marker)

    # validate found the server gone: exit 75, a retry is scheduled. Restart it meanwhile.
    wait_for(lambda: task_in_state(run.id, "validate", "AwaitingRetry"), 300, "validate's retry")
    server.ensure_up()
    output = proc.communicate(timeout=600)[0]

    assert proc.returncode == 0, output[-4000:]
    assert f"cannot reach the MLflow tracking server at {server.uri}" in output
    assert "exit 75" in output or "exited with 75" in output
    (validate_run,) = [t for t in task_runs(run.id) if t.name == "validate"]
    assert validate_run.state.name == "Completed" and validate_run.run_count >= 2

    client = mlflow.MlflowClient(server.uri)
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("lmforge").experiment_id],
        f"tags.`lmforge.prefect_flow_run_id` = '{run.id}' and attributes.run_name = 'lm-pipeline'",
    )
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(c.info.run_name for c in children) == ["synthesize", "validate"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert leftover_temporaries(project) == []


def test_server_that_stays_down_fails_the_run_naming_the_uri(server, project, procs, prefect_api):
    server.ensure_up()
    before = md5_files(project, *GOOD_OUTPUTS)
    marker = "validate.min_chars=22"
    proc = start_flow(procs, project, prefect_api, server.uri, marker, "1,1")
    run = kill_after_parent_run_opened(server, proc, marker)
    output = proc.communicate(timeout=600)[0]

    assert proc.returncode != 0
    assert f"cannot reach the MLflow tracking server at {server.uri}" in output, output[-4000:]
    assert "from MLFLOW_TRACKING_URI" in output and "set MLFLOW_TRACKING_URI" in output
    (validate_run,) = [t for t in task_runs(run.id) if t.name == "validate"]
    assert validate_run.state.name == "Failed" and validate_run.run_count == 3  # 2 retries
    from fault_helpers import flow_run_state

    state = flow_run_state(str(run.id))
    assert state.is_failed() and "cannot reach the MLflow tracking server" in str(state.message)
    assert not (project / "mlflow.db").exists()  # never a silent local store instead
    assert md5_files(project, *GOOD_OUTPUTS) == before
    assert leftover_temporaries(project) == []
