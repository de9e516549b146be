"""The team stack end to end, against one real `lmforge stack up` (tests/stack/conftest.py).

1. Security first: MLflow and Prefect want credentials, MLflow users see only what they were
   granted, S3 refuses anonymous and wrongly signed requests, and a client with a wrong
   password gets an error that names the server and the variable to set.
2. The pipeline: `lmforge deploy` + `prefect deployment run` on the stack's worker; MLflow
   (PostgreSQL) holds the runs and the champion, S3 the model; DVC pushed to the `dvc`
   bucket and a fresh clone reproduces the run IDENTICAL from it.
3. `lmforge stack down` leaves no process of the stack (checked again at teardown).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import requests
import yaml
from botocore.exceptions import ClientError
from stack_helpers import BIN, Stack, alive, clean_env, git, lmforge, stack_processes

from pipeline.config import load_config
from pipeline.core.names import STAGES
from pipeline.ops.stack.layout import DVC_REMOTE, Layout, read_env_file
from pipeline.ops.stack.processes import log_tail
from pipeline.ops.stack.services import pg_bin, s3_client

pytestmark = [pytest.mark.stack, pytest.mark.slow]
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=5"


def mlflow_url(stack: Stack, path: str) -> str:
    return stack.env["MLFLOW_TRACKING_URI"] + path


def admin(stack: Stack) -> tuple[str, str]:
    return (stack.env["MLFLOW_TRACKING_USERNAME"], stack.env["MLFLOW_TRACKING_PASSWORD"])


def test_status_names_every_service_healthy(stack: Stack) -> None:
    done = lmforge(stack.root, "stack", "status")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for name in ("postgres", "seaweedfs", "mlflow", "prefect", "worker"):
        (line,) = [x for x in lines if x.startswith(name)]
        assert "healthy" in line and "UNHEALTHY" not in line, done.stdout
    assert f"http://127.0.0.1:{stack.ports.mlflow}" in done.stdout
    assert f"http://127.0.0.1:{stack.ports.prefect}/api" in done.stdout


def test_stack_env_is_private_and_complete(stack: Stack) -> None:
    path = stack.root / ".lmforge" / "stack.env"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (stack.root / ".lmforge" / "stack" / "server.env").stat().st_mode & 0o777 == 0o600
    expected = {
        "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
        "PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    }  # fmt: skip
    assert set(read_env_file(path)) == expected
    # `source .lmforge/stack.env` exports the same values to a child process
    shell = ["bash", "-c", 'source .lmforge/stack.env && printf %s "$MLFLOW_TRACKING_PASSWORD"']
    out = subprocess.run(shell, cwd=stack.root, capture_output=True, text=True, check=True).stdout
    assert out == stack.env["MLFLOW_TRACKING_PASSWORD"]
    # `lmforge stack up` made the S3 remote this checkout's DVC default, in config.local only
    assert f"remote = {DVC_REMOTE}" in (stack.root / ".dvc" / "config.local").read_text()


def test_mlflow_refuses_missing_and_wrong_credentials(stack: Stack) -> None:
    url = mlflow_url(stack, SEARCH)
    assert requests.get(mlflow_url(stack, "/health"), timeout=10).status_code == 200
    assert requests.get(url, timeout=10).status_code == 401
    wrong = (stack.env["MLFLOW_TRACKING_USERNAME"], "not-the-password")
    assert requests.get(url, auth=wrong, timeout=10).status_code == 401
    assert requests.get(url, auth=("nobody", "x"), timeout=10).status_code == 401
    assert requests.get(url, auth=admin(stack), timeout=10).status_code == 200


def test_prefect_api_refuses_missing_and_wrong_auth_string(stack: Stack) -> None:
    api = stack.env["PREFECT_API_URL"]
    user, password = stack.env["PREFECT_API_AUTH_STRING"].split(":", 1)
    filter_flows = f"{api}/flows/filter"
    assert requests.get(f"{api}/health", timeout=10).status_code == 200
    assert requests.post(filter_flows, json={}, timeout=10).status_code == 401
    wrong = requests.post(filter_flows, json={}, auth=(user, "wrong"), timeout=10)
    assert wrong.status_code == 401
    right = requests.post(filter_flows, json={}, auth=(user, password), timeout=10)
    assert right.status_code == 200


def _create_run_with_artifact(stack: Stack) -> tuple[str, str]:
    """(experiment id, run id) of a new admin experiment whose run has artifact hello.txt."""
    auth = admin(stack)
    exp = requests.post(
        mlflow_url(stack, "/api/2.0/mlflow/experiments/create"),
        json={"name": f"private-{uuid.uuid4().hex[:8]}"},
        auth=auth,
        timeout=30,
    )
    assert exp.status_code == 200, exp.text
    exp_id = exp.json()["experiment_id"]
    run = requests.post(
        mlflow_url(stack, "/api/2.0/mlflow/runs/create"),
        json={"experiment_id": exp_id},
        auth=auth,
        timeout=30,
    )
    assert run.status_code == 200, run.text
    run_id = run.json()["run"]["info"]["run_id"]
    put = requests.put(
        mlflow_url(
            stack, f"/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{run_id}/artifacts/hello.txt"
        ),
        data=b"hello, team",
        auth=auth,
        timeout=30,
    )
    assert put.status_code == 200, put.text
    return exp_id, run_id


def test_second_user_needs_a_grant_and_read_is_not_write(stack: Stack) -> None:
    exp_id, run_id = _create_run_with_artifact(stack)
    # The artifact went through the server to the `mlflow` bucket; clients hold no S3 keys.
    keys = [o["Key"] for o in _objects(stack, "mlflow", f"artifacts/{exp_id}/{run_id}/")]
    assert keys == [f"artifacts/{exp_id}/{run_id}/artifacts/hello.txt"]

    bob = ("bob", uuid.uuid4().hex)
    made = requests.post(
        mlflow_url(stack, "/api/2.0/mlflow/users/create"),
        json={"username": bob[0], "password": bob[1]},
        auth=admin(stack),
        timeout=30,
    )
    assert made.status_code == 200, made.text
    get_exp = mlflow_url(stack, f"/api/2.0/mlflow/experiments/get?experiment_id={exp_id}")
    get_run = mlflow_url(stack, f"/api/2.0/mlflow/runs/get?run_id={run_id}")
    artifact = mlflow_url(
        stack, f"/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{run_id}/artifacts/hello.txt"
    )
    log = mlflow_url(stack, "/api/2.0/mlflow/runs/log-metric")
    metric = {"run_id": run_id, "key": "loss", "value": 1.0, "timestamp": 0, "step": 0}
    assert requests.get(get_exp, auth=bob, timeout=30).status_code == 403
    assert requests.get(get_run, auth=bob, timeout=30).status_code == 403
    assert requests.get(artifact, auth=bob, timeout=30).status_code == 403
    assert requests.post(log, json=metric, auth=bob, timeout=30).status_code == 403
    found = requests.get(mlflow_url(stack, SEARCH), auth=bob, timeout=30).json()
    assert exp_id not in [e["experiment_id"] for e in found.get("experiments", [])]

    grant = requests.post(
        mlflow_url(stack, "/api/3.0/mlflow/users/permissions/grant"),
        json={"username": bob[0], "resource_type": "experiment", "resource_id": exp_id,
              "permission": "READ"},
        auth=admin(stack),
        timeout=30,
    )  # fmt: skip
    assert grant.status_code == 200, grant.text
    assert requests.get(get_exp, auth=bob, timeout=30).status_code == 200
    assert requests.get(get_run, auth=bob, timeout=30).status_code == 200
    read = requests.get(artifact, auth=bob, timeout=30)
    assert read.status_code == 200 and read.content == b"hello, team"
    assert requests.post(log, json=metric, auth=bob, timeout=30).status_code == 403
    overwrite = requests.put(artifact, data=b"defaced", auth=bob, timeout=30)
    assert overwrite.status_code == 403
    assert requests.get(artifact, auth=admin(stack), timeout=30).content == b"hello, team"


def _objects(stack: Stack, bucket: str, prefix: str = "") -> list[dict]:
    secret = {"S3_ACCESS_KEY": stack.env["AWS_ACCESS_KEY_ID"],
              "S3_SECRET_KEY": stack.env["AWS_SECRET_ACCESS_KEY"]}  # fmt: skip
    client = s3_client(stack.ports, secret)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o for page in pages for o in page.get("Contents", [])]


def test_s3_refuses_anonymous_and_wrong_keys(stack: Stack) -> None:
    anonymous = s3_client(stack.ports, None)
    for bucket in ("mlflow", "dvc"):
        with pytest.raises(ClientError) as refused:
            anonymous.list_objects_v2(Bucket=bucket)
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        with pytest.raises(ClientError):
            anonymous.put_object(Bucket=bucket, Key="intruder.txt", Body=b"x")
    wrong = s3_client(
        stack.ports, {"S3_ACCESS_KEY": stack.env["AWS_ACCESS_KEY_ID"], "S3_SECRET_KEY": "bad"}
    )
    with pytest.raises(ClientError) as bad_signature:
        wrong.list_objects_v2(Bucket="dvc")
    assert bad_signature.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert not _objects(stack, "dvc", "intruder")  # nothing was written anonymously


def test_wrong_password_names_the_server_and_the_variable(stack: Stack, tmp_path: Path) -> None:
    """A stage against the real auth server with a bad password: a clear error, no sqlite.

    In a clone, so that the stage's outputs never touch the workspace the deployment uses.
    """
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(stack.root), str(clone))
    env = stack.client_env(MLFLOW_TRACKING_PASSWORD="not-the-password")
    done = lmforge(clone, "stage", "validate", "--preset", "ci", env=env, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert stack.env["MLFLOW_TRACKING_URI"] in output, output[-3000:]
    assert "MLFLOW_TRACKING_PASSWORD" in output, output[-3000:]
    assert not (clone / "mlflow.db").exists()  # never a silent local fallback


# ----------------------------------------------------------------------------- the pipeline

FLOW_RUN: dict[str, str] = {}  # the deployment's flow run and its MLflow parent run
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def test_deployment_runs_to_completed_on_the_stacks_worker(stack: Stack) -> None:
    deploy = lmforge(stack.root, "--stack", "deploy", timeout=300)  # --stack loads stack.env
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert "deployed lm-pipeline/on-demand" in deploy.stdout
    run = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "lm-pipeline/on-demand", "--param",
         "preset=ci", "--watch", "--watch-timeout", "540"],
        cwd=stack.root, env=stack.client_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = run.stdout + run.stderr
    flow_run_id = UUID.search(output)
    assert flow_run_id, output
    state = requests.get(
        f"{stack.env['PREFECT_API_URL']}/flow_runs/{flow_run_id.group(0)}",
        auth=tuple(stack.env["PREFECT_API_AUTH_STRING"].split(":", 1)),
        timeout=30,
    ).json()["state"]
    worker_log = log_tail(Layout(stack.root), "worker", 80)
    assert state["type"] == "COMPLETED", output[-3000:] + "\nworker log:\n" + worker_log
    FLOW_RUN["id"] = flow_run_id.group(0)


def _mlflow_client(stack: Stack, monkeypatch: pytest.MonkeyPatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", stack.env["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.env["MLFLOW_TRACKING_PASSWORD"])
    return mlflow.MlflowClient(stack.env["MLFLOW_TRACKING_URI"])


def test_mlflow_on_postgresql_holds_the_runs_and_s3_the_model(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "id" not in FLOW_RUN:
        pytest.skip("needs the deployment's flow run (the test above)")
    cfg = load_config(stack.root)
    client = _mlflow_client(stack, monkeypatch)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.lmforge.prefect_flow_run_id = '{FLOW_RUN['id']}'",
    )
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    FLOW_RUN["parent"] = parent.info.run_id
    champion = client.get_model_version_by_alias(cfg.register.model_name, "champion")
    (register,) = [r for r in children if r.info.run_name == "register"]
    assert champion.run_id == register.info.run_id
    # The runs are rows of the server's PostgreSQL database, not of a local file.
    rows = psql(stack, "mlflow", "SELECT run_uuid FROM runs")
    assert {parent.info.run_id, *(r.info.run_id for r in children)} <= set(rows)
    assert not (stack.root / "mlflow.db").exists()
    # The registered model's files are objects in the `mlflow` bucket.
    # (a logged model's files: artifacts/<experiment>/models/<model id>/artifacts/...)
    assert champion.source.startswith("models:/m-"), champion.source
    model_id = champion.source.removeprefix("models:/")
    keys = [o["Key"] for o in _objects(stack, "mlflow", "artifacts/")]
    model_keys = [k for k in keys if f"/models/{model_id}/" in k]
    assert any(k.endswith("/MLmodel") for k in model_keys), [k for k in keys if "MLmodel" in k]


def test_generate_serves_the_champion_from_the_stack(stack: Stack) -> None:
    """`lmforge generate` with stack.env's MLflow variables loads the champion.

    Through the authenticated server only: the client gets the MLflow variables of
    stack.env and no S3 keys, so the model's files (objects in the `mlflow` bucket) must
    come through the server's artifact proxy; the registered decoding defaults apply.
    """
    if "parent" not in FLOW_RUN:
        pytest.skip("needs the registered champion (the tests above)")
    mlflow_only = {k: v for k, v in stack.env.items() if k.startswith("MLFLOW_")}
    env = clean_env() | mlflow_only
    done = lmforge(stack.root, "generate", "once upon a time", env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.strip()]
    assert line.startswith("once upon a time") and len(line) > len("once upon a time"), line


def psql(stack: Stack, database: str, query: str) -> list[str]:
    """One column of `query`'s rows, as the superuser over the stack's socket."""
    done = subprocess.run(
        [str(pg_bin() / "psql"), "-X", "-At", "-h", str(Layout(stack.root).pg_socket_dir),
         "-p", str(stack.ports.postgres), "-U", "postgres", "-d", database, "-c", query],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return done.stdout.split()


def test_dvc_pushed_to_s3_and_a_fresh_clone_reproduces(stack: Stack, tmp_path: Path) -> None:
    if "parent" not in FLOW_RUN:
        pytest.skip("needs the deployment's MLflow parent run (the tests above)")
    # Every cached output of the run is in the bucket: DVC's own comparison with the remote,
    # plus a direct look for each directory output's manifest (always cached).
    status = subprocess.run(
        [str(BIN / "dvc"), "status", "--cloud", "-r", DVC_REMOTE],
        cwd=stack.root, env=stack.client_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert status.returncode == 0 and "in sync" in status.stdout, status.stdout + status.stderr
    lock = yaml.safe_load((stack.root / "dvc.lock").read_text())
    outs = [out for stage in lock["stages"].values() for out in stage.get("outs", [])]
    dirs = {out["md5"] for out in outs if out["md5"].endswith(".dir")}
    keys = {o["Key"] for o in _objects(stack, "dvc", "lmforge/")}
    missing = [h for h in dirs if f"lmforge/files/md5/{h[:2]}/{h[2:]}" not in keys]
    assert dirs and not missing, f"not in s3://dvc/lmforge: {missing}"

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(stack.root), str(clone))
    git(clone, "fetch", "-q", "origin", "refs/exps/*:refs/exps/*")  # = dvc exp pull origin
    (clone / ".lmforge").mkdir()
    shutil.copy2(stack.root / ".lmforge" / "stack.env", clone / ".lmforge" / "stack.env")
    assert not (clone / ".dvc" / "cache").exists()  # everything must come from S3
    done = lmforge(clone, "--stack", "reproduce", FLOW_RUN["parent"], "--workdir",
                   str(tmp_path / "work"), timeout=600)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "Reproduction: IDENTICAL" in output, output[-4000:]


def test_reproduce_with_refused_credentials_says_so(stack: Stack, tmp_path: Path) -> None:
    """A 401 is a credentials error naming the variables, not "run not found"."""
    if "parent" not in FLOW_RUN:
        pytest.skip("needs the deployment's MLflow parent run (the tests above)")
    env = {**stack.client_env(), "MLFLOW_TRACKING_PASSWORD": "wrong"}
    done = lmforge(stack.root, "reproduce", FLOW_RUN["parent"], "--workdir",
                   str(tmp_path / "work"), env=env, timeout=300)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-2000:]
    assert "refused the credentials (HTTP 401)" in output, output[-2000:]
    assert "MLFLOW_TRACKING_PASSWORD" in output and "not found" not in output


def test_stack_down_leaves_no_process_running(stack: Stack) -> None:
    started = stack_processes(stack.root)
    assert {p.name() for p in started}  # the stack runs before
    done = lmforge(stack.root, "stack", "down", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not alive(started), alive(started)
    assert not list(Layout(stack.root).pids.glob("*.pid"))
    assert (Layout(stack.root).data("postgres") / "PG_VERSION").is_file()  # the data stays
    status = lmforge(stack.root, "stack", "status")
    assert status.returncode == 1 and status.stdout.count("not running") == 5, status.stdout
