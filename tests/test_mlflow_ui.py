"""What a user sees in `mlflow ui`, read back through a real `mlflow server`'s REST API.

One small project runs every stage in this process (as `dvc repro` would run them, one
after the other) under a parent run, logging to an `mlflow server` on a SQLite store in a
temporary folder. The tests then ask the server over HTTP, as the UI does: the
experiment's kind, MLflow's standard tags on every run, and the datasets of each stage.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import cfg_for, prepared_project
from fault_helpers import Procs, free_port, start_mlflow_server
from test_evaluate import SMALL

from pipeline.core.io import file_md5
from pipeline.core.names import STAGES
from pipeline.ops import tracking
from pipeline.serve.publish import link_version
from pipeline.stages import evaluate, finetune, pretrain, register, synthesize, tokenizer, validate

pytest.importorskip("mlflow")

EXPERIMENT = "ui-test"
GATE_OPEN = [  # the tiny model must pass the gate, so register logs and registers it
    "register.gate.max_test_bits_per_byte=100.0",
    "register.gate.max_ece=1.0",
    "register.gate.min_task_accuracy=0.0",
    "register.compare_docs=20",
    "register.decoding.max_new_tokens=12",
    "register.model_name=lmforge-ui-test",
]
OVERRIDES = [
    "tracking.enabled=true",
    f"tracking.experiment={EXPERIMENT}",
    "synthesize.finetune_docs=40",
    *SMALL,
    # smaller still: this module checks what is logged, not what it measures
    "finetune.compare=false",
    "evaluate.source_docs=20",
    "evaluate.prompts=4",
    *GATE_OPEN,
]


def rest(url: str, endpoint: str, **query: str) -> dict[str, Any]:
    """GET `<url>/api/2.0/mlflow/<endpoint>?<query>`: the JSON the UI reads."""
    qs = urllib.parse.urlencode(query)
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}?{qs}", timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Every stage run under one parent, against a real server: (url, root, parent, sha)."""
    base = tmp_path_factory.mktemp("ui")
    procs = Procs()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        try:
            start_mlflow_server(procs, base / "server", port)
            mp.setenv("MLFLOW_TRACKING_URI", url)
            mp.delenv(tracking.FLOW_RUN_ENV, raising=False)
            mp.chdir(base)
            root = prepared_project(base, OVERRIDES, [])
            git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
            for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "c"]):
                subprocess.run([*git, *args], cwd=root, check=True, capture_output=True)
            cfg = cfg_for(root)
            parent = tracking.open_parent_run(cfg, "lm-pipeline", {}, source="flows.pipeline_flow")
            mp.setenv(tracking.PARENT_RUN_ENV, parent)
            for stage in (validate, synthesize, tokenizer, pretrain, finetune, evaluate, register):
                stage.run(cfg)
            tracking.close_run(cfg, parent, True, {"pretrain_seconds": 1.5})
            sha = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
            ).stdout.strip()
            yield {"url": url, "root": root, "parent": parent, "sha": sha}
        finally:
            procs.stop_all()


def stage_runs(url: str, parent: str) -> dict[str, dict[str, Any]]:
    """run name -> the run's JSON, for the parent's children."""
    exp = rest(url, "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    with urllib.request.urlopen(
        urllib.request.Request(
            f"{url}/api/2.0/mlflow/runs/search",
            data=json.dumps(
                {
                    "experiment_ids": [exp["experiment_id"]],
                    "filter": f"tags.mlflow.parentRunId = '{parent}'",
                    "max_results": 100,
                }
            ).encode(),
            headers={"Content-Type": "application/json"},
        ),
        timeout=30,
    ) as r:
        runs = json.loads(r.read())["runs"]
    return {r["info"]["run_name"]: r for r in runs}


def tags_of(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_experiment_opens_on_training_runs(pipeline_run):
    exp = rest(pipeline_run["url"], "experiments/get-by-name", experiment_name=EXPERIMENT)
    tags = {t["key"]: t["value"] for t in exp["experiment"]["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_every_run_has_the_standard_tags(pipeline_run):
    url, parent, sha = pipeline_run["url"], pipeline_run["parent"], pipeline_run["sha"]
    ptags = tags_of(rest(url, "runs/get", run_id=parent)["run"])
    assert ptags["mlflow.source.name"] == "flows.pipeline_flow"
    assert (ptags["mlflow.source.type"], ptags["mlflow.runName"]) == ("JOB", "lm-pipeline")
    assert ptags["mlflow.source.git.commit"] == sha
    assert ptags["mlflow.note.content"].startswith("**lmforge `lm-pipeline`**")
    assert "| outcome | succeeded |" in ptags["mlflow.note.content"]
    assert "| pretrain_seconds | 1.5 |" in ptags["mlflow.note.content"]
    runs = stage_runs(url, parent)
    assert sorted(runs) == sorted(STAGES)
    for stage, run in runs.items():
        tags = tags_of(run)
        assert tags["mlflow.source.name"] == f"pipeline.stages.{stage}", stage
        assert (tags["mlflow.source.type"], tags["mlflow.runName"]) == ("LOCAL", stage)
        assert tags["mlflow.source.git.commit"] == sha, stage
        # the description: the stage's summary as a markdown table, under its name
        assert tags["mlflow.note.content"].startswith(f"**lmforge `{stage}`**"), stage
        assert "|---|---|" in tags["mlflow.note.content"], stage
    summary = json.loads((pipeline_run["root"] / "reports" / "pretrain.json").read_text())
    assert (
        f"| val_bpb | {summary['val_bpb']:.4g} |"
        in tags_of(runs["pretrain"])["mlflow.note.content"]
    )


def test_every_stage_run_lists_its_datasets(pipeline_run):
    root = pipeline_run["root"]
    runs = stage_runs(pipeline_run["url"], pipeline_run["parent"])
    seen: dict[str, dict[str, tuple[str, str, str]]] = {}
    for stage, run in runs.items():
        inputs = run.get("inputs", {}).get("dataset_inputs", [])
        assert inputs, f"stage {stage} lists no dataset"
        seen[stage] = {}
        for i in inputs:
            tags = {t["key"]: t["value"] for t in i.get("tags", [])}
            assert tags["mlflow.data.context"] in ("training", "validation", "test"), (stage, tags)
            d = i["dataset"]
            seen[stage][d["name"]] = (
                d["digest"],
                tags["mlflow.data.context"],
                tags["lmforge.role"],
            )
    cfg = cfg_for(root)
    tok, syn = cfg.path("tokenizer"), cfg.path("synthetic")
    expected = {  # the digest is the file's md5, as in DVC's cache (dvc.lock for a file)
        "pretrain": {
            "tokens-train": (tok / "train.bin", "training", "input"),
            "tokens-val": (tok / "val.bin", "validation", "input"),
        },
        "finetune": {"finetune-train": (syn / "finetune_train.jsonl", "training", "input")},
        "evaluate": {"tokens-test": (tok / "test.bin", "test", "input")},
        "tokenizer": {"tokens-test": (tok / "test.bin", "test", "output")},
    }
    for stage, datasets in expected.items():
        for name, (path, context, role) in datasets.items():
            assert path.is_file(), path
            assert seen[stage][name] == (file_md5(path)[:36], context, role), (stage, name)


def test_registered_version_links_to_the_logged_model_with_its_metrics(pipeline_run):
    url, root = pipeline_run["url"], pipeline_run["root"]
    mv = rest(url, "model-versions/get", name="lmforge-ui-test", version="1")["model_version"]
    runs = stage_runs(url, pipeline_run["parent"])
    assert mv["run_id"] == runs["register"]["info"]["run_id"]
    model_id = mv["source"].removeprefix("models:/")  # the version's source is the LoggedModel
    assert model_id.startswith("m-")
    model = rest(url, f"logged-models/{model_id}")["model"]
    assert model["info"]["source_run_id"] == mv["run_id"]
    tags = {t["key"]: t["value"] for t in model["info"]["tags"]}
    # listed once: the server wrote it, and lmforge did not add it a second time
    assert json.loads(tags["mlflow.modelVersions"]) == [{"name": "lmforge-ui-test", "version": 1}]
    metrics = {m["key"]: m for m in model["data"]["metrics"]}
    evaluation = json.loads((root / "reports" / "evaluate.json").read_text())
    bpb = metrics["test.bits_per_byte"]
    assert bpb["value"] == pytest.approx(evaluation["test"]["bits_per_byte"], rel=1e-12)
    test_shard = cfg_for(root).path("tokenizer") / "test.bin"
    assert (bpb["dataset_name"], bpb["dataset_digest"]) == (
        "tokens-test",
        file_md5(test_shard)[:36],
    )
    assert metrics["test.calibration.ece"]["value"] == pytest.approx(
        evaluation["test"]["calibration"]["ece"], rel=1e-12
    )


def test_local_store_lists_the_version_on_its_logged_model(tmp_path, monkeypatch):
    """A SQLite store does not tag the LoggedModel with its versions (a server does): we do."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    client = mlflow.MlflowClient(uri)
    model = client.create_logged_model(client.create_experiment("e"), name="model")
    for version in ("1", "2", "2"):  # twice the same version: listed once
        link_version(client, "lm", version, f"models:/{model.model_id}")
    tags = client.get_logged_model(model.model_id).tags
    assert json.loads(tags["mlflow.modelVersions"]) == [
        {"name": "lm", "version": 1},  # an int, as a tracking server writes it
        {"name": "lm", "version": 2},
    ]
