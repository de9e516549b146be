"""A registry that fails is never read as "no champion" (pipeline/serve/registry.py).

Against a real `mlflow server` (SQLite in tmp, a free loopback port) and its SQLite store:
"does not exist" is None for a missing model and for a missing alias. Once the server is
killed by its pid, the lookup raises a transient RegistryError naming the registry, the
register stage exits 75, and the server's store holds no new version.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import mlflow
import pytest
from conftest import REPO, make_project
from serving_helpers import start_tracking_server, stop

from pipeline.core.errors import EXIT_TRANSIENT, LmforgeError
from pipeline.serve import registry

NAME = "lmforge-registry-test"
# A killed server must fail fast: no retries with back-off (the default is 7, over minutes).
FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@pytest.fixture
def fast_fail(monkeypatch) -> None:
    for key, value in FAST_FAIL.items():
        monkeypatch.setenv(key, value)


def first_version(client) -> str:
    """Register version 1 of NAME (from a run) and make it champion; its version."""
    experiment_id = client.create_experiment("registry-errors")
    run = client.create_run(experiment_id)
    registry.ensure_registered_model(client, NAME, "test model")
    mv = client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run.info.run_id)
    return str(mv.version)


def test_killed_server_is_a_transient_error_not_no_champion(tmp_path, fast_fail, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the SQLite client's default artifact root lands here
    db, artifacts = tmp_path / "mlflow.db", tmp_path / "artifacts"
    log_path = tmp_path / "server.log"
    server, uri = start_tracking_server(db, artifacts, log_path)
    try:
        client = mlflow.MlflowClient(uri)
        # "Does not exist" over REST: a missing model, then a missing alias, is None.
        assert registry.version_by_alias(client, NAME, registry.CHAMPION) is None
        version = first_version(client)
        assert registry.version_by_alias(client, NAME, registry.CHAMPION) is None
        client.set_registered_model_alias(NAME, registry.CHAMPION, version)
        assert str(registry.version_by_alias(client, NAME, registry.CHAMPION).version) == "1"
        port = uri.rsplit(":", 1)[1]

        stop(server, signal.SIGKILL)  # a real crash: no graceful shutdown
        with pytest.raises(LmforgeError) as failed:  # not None: that would read "no champion"
            registry.version_by_alias(client, NAME, registry.CHAMPION)
        assert isinstance(failed.value, registry.RegistryError) and failed.value.transient
        assert failed.value.exit_code == EXIT_TRANSIENT
        assert uri in str(failed.value) and "alias 'champion'" in str(failed.value)
        with pytest.raises(registry.RegistryError) as failed:  # not "absent, create it"
            registry.ensure_registered_model(client, NAME, "test model")
        assert failed.value.transient and uri in str(failed.value)

        # The register stage against the dead server: exit 75 (the flow retries it).
        root = make_project(tmp_path / "proj", overrides=["tracking.enabled=true"])
        (root / "reports").mkdir()
        passing = {"test": {"bits_per_byte": 1.0, "calibration": {"ece": 0.0}}}
        (root / "reports" / "evaluate.json").write_text(
            json.dumps({**passing, "task_accuracy": 1.0})
        )
        env = {**os.environ, **FAST_FAIL, "MLFLOW_TRACKING_URI": uri}
        env["PYTHONPATH"] = f"{REPO}:{env.get('PYTHONPATH', '')}"
        gate = ["register.gate.max_test_bits_per_byte=100", f"register.model_name={NAME}"]
        cmd = [sys.executable, "-m", "pipeline.stages.register"]
        for override in gate:
            cmd += ["--set", override]
        stage = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert stage.returncode == EXIT_TRANSIENT, stage.stderr[-3000:]
        assert "transient" in stage.stderr and f"127.0.0.1:{port}" in stage.stderr

        # The server's own store, read directly (a restart would cost ~20 s on 2 cores and
        # show the same rows): still one version, and it is the champion.
        store = mlflow.MlflowClient(f"sqlite:///{db}")
        versions = store.search_model_versions(f"name='{NAME}'")
        assert [str(v.version) for v in versions] == ["1"]
        assert {k: str(v) for k, v in store.get_registered_model(NAME).aliases.items()} == {
            "champion": "1"
        }
        # "Does not exist" in the SQLite store too: a missing model, a missing alias.
        assert registry.version_by_alias(store, "no-such-model", registry.CHAMPION) is None
        assert registry.version_by_alias(store, NAME, registry.CHALLENGER) is None
    finally:
        stop(server)
