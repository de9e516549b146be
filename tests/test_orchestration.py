"""Flow building blocks without a Prefect server: retries, the workspace lock, artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from flows import artifacts
from flows.pipeline_flow import StageFailed, _retry_transient
from pipeline.config import load_config
from pipeline.core.errors import EXIT_TRANSIENT, GateFailed, LmforgeError, is_transient
from pipeline.ops.stage_runner import stage_main
from pipeline.ops.workspace_lock import WorkspaceBusy, workspace_lock


def test_transient_errors_are_told_apart_from_bad_input():
    down = MlflowException(
        "API request to http://mlflow:5000/api/2.0/mlflow/runs/create failed with exception "
        "HTTPConnectionPool(host='mlflow', port=5000): Max retries exceeded"
    )
    assert is_transient(down)
    assert is_transient(ConnectionRefusedError("[Errno 111] Connection refused"))
    try:
        try:
            raise ConnectionResetError("peer went away")
        except ConnectionResetError as inner:
            raise RuntimeError("upload failed") from inner
    except RuntimeError as wrapped:
        assert is_transient(wrapped)  # found through the cause
    assert not is_transient(GateFailed("validate: 3 expectations failed"))
    assert not is_transient(LmforgeError("data/x.parquet: column 'text' missing (timed out)"))
    assert not is_transient(ValueError("bad shape"))


def _stage_raising(exc: Exception):
    def run(cfg):
        raise exc

    return run


def test_stage_exit_codes(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    down = MlflowException("failed with exception: Max retries exceeded with url")
    assert stage_main("validate", _stage_raising(down), []) == EXIT_TRANSIENT
    assert "transient" in capsys.readouterr().err
    assert stage_main("validate", _stage_raising(GateFailed("gate")), []) == 1
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        stage_main("validate", _stage_raising(ZeroDivisionError()), [])


class _State:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def result(self):
        raise self.exc


def test_only_transient_stage_failures_are_retried():
    assert _retry_transient(None, None, _State(StageFailed("pretrain", EXIT_TRANSIENT, "...")))
    assert not _retry_transient(None, None, _State(StageFailed("validate", 1, "gate failed")))
    assert not _retry_transient(None, None, _State(StageFailed("validate", None, "?")))


def test_workspace_lock_refuses_a_second_holder(tmp_path):
    with workspace_lock(tmp_path, owner="run-A"):
        with pytest.raises(WorkspaceBusy) as busy, workspace_lock(tmp_path, owner="run-B"):
            pass
        message = str(busy.value)
        assert str(tmp_path.resolve()) in message and "run-A" in message and "pid" in message
    with workspace_lock(tmp_path, owner="run-C"):  # released: the next run gets it
        pass


def test_a_holder_that_has_not_written_its_record_yet_is_still_named(tmp_path):
    """The loser of a simultaneous start may look between the winner's flock and its write."""
    import fcntl
    import os
    import threading

    from pipeline.ops.workspace_lock import LOCK_FILE

    path = tmp_path / LOCK_FILE
    path.parent.mkdir(parents=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held, record still empty
        record = b'{"pid": 4242, "host": "h", "owner": "run-A", "started": 0}'
        threading.Timer(0.3, os.pwrite, (fd, record, 0)).start()
        busy = pytest.raises(WorkspaceBusy, match=r"pid 4242 on h \(flow run run-A")
        with busy, workspace_lock(tmp_path, owner="run-B"):
            pass
    finally:
        os.close(fd)


def _expectation(name: str, success: bool, pct: float) -> dict:
    return {
        "suite": "rows",
        "expectation": name,
        "column": "text",
        "kwargs": {"regex": "a|b"},
        "success": success,
        "unexpected_percent": pct,
    }


def test_gx_artifact_shows_each_expectation(tmp_path):
    report = {
        "gate": {
            "success": False,
            "expectations": [
                _expectation("expect_column_values_to_not_be_null", True, 0.0),
                _expectation("expect_column_values_to_not_match_regex", False, 3.5),
            ],
        }
    }
    (tmp_path / "validate.failed.json").write_text(json.dumps(report))
    md = artifacts.gx_markdown(tmp_path)
    assert md.startswith("# Great Expectations: **FAILED**")
    rows = [line for line in md.splitlines() if line.startswith("| rows")]
    assert len(rows) == 2 and "**no**" in rows[1] and "3.5" in rows[1]
    assert all(line.count(" | ") == 5 for line in rows)  # the escaped "|" keeps six cells


def test_registry_artifact(tmp_path: Path):
    (tmp_path / "register.json").write_text(
        json.dumps({"model_name": "m", "registered": False, "reason": "quality gate failed: ece"})
    )
    assert "Not registered: m" in artifacts.registry_markdown(tmp_path)
    (tmp_path / "register.json").write_text(json.dumps({"model_name": "m", "registered": True}))
    version = {
        "version": "2",
        "alias": "challenger",
        "model_uri": "models:/m@challenger",
        "comparison": {
            "champion_version": "1",
            "documents": 20,
            "challenger_bits_per_byte": 1.2,
            "champion_bits_per_byte": 1.1,
            "margin": 0.0,
            "promoted": False,
        },
    }
    (tmp_path / "register_version.json").write_text(json.dumps(version))
    md = artifacts.registry_markdown(tmp_path)
    assert "version 2 as `challenger`" in md and "not promoted" in md


def test_failure_artifact_carries_the_failed_report(tmp_path):
    (tmp_path / "synthesize.failed.json").write_text(json.dumps({"checks": {"drift": "high"}}))
    md = artifacts.failure_markdown("synthesize", tmp_path, "ERROR: failed to reproduce")
    assert "reports/synthesize.failed.json" in md and '"drift": "high"' in md
    assert "ERROR: failed to reproduce" in md


# --- A failed `dvc exp save` or `dvc push` fails the run (after recording everything) -------

# Stand-in stages under the flow's stage names: what is tested is what the flow does after
# the stages, against a real DVC repo and remote, real git and a real MLflow store.
_STUB = """\
import json, pathlib, sys
stage = sys.argv[1]
pathlib.Path("data").mkdir(exist_ok=True)
pathlib.Path("data", stage + ".txt").write_text(stage)
report = {"gate": {"passed": True}, "registered": False} if stage == "register" else {}
pathlib.Path("reports").mkdir(exist_ok=True)
pathlib.Path("reports", stage + ".json").write_text(json.dumps(report))
"""


def _flow_project(base: Path, *, commit: bool, remote_ok: bool) -> Path:
    import subprocess
    import sys

    from conftest import make_project

    from pipeline.core.names import STAGES

    root = make_project(base / "proj", overrides=["tracking.enabled=true"])
    (root / "stub.py").write_text(_STUB)
    (root / "dvc.yaml").write_text(
        "stages:\n"
        + "".join(
            f"  {s}:\n    cmd: python stub.py {s}\n    outs:\n      - data/{s}.txt\n"
            f"    metrics:\n      - reports/{s}.json:\n          cache: false\n"
            for s in STAGES
        )
    )
    dvc = str(Path(sys.executable).parent / "dvc")

    def run(*argv: str) -> None:
        subprocess.run(argv, cwd=root, check=True, capture_output=True)

    run("git", "init", "-q")
    run(dvc, "init", "-q")
    # A remote under a regular file: creating anything there fails (for root too).
    (base / "a-file").write_text("a regular file")
    remote = base / "remote" if remote_ok else base / "a-file" / "sub"
    run(dvc, "remote", "add", "-d", "r", str(remote))
    (root / ".gitignore").write_text("mlflow.db\n/.lmforge/\n/data/\n")
    if commit:  # without a commit `dvc exp save` fails ("Empty git repo")
        run("git", "add", "-A")
        run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return root


def _parent_run_status(root: Path) -> str:
    import mlflow

    from pipeline.ops.tracking import tracking_uri

    cfg = load_config(root)
    client = mlflow.MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'lm-pipeline'")
    return run.info.status


def _run_flow(root: Path, push: bool = True):
    from flows.pipeline_flow import lm_pipeline

    return lm_pipeline(root=str(root), push=push, return_state=True)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize(
    ("commit", "remote_ok", "step", "error"),
    [
        (True, False, "dvc push failed", "Not a directory"),
        (False, True, "dvc exp save -n", "Empty git repo"),
    ],
)
def test_failed_save_or_push_fails_the_run_after_recording_it(
    tmp_path, monkeypatch, commit, remote_ok, step, error
):
    from test_pipeline_e2e import prefect_artifacts

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = _flow_project(tmp_path, commit=commit, remote_ok=remote_ok)
    state = _run_flow(root)
    assert state.is_failed(), state
    message = str(state.message) + str(state.result(raise_on_failure=False))
    assert step in message and error in message
    assert _parent_run_status(root) == "FAILED"
    summary = prefect_artifacts(str(state.state_details.flow_run_id))["lm-pipeline-summary"]
    assert "| register | ran |" in summary and step in summary and error in summary


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_no_push_keeps_the_opt_out(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = _flow_project(tmp_path, commit=True, remote_ok=False)
    state = _run_flow(root, push=False)
    assert state.is_completed(), state
    assert state.result()["dvc_experiment"] and not state.result()["dvc_pushed"]
    assert _parent_run_status(root) == "FINISHED"


def test_until_runs_a_prefix_of_the_chain():
    from flows.pipeline_flow import stages_until
    from pipeline.core.names import STAGES

    assert stages_until(None) == list(STAGES)
    assert stages_until("tokenizer") == ["validate", "synthesize", "tokenizer"]
    with pytest.raises(ValueError, match="until='nope': expected one of validate, synthesize"):
        stages_until("nope")


# A child that, like pretrain, turns SIGTERM into "save and exit 143", in its own group.
_TRAPS_SIGTERM = """
import pathlib, signal, sys, time
def stop(*_):
    time.sleep(0.5)  # "saving a checkpoint": the parent must wait for this
    pathlib.Path(sys.argv[1]).write_text("saved")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(120)
"""


def test_a_stopped_flow_process_passes_sigterm_to_the_stage_group(tmp_path):
    """A real SIGTERM to this process while it waits: the child's group gets it too, and
    `run_group` returns control (re-raising) only after the child has saved and exited."""
    import os
    import signal
    import sys
    import threading

    from pipeline.ops.launch import run_group

    class Stopped(BaseException):
        pass

    def stopped(*_):  # as Prefect's bridge raises TerminationSignal for a cancelled run
        raise Stopped

    saved = tmp_path / "saved"
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        if line == "ready":  # the child's handler is installed: stop this process now
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        with pytest.raises(Stopped):
            run_group(
                [sys.executable, "-c", _TRAPS_SIGTERM, str(saved)],
                tmp_path,
                dict(os.environ),
                on_line,
            )
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert saved.read_text() == "saved"  # the child got SIGTERM and finished before we did
    assert lines == ["ready"]
