"""End to end: the Prefect flow runs every stage through DVC, and a repeat run skips them all.

Runs in a throwaway copy of the repository (its own git repo, SQLite MLflow, ephemeral
Prefect API through the test harness), on the `ci` preset.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO
from dvc_helpers import dvc

pytestmark = pytest.mark.slow
FIRST_RUN: dict[str, str] = {}  # the first flow run's MLflow parent run, for reproduce

TOP_LEVEL_SKIP = {".venv", ".git", "data", "reports", "mlflow.db", "mlruns", "dvc.lock"}
CACHES = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*_cache", ".hypothesis", "tmp")


def ignore(folder: str, names: list[str]) -> set[str]:
    """Skip outputs and environments at the top level only (pipeline/data is source code)."""
    skip = set(CACHES(folder, names))
    return skip | (TOP_LEVEL_SKIP & set(names) if Path(folder) == REPO else set())


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lmforge") / "repo"
    shutil.copytree(REPO, root, ignore=ignore)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    # The DVC remote of this copy: a temporary folder, not the user's ~/.cache/lmforge.
    remote = tmp_path_factory.mktemp("dvc-remote")
    assert dvc(root, "remote", "modify", "--local", "local", "url", str(remote)).returncode == 0
    return root


def prefect_artifacts(flow_run_id: str) -> dict[str, str]:
    """key -> markdown of the artifacts a flow run created."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    wanted = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(flow_run_id)]))
    with get_client(sync_client=True) as client:
        return {a.key: a.data for a in client.read_artifacts(artifact_filter=wanted)}


def test_flow_runs_every_stage_then_skips_them(repo_copy, prefect_api, monkeypatch):
    import mlflow

    from flows.pipeline_flow import STAGES, lm_pipeline
    from pipeline.config import load_config
    from pipeline.ops.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = lm_pipeline(preset="ci", root=str(repo_copy))
    FIRST_RUN["parent"] = first["mlflow_parent_run_id"]
    assert [r["stage"] for r in first["stages"]] == list(STAGES)
    assert all(r["status"] == "ran" for r in first["stages"])
    report = json.loads((repo_copy / "reports" / "synthesize.json").read_text())
    assert report["source_entropy"]["bits_per_byte"] > 0

    cfg = load_config(repo_copy)
    client = mlflow.MlflowClient(tracking_uri(cfg))
    parent = client.get_run(first["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    assert all(r.data.tags["lmforge.dvc_stage"] in STAGES for r in children)
    (train_run,) = [r for r in children if r.info.run_name == "pretrain"]
    steps = cfg.pretrain.max_steps
    history = client.get_metric_history(train_run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(steps))
    for name in ("lr", "grad_norm", "tokens_per_s", "val_bpb"):
        assert name in train_run.data.metrics
    assert "plots/pretrain_loss.png" in [
        f.path for f in client.list_artifacts(train_run.info.run_id, "plots")
    ]

    registered = json.loads((repo_copy / "reports" / "register.json").read_text())
    assert registered["registered"] and registered["gate"]["passed"]
    champion = client.get_model_version_by_alias(cfg.register.model_name, "champion")
    assert str(champion.version) == "1" and champion.tags["prefect_flow_run_id"]
    assert champion.tags["git_commit"] == git(repo_copy, "rev-parse", "HEAD").strip()
    (reg_run,) = [r for r in children if r.info.run_name == "register"]
    assert champion.tags["mlflow_run_id.pretrain"] == train_run.info.run_id
    assert champion.run_id == reg_run.info.run_id

    # The run is a named DVC experiment, recorded on the parent run, and its outputs are pushed.
    assert first["dvc_experiment"] and first["dvc_pushed"]
    assert parent.data.tags["lmforge.dvc_experiment"] == first["dvc_experiment"]
    assert first["dvc_experiment"] in dvc(repo_copy, "exp", "list", "--name-only").stdout
    assert "in sync" in dvc(repo_copy, "status", "--cloud").stdout

    # The flow run's Prefect artifacts: summary, GX result, evaluation, registered model.
    artifacts = prefect_artifacts(parent.data.tags["lmforge.prefect_flow_run_id"])
    assert {"lm-pipeline-summary", "gx-validation", "evaluation", "registered-model"} <= set(
        artifacts
    )
    assert "| pretrain | ran |" in artifacts["lm-pipeline-summary"]
    assert first["dvc_experiment"] in artifacts["lm-pipeline-summary"]
    assert "Great Expectations: passed" in artifacts["gx-validation"]
    assert "version 1 as `champion`" in artifacts["registered-model"]

    t0 = time.perf_counter()
    second = lm_pipeline(root=str(repo_copy))
    print(f"second run, nothing changed: {time.perf_counter() - t0:.1f} s")  # figure, not a test
    assert all(r["status"].startswith("skipped") for r in second["stages"])
    status = dvc(repo_copy, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout


def test_reproduce_from_the_mlflow_run_gives_identical_hashes_and_metrics(
    repo_copy, monkeypatch, tmp_path
):
    """`lmforge reproduce <run>`: worktree at the experiment, dvc pull, dvc repro --force."""
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(repo_copy)
    lock = (repo_copy / "dvc.lock").read_text()
    result = CliRunner().invoke(app, ["reproduce", FIRST_RUN["parent"], "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Reproduction: IDENTICAL" in result.output
    assert "evaluate.test.bits_per_byte" in result.output  # the side-by-side table
    work = tmp_path / "repo"
    assert (work / "dvc.lock").read_text() == lock  # same hashes for every output
    assert (repo_copy / "dvc.lock").read_text() == lock  # the work tree was not touched
    git(repo_copy, "worktree", "remove", "--force", str(work))


def test_one_param_reruns_only_its_dependents(repo_copy, prefect_api, monkeypatch):
    from flows.pipeline_flow import lm_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lock = (repo_copy / "dvc.lock").read_text()
    result = lm_pipeline(root=str(repo_copy), overrides=["register.card_samples=1"], push=False)
    ran = [r["stage"] for r in result["stages"] if r["status"] == "ran"]
    assert ran == ["register"]
    lm_pipeline(root=str(repo_copy), overrides=["register.card_samples=3"], push=False)
    assert (repo_copy / "dvc.lock").read_text() == lock


def test_second_run_on_the_same_workspace_fails_clearly(repo_copy, prefect_api):
    from flows.pipeline_flow import lm_pipeline
    from pipeline.ops.workspace_lock import WorkspaceBusy, workspace_lock

    busy = pytest.raises(WorkspaceBusy, match=r"in use by another pipeline run.*first-run")
    with workspace_lock(repo_copy, owner="first-run"), busy:
        lm_pipeline(root=str(repo_copy))


def test_failed_quality_gate_fails_the_run_and_registers_nothing(repo_copy, prefect_api):
    from flows.pipeline_flow import QualityGateFailed, lm_pipeline

    with pytest.raises(QualityGateFailed, match="ece"):
        lm_pipeline(root=str(repo_copy), overrides=["register.gate.max_ece=0.0001"], push=False)
    report = json.loads((repo_copy / "reports" / "register.json").read_text())
    assert report["registered"] is False and report["gate"]["failed"] == ["ece"]
    assert not (repo_copy / "reports" / "register_version.json").exists()
