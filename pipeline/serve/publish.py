"""Publish a gated model: log it as an MLflow pyfunc, register a version, place the aliases.

    python -m pipeline.stages.register     # the stage (pipeline/stages/register.py)

`register` packages the model (`pipeline/serve/package.py`), logs it as a pyfunc from code
(nothing pickled) into the stage's MLflow run and registers it as a new version of
`register.model_name`, tagged with its lineage: git commit, DVC experiment and output
digests, the Prefect flow run, and the MLflow run of every stage. The version gets the
alias `challenger`; it becomes `champion` when there is none yet, or when it beats the
champion's bits per byte on the same test documents by more than `register.promote_margin`
(both models score those documents here, each with its own tokenizer: bits per byte do not
depend on it). A registry that cannot answer the champion lookup raises RegistryError
(`pipeline/serve/registry.py`); only "does not exist" means there is no champion.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from pipeline.config import Config
from pipeline.core.io import atomic_write_text, file_md5, tree_md5
from pipeline.core.names import MODEL_CARD, STAGES, report_json, split_parquet
from pipeline.ops.tracking import (
    DVC_EXP_ENV,
    FLOW_RUN_ENV,
    PARENT_RUN_ENV,
    git_commit,
    tracking_uri,
)
from pipeline.serve import registry
from pipeline.serve.gate import read_json
from pipeline.serve.package import (
    PYFUNC_FILE,
    build_package,
    model_card,
    pip_requirements,
    serving_code,
)
from pipeline.serve.textgen import DEFAULTS_FILE, GenerationParams, TextGenerator
from pipeline.text.shards import read_meta

log = logging.getLogger(__name__)
STAGE = "register"  # the stage's name: its own run id tag is `mlflow_run_id.register`
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # a LoggedModel's registered versions (JSON)


def dvc_lock_digest(cfg: Config, path_key: str) -> str:
    """DVC's md5 of output `paths.<path_key>` from dvc.lock, else our own tree digest."""
    rel = getattr(cfg.paths, path_key)
    lock = cfg.root / "dvc.lock"
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in stages.values():
            for out in stage.get("outs", []):
                if out.get("path") == rel and out.get("md5"):
                    return out["md5"]
    return "tree:" + tree_md5(cfg.path(path_key))


def lineage_tags(
    cfg: Config, client: Any, experiment_id: str, run_id: str, tok_meta: dict[str, Any]
) -> dict[str, str]:
    """Version tags: git commit, DVC experiment, data digests, Prefect and MLflow run ids."""
    sha, dirty = git_commit(cfg.root)
    tags = {
        "git_commit": sha,
        "git_dirty": str(dirty),
        "dvc_experiment": os.environ.get(DVC_EXP_ENV, ""),
        "prefect_flow_run_id": os.environ.get(FLOW_RUN_ENV, ""),
        "data_digest": dvc_lock_digest(cfg, "validated"),
        "synthetic_digest": dvc_lock_digest(cfg, "synthetic"),
        "tokenizer_digest": dvc_lock_digest(cfg, "tokenizer"),
        "tokenizer_corpus_digest": str(tok_meta.get("train_corpus_digest", "")),
        "mlflow_parent_run_id": os.environ.get(PARENT_RUN_ENV, ""),
    }
    stages = tuple(s for s in STAGES if s != STAGE)
    for stage, rid in registry.stage_run_ids(
        client, experiment_id, os.environ.get(PARENT_RUN_ENV), stages
    ).items():
        tags[f"mlflow_run_id.{stage}"] = rid
    tags[f"mlflow_run_id.{STAGE}"] = run_id
    return tags


def pretrain_timing(client: Any, lineage: dict[str, str]) -> dict[str, float]:
    """Wall time and tokens/s of the pretrain run, kept in MLflow (not in DVC metrics)."""
    run_id = lineage.get("mlflow_run_id.pretrain")
    if not run_id:
        return {}
    metrics = client.get_run(run_id).data.metrics
    names = {"wall_seconds": "wall_seconds", "mean_tokens_per_s": "tokens_per_s"}
    return {card_key: metrics[k] for k, card_key in names.items() if k in metrics}


def log_model(tracking: str, run_id: str, package: Path) -> str:
    """Log the pyfunc (from code, with `serving_code` as its code) into run `run_id`; its URI.

    The params example is every field of GenerationParams at the package's defaults, so the
    params schema MLflow infers from it holds every request param the model knows (MLflow
    drops the others before `predict`; pipeline/serve/pyfunc_model.py refuses those requests).
    """
    import mlflow

    defaults = read_json(package / DEFAULTS_FILE, "build_package writes it")
    example_params = dataclasses.asdict(GenerationParams.from_mapping(defaults))
    mlflow.set_tracking_uri(tracking)
    with (
        tempfile.TemporaryDirectory(prefix="lmforge-code-") as code,
        mlflow.start_run(run_id=run_id),
    ):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={"package": str(package)},
            code_paths=[str(serving_code(Path(code)))],
            input_example=(["once upon a time"], example_params),
            pip_requirements=pip_requirements(),
        )
    return info.model_uri


def compare_with_champion(
    cfg: Config, challenger: TextGenerator, champion_version: Any
) -> dict[str, Any]:
    """Both models' bits/byte on the same test documents; does the challenger win?"""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    name, margin = cfg.register.model_name, cfg.register.promote_margin
    table = pq.read_table(cfg.path("validated") / split_parquet("test"), columns=["text"])
    texts = table.column("text").to_pylist()[: cfg.register.compare_docs]
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/{champion_version.version}")
    champion = loaded.unwrap_python_model().generator
    champ_bpb = champion.bits_per_byte(texts)
    chall_bpb = challenger.bits_per_byte(texts)
    return {
        "champion_version": str(champion_version.version),
        "documents": len(texts),
        "champion_bits_per_byte": champ_bpb,
        "challenger_bits_per_byte": chall_bpb,
        "margin": margin,
        "promoted": chall_bpb < champ_bpb - margin,
    }


def log_packaged_model(
    cfg: Config, tracker: Any, gate: dict[str, Any], lineage: dict[str, str]
) -> tuple[str, TextGenerator, str]:
    """Package the model with its card and log it into the stage's run: (URI, model, card)."""
    with tempfile.TemporaryDirectory(prefix="lmforge-register-") as tmp:
        package = build_package(cfg, Path(tmp) / "package")
        generator = TextGenerator.from_folder(
            package,
            defaults=GenerationParams.from_mapping(dataclasses.asdict(cfg.register.decoding)),
        )
        timing = pretrain_timing(tracker.client, lineage)
        card = model_card(cfg, generator, gate, lineage, timing)
        atomic_write_text(package / MODEL_CARD, card)
        model_uri = log_model(tracking_uri(cfg), tracker.run_id, package)
    tracker.log_text(card, MODEL_CARD)
    return model_uri, generator, card


def log_evaluation(cfg: Config, tracker: Any, model_uri: str, tok_meta: dict[str, Any]) -> None:
    """The evaluation's metrics on the logged model (`models:/m-<id>`), on the test shard.

    Same names as on the evaluate run (`test.bits_per_byte`, ...); the dataset is the test
    shard, named and digested as on the evaluate run's inputs.
    """
    if not model_uri.startswith("models:/m-"):
        return  # not an MLflow 3 LoggedModel: nothing to attach them to
    reports = cfg.path("reports")
    evaluation = read_json(reports / report_json("evaluate"), "run `dvc repro evaluate` first")
    shard = cfg.path("tokenizer") / tok_meta["splits"]["test"]["file"]
    dataset = ("tokens-test", file_md5(shard)[:36])
    tracker.log_model_metrics(model_uri.removeprefix("models:/"), evaluation, dataset)


def link_version(client: Any, name: str, version: str, model_uri: str) -> None:
    """List version `version` of `name` on its LoggedModel (tag `mlflow.modelVersions`).

    The model page links to its registered versions through this tag. A tracking server
    sets it when the version is created from a model id; a local (SQLite) store does not.
    """
    if not model_uri.startswith("models:/m-"):
        return
    model_id = model_uri.removeprefix("models:/")
    listed = json.loads(client.get_logged_model(model_id).tags.get(MODEL_VERSIONS_TAG, "[]"))
    if not any((v["name"], str(v["version"])) == (name, version) for v in listed):
        entry = {"name": name, "version": int(version)}  # as the server writes it
        client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps([*listed, entry])})


def register(cfg: Config, tracker: Any, gate: dict[str, Any]) -> dict[str, Any]:
    """Package, log, register and place the aliases; the registry part of the report."""
    client, name = tracker.client, cfg.register.model_name
    experiment_id = client.get_run(tracker.run_id).info.experiment_id
    tok_meta = read_meta(cfg.path("tokenizer"))
    lineage = lineage_tags(cfg, client, experiment_id, tracker.run_id, tok_meta)
    model_uri, generator, card = log_packaged_model(cfg, tracker, gate, lineage)
    log_evaluation(cfg, tracker, model_uri, tok_meta)
    champion = registry.version_by_alias(client, name, registry.CHAMPION)
    registry.ensure_registered_model(client, name, "GPT-style LM trained by lmforge")
    mv = registry.create_version(client, name, model_uri, tracker.run_id, lineage, card)
    version = str(mv.version)
    link_version(client, name, version, model_uri)
    client.set_registered_model_alias(name, registry.CHALLENGER, version)
    if champion is None:
        comparison: dict[str, Any] = {"champion_version": None, "promoted": True}
        log.info("no champion yet: version %s becomes champion", version)
    else:
        comparison = compare_with_champion(cfg, generator, champion)
    if comparison["promoted"]:
        registry.promote(client, name, version)
    alias = registry.CHAMPION if comparison["promoted"] else registry.CHALLENGER
    log.info("registered %s version %s as %s", name, version, alias)
    return {
        "version": version,
        "alias": alias,
        "model_uri": f"models:/{name}@{alias}",
        "comparison": comparison,
    }
