"""Tracking: child runs, batched metrics, datasets with DVC md5 digests, the off switch."""

from __future__ import annotations

import subprocess

import pytest
from conftest import cfg_for

from pipeline.core.io import file_md5
from pipeline.ops import tracking

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def tracked(project):
    return cfg_for(project, "tracking.enabled=true", "tracking.experiment=test-exp")


def test_stage_run_is_a_child_of_the_parent(tracked, monkeypatch, tmp_path):
    parent = tracking.open_parent_run(tracked, "lm-pipeline", {"preset": "ci"})
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent)
    monkeypatch.setenv("DVC_STAGE", "validate")
    data = tmp_path / "d.txt"
    data.write_text("some data")
    with tracking.start_run(tracked, "validate") as t:
        t.log_params({"validate": {"min_chars": 3, "sources": [{"kind": "txt"}]}})
        for step in range(250):
            t.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
        t.log_dataset(data, "d", "train")
        child = t.run_id
    tracking.close_run(tracked, parent, True, {"total_seconds": 1.0})

    client = mlflow.MlflowClient(tracking.tracking_uri(tracked))
    run = client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["lmforge.dvc_stage"] == "validate"
    assert "lmforge.git_commit" in run.data.tags
    assert run.data.params["validate.min_chars"] == "3"
    assert run.data.params["validate.sources.0.kind"] == "txt"
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(child, "loss")
    assert len(history) == 250 and history[-1].value == pytest.approx(1 / 250)
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.digest == file_md5(data)[:36] and ds.dataset.name == "d"
    assert {t.key: t.value for t in ds.tags} == {
        "mlflow.data.context": "train",
        "lmforge.role": "input",
    }
    assert client.get_run(parent).info.status == "FINISHED"


def test_runs_carry_the_tags_the_mlflow_ui_shows(tracked, monkeypatch):
    """Experiment kind (training view, not GenAI traces), Source, commit, name, description."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=tracked.root, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "c"], cwd=tracked.root, check=True)
    client = mlflow.MlflowClient(tracking.tracking_uri(tracked))
    # an experiment made without the kind (by an older lmforge, or by hand) gets it on use
    old = client.create_experiment(tracked.tracking.experiment)
    parent = tracking.open_parent_run(tracked, "lm-pipeline", {}, source="flows.pipeline_flow")
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent)
    monkeypatch.delenv(tracking.FLOW_RUN_ENV, raising=False)
    with tracking.start_run(tracked, "pretrain") as t:
        t.describe("pretrain", {"val_bpb": 1.23456, "steps": 20, "method": "a|b"})
        child = t.run_id
    sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tracked.root, capture_output=True, text=True, check=True
    ).stdout.strip()
    ptags, ctags = client.get_run(parent).data.tags, client.get_run(child).data.tags
    assert ptags["mlflow.source.name"] == "flows.pipeline_flow"
    assert (ptags["mlflow.source.type"], ptags["mlflow.runName"]) == ("JOB", "lm-pipeline")
    assert ctags["mlflow.source.name"] == "pipeline.stages.pretrain"
    assert (ctags["mlflow.source.type"], ctags["mlflow.runName"]) == ("LOCAL", "pretrain")
    assert ptags["mlflow.source.git.commit"] == ctags["mlflow.source.git.commit"] == sha
    note = ctags["mlflow.note.content"]
    assert "| val_bpb | 1.235 |" in note and "| steps | 20 |" in note
    assert "| method | a\\|b |" in note  # a summary value cannot break the table


def test_artifact_on_parent_goes_to_the_parent_only_when_there_is_one(
    tracked, monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)  # the sqlite store puts artifacts under ./mlruns
    chart = tmp_path / "compare.png"
    chart.write_bytes(b"\x89PNG\r\n\x1a\n")
    parent = tracking.open_parent_run(tracked, "lm-pipeline", {})
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent)
    with tracking.start_run(tracked, "finetune") as t:
        assert t.parent_id == parent
        t.log_artifact_on_parent(chart, "plots")
        child = t.run_id
    monkeypatch.delenv(tracking.PARENT_RUN_ENV)
    with tracking.start_run(tracked, "finetune") as t:  # by hand: no parent, nothing logged
        t.log_artifact_on_parent(chart, "plots")
        orphan = t.run_id
    tracking.Tracker().log_artifact_on_parent(chart, "plots")  # tracking off: a no-op

    client = mlflow.MlflowClient(tracking.tracking_uri(tracked))
    assert [a.path for a in client.list_artifacts(parent, "plots")] == ["plots/compare.png"]
    assert client.list_artifacts(child) == [] and client.list_artifacts(orphan) == []


def test_new_experiment_is_created_of_the_training_kind(tracked):
    tracking.open_parent_run(tracked, "lm-pipeline", {})
    client = mlflow.MlflowClient(tracking.tracking_uri(tracked))
    exp = client.get_experiment_by_name(tracked.tracking.experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_metrics_are_sent_in_batches(tracked, monkeypatch):
    calls = []
    with tracking.start_run(tracked, "synthesize") as t:
        real = t.client.log_batch
        monkeypatch.setattr(t.client, "log_batch", lambda *a, **k: (calls.append(k), real(*a, **k)))
        for step in range(1500):
            t.log_metrics({"loss": float(step)}, step=step)
    metric_calls = [c for c in calls if c.get("metrics")]
    assert len(metric_calls) == 2  # 1000 + 500, never one call per step


def test_failed_stage_marks_the_run_failed(tracked):
    with pytest.raises(RuntimeError), tracking.start_run(tracked, "validate") as t:
        run_id = t.run_id
        raise RuntimeError("boom")
    client = mlflow.MlflowClient(tracking.tracking_uri(tracked))
    assert client.get_run(run_id).info.status == "FAILED"


def test_disabled_tracking_is_a_noop(project):
    cfg = cfg_for(project, "tracking.enabled=false")
    with tracking.start_run(cfg, "validate") as t:
        t.log_metrics({"x": 1.0})
        t.log_params({"a": 1})
        assert not t.active
    assert not (project / "mlflow.db").exists()


def test_relative_sqlite_uri_is_anchored_at_the_root(project, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = cfg_for(project)
    assert tracking.tracking_uri(cfg) == f"sqlite:///{project.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.tracking_uri(cfg) == "http://mlflow:5000"


def test_metric_names_are_made_valid_for_mlflow(tracked):
    with tracking.start_run(tracked, "finetune") as t:
        t.log_metrics({"sam+swa": {"task_accuracy": 0.5}})
        run_id = t.run_id
    client = mlflow.MlflowClient(tracking.tracking_uri(tracked))
    assert client.get_run(run_id).data.metrics == {"sam_swa.task_accuracy": 0.5}


# --- An unreachable or refusing server: a clear error, never a silent local store ----------


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): connections are refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def refusing_server():
    """A real HTTP server on loopback answering every request with `status` (set by the test)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        status = 401

        def _answer(self) -> None:
            body = b"You are not authenticated. Please see the documentation."
            self.send_response(self.status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, Handler
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_server_names_the_uri_and_the_variable(project, monkeypatch):
    from pipeline.ops.stage_runner import stage_main

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = cfg_for(project, "tracking.enabled=true")
    with pytest.raises(tracking.TrackingUnavailable) as down, tracking.start_run(cfg, "validate"):
        pass
    message = str(down.value)
    assert uri in message and "from MLFLOW_TRACKING_URI" in message
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()

    with pytest.raises(tracking.TrackingUnavailable, match=r"tracking\.uri in params\.yaml"):
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        tracking.open_parent_run(
            cfg_for(project, "tracking.enabled=true", f"tracking.uri={uri}"), "lm-pipeline", {}
        )
    assert not (project / "mlflow.db").exists()

    def run(cfg):  # a stage whose tracking is down exits 75: the flow retries it
        with tracking.start_run(
            cfg_for(project, "tracking.enabled=true", f"tracking.uri={uri}"), "validate"
        ):
            return {}

    monkeypatch.chdir(project)
    assert stage_main("validate", run, []) == 75


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_name_the_variables_to_set(
    project, monkeypatch, refusing_server, status
):
    server, handler = refusing_server
    handler.status = status
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = cfg_for(project, "tracking.enabled=true")
    with pytest.raises(tracking.TrackingAuthError) as refused, tracking.start_run(cfg, "validate"):
        pass
    message = str(refused.value)
    assert uri in message and f"HTTP {status}" in message
    assert "MLFLOW_TRACKING_USERNAME" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert not (project / "mlflow.db").exists()
