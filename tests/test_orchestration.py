"""Flow building blocks without a Prefect server: retries, the workspace lock, artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from flows import artifacts
from flows.pipeline_flow import StageFailed, _retry_transient
from pipeline.errors import EXIT_TRANSIENT, GateFailed, LmforgeError, is_transient
from pipeline.stage_runner import stage_main
from pipeline.workspace_lock import WorkspaceBusy, workspace_lock


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
