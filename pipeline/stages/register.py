"""Stage `register`: quality gate, MLflow model version, champion/challenger, model card.

    dvc repro register
    python -m pipeline.stages.register --set register.gate.max_ece=0.3

1. The quality gate reads `reports/evaluate.json` and checks the thresholds of
   `register.gate`. A model that fails is NOT registered; the stage still exits 0 and
   `reports/register.json` names the failed checks (the pipeline summary shows them).
2. A model that passes is packaged (weights as safetensors, tokenizer, resolved config,
   decoding defaults, model card), logged as an MLflow pyfunc from code (nothing pickled),
   and registered as a new version of `register.model_name` with lineage tags. It gets the
   alias `challenger`.
3. It becomes `champion` when there is none yet, or when it beats the champion's bits per
   byte on the same test documents by more than `register.promote_margin`; both models
   score those documents here, each with its own tokenizer (bits/byte do not depend on it).
   A registry that cannot answer the champion lookup fails the stage (exit 75 when it is
   transient, so the flow retries); only "does not exist" means there is no champion.

Serve the champion: `mlflow models serve -m models:/lmforge-gpt@champion --env-manager local`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from pipeline.config import Config, GateConfig
from pipeline.core.errors import LmforgeError
from pipeline.core.io import atomic_write_json, atomic_write_text, tree_md5
from pipeline.core.names import (
    MODEL_CARD,
    MODEL_CONFIG_FILE,
    REGISTER_VERSION,
    RESOLVED_CONFIG,
    STAGES,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    report_json,
    split_parquet,
)
from pipeline.ops.stage_runner import stage_main
from pipeline.ops.tracking import (
    DVC_EXP_ENV,
    FLOW_RUN_ENV,
    PARENT_RUN_ENV,
    git_commit,
    tracking_uri,
)
from pipeline.serve import registry
from pipeline.serve.model_card import CardInputs, render_model_card
from pipeline.serve.textgen import DEFAULTS_FILE, GenerationParams, TextGenerator
from pipeline.text.shards import META_FILE, read_meta

log = logging.getLogger(__name__)
STAGE = "register"
VERSION_FILE = REGISTER_VERSION  # the registry's answer; not a DVC output
LIBRARY_DIR = Path(__file__).resolve().parents[1]  # `pipeline/`
PYFUNC_FILE = LIBRARY_DIR / "serve" / "pyfunc_model.py"
# The library packages shipped as the served model's code, and nothing else of `pipeline/`:
# pyfunc_model -> serve.textgen -> model, text, core (the rest of serve/ stays inside these
# too), and config, whose loader reads the package's config.yaml.
SERVING_PACKAGES = ("serve", "model", "text", "config", "core")


# --------------------------------------------------------------------------------------
# Quality gate
# --------------------------------------------------------------------------------------


def check_gate(evaluation: dict[str, Any], gate: GateConfig) -> dict[str, Any]:
    """Each threshold of `register.gate` against `reports/evaluate.json`, and the verdict.

    A figure the evaluation did not produce (e.g. no task split) fails its check: a gate
    that cannot be checked must not let a model through.
    """
    test = evaluation.get("test", {})
    rules = [
        ("test_bits_per_byte", test.get("bits_per_byte"), "<=", gate.max_test_bits_per_byte),
        ("ece", test.get("calibration", {}).get("ece"), "<=", gate.max_ece),
        ("task_accuracy", evaluation.get("task_accuracy"), ">=", gate.min_task_accuracy),
    ]
    checks = []
    for name, value, op, threshold in rules:
        ok = value is not None and (value <= threshold if op == "<=" else value >= threshold)
        checks.append(
            {"name": name, "value": value, "op": op, "threshold": threshold, "passed": ok}
        )
    failed = [c["name"] for c in checks if not c["passed"]]
    return {"passed": not failed, "failed": failed, "checks": checks}


def describe_failure(gate: dict[str, Any]) -> str:
    """'ece=0.31 > 0.25; ...' for the failed checks."""
    parts = []
    for c in gate["checks"]:
        if not c["passed"]:
            shown = "missing" if c["value"] is None else f"{c['value']:.4g}"
            parts.append(f"{c['name']}={shown} (needs {c['op']} {c['threshold']:.4g})")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------
# Model package and card
# --------------------------------------------------------------------------------------


def read_json(path: Path, hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise LmforgeError(f"{path}: not found; {hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path}: not valid JSON ({e}); {hint}") from None


def build_package(cfg: Config, dest: Path) -> Path:
    """The files the served model needs: weights, config, tokenizer, decoding defaults.

    The tokenizer's meta.json goes along: it names the end-of-text token the served model
    stops at (pipeline/serve/textgen.py).
    """
    model_dir, tok_dir = cfg.path("finetune"), cfg.path("tokenizer")
    dest.mkdir(parents=True)
    sources = {
        model_dir / MODEL_CONFIG_FILE: "finetune",
        model_dir / WEIGHTS_FILE: "finetune",
        tok_dir / TOKENIZER_FILE: "tokenizer",
        tok_dir / META_FILE: "tokenizer",
    }
    for src, stage in sources.items():
        if not src.is_file():
            raise LmforgeError(f"{src}: not found; run `dvc repro {stage}` first")
        shutil.copy2(src, dest / src.name)
    atomic_write_text(dest / RESOLVED_CONFIG, cfg.to_yaml())
    defaults = {**dataclasses.asdict(cfg.register.decoding), "return_full_text": True}
    atomic_write_json(dest / DEFAULTS_FILE, defaults)
    return dest


def card_samples(cfg: Config, generator: TextGenerator) -> list[tuple[str, str]]:
    """(prompt, generation) pairs with the served defaults, on the evaluation's prompts."""
    from pipeline.data.eval_inputs import prompts_and_references

    n = cfg.register.card_samples
    if n == 0:
        return []
    prompts, _ = prompts_and_references(cfg)
    prompts = prompts[:n]
    return list(zip(prompts, generator.complete(prompts), strict=True))


def pretrain_timing(client: Any, lineage: dict[str, str]) -> dict[str, float]:
    """Wall time and tokens/s of the pretrain run, kept in MLflow (not in DVC metrics)."""
    run_id = lineage.get("mlflow_run_id.pretrain")
    if not run_id:
        return {}
    metrics = client.get_run(run_id).data.metrics
    names = {"wall_seconds": "wall_seconds", "mean_tokens_per_s": "tokens_per_s"}
    return {card_key: metrics[k] for k, card_key in names.items() if k in metrics}


def model_card(
    cfg: Config,
    generator: TextGenerator,
    gate: dict[str, Any],
    lineage: dict[str, str],
    timing: dict[str, float],
) -> str:
    """The markdown model card from the stage reports, this model and its lineage."""
    inputs = CardInputs(
        cfg=cfg,
        model_config=json.loads((cfg.path("finetune") / MODEL_CONFIG_FILE).read_text()),
        num_params=generator.model.num_params(exclude_position=False),
        samples=card_samples(cfg, generator),
        gate=gate,
        lineage=lineage,
        timing=timing,
    )
    return render_model_card(inputs)


# --------------------------------------------------------------------------------------
# Lineage
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------


def pip_requirements() -> list[str]:
    """Pinned runtime requirements of the served model: what the pyfunc imports."""
    from importlib.metadata import version

    pkgs = ("mlflow", "torch", "tokenizers", "safetensors", "numpy", "pyyaml")
    return [f"{p}=={version(p).split('+')[0]}" for p in pkgs]


def serving_code(dest: Path) -> Path:
    """`dest/pipeline/` holding `SERVING_PACKAGES` (no caches): the served model's code.

    Laid out as `pipeline/<pkg>/`, so `import pipeline.serve.textgen` works where MLflow
    puts the model's code folder on `sys.path`.
    """
    root = dest / "pipeline"
    root.mkdir(parents=True)
    shutil.copy2(LIBRARY_DIR / "__init__.py", root / "__init__.py")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in SERVING_PACKAGES:
        shutil.copytree(LIBRARY_DIR / pkg, root / pkg, ignore=skip)
    return root


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


def register(cfg: Config, tracker: Any, gate: dict[str, Any]) -> dict[str, Any]:
    """Package, log, register and place the aliases; the registry part of the report."""
    client, name = tracker.client, cfg.register.model_name
    experiment_id = client.get_run(tracker.run_id).info.experiment_id
    tok_meta = read_meta(cfg.path("tokenizer"))
    lineage = lineage_tags(cfg, client, experiment_id, tracker.run_id, tok_meta)
    with tempfile.TemporaryDirectory(prefix="lmforge-register-") as tmp:
        package = build_package(cfg, Path(tmp) / "package")
        generator = TextGenerator.from_folder(
            package,
            defaults=GenerationParams.from_mapping(dataclasses.asdict(cfg.register.decoding)),
        )
        timing = pretrain_timing(client, lineage)
        card = model_card(cfg, generator, gate, lineage, timing)
        atomic_write_text(package / MODEL_CARD, card)
        model_uri = log_model(tracking_uri(cfg), tracker.run_id, package)
    tracker.log_text(card, MODEL_CARD)
    champion = registry.version_by_alias(client, name, registry.CHAMPION)
    registry.ensure_registered_model(client, name, "GPT-style LM trained by lmforge")
    mv = registry.create_version(client, name, model_uri, tracker.run_id, lineage, card)
    version = str(mv.version)
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


def why_not(cfg: Config, gate: dict[str, Any]) -> str | None:
    """Why this model is not registered, or None when it is."""
    from pipeline.ops.tracking import mlflow_or_none

    if not gate["passed"]:
        return "quality gate failed: " + describe_failure(gate)
    if not cfg.tracking.enabled:
        return "not registered: tracking.enabled is false"
    if mlflow_or_none() is None:
        return "not registered: mlflow is not installed"
    return None


def run(cfg: Config) -> dict[str, Any]:
    """Gate the evaluated model; register it when it passes.

    `reports/register.json` (DVC metrics) holds the gate and the decision, which depend only
    on the stage's inputs, so a reproduced run gives the same file. The registry's answer
    (version, alias, champion comparison) differs between registries: it goes to MLflow and
    to `reports/register_version.json`, which DVC does not track.
    """
    from pipeline.ops.tracking import start_run

    reports = cfg.path("reports")
    evaluation = read_json(reports / report_json("evaluate"), "run `dvc repro evaluate` first")
    gate = check_gate(evaluation, cfg.register.gate)
    reason = why_not(cfg, gate)
    report: dict[str, Any] = {
        "model_name": cfg.register.model_name,
        "gate": gate,
        "registered": reason is None,
    }
    if reason:
        report["reason"] = reason
    outcome: dict[str, Any] = {}
    with start_run(cfg, STAGE) as tracker:
        tracker.log_params({STAGE: dataclasses.asdict(cfg.register)})
        checked = {c["name"]: c["value"] for c in gate["checks"] if c["value"] is not None}
        tracker.log_metrics({f"gate.{k}": v for k, v in checked.items()})
        tracker.set_tags({"lmforge.gate": "passed" if gate["passed"] else "failed"})
        if reason:
            log.warning("register: %s; nothing registered", reason)
            (reports / VERSION_FILE).unlink(missing_ok=True)  # no stale version in the summary
        else:
            outcome = register(cfg, tracker, gate)
            atomic_write_json(reports / VERSION_FILE, outcome)
            tracker.log_artifact(reports / VERSION_FILE)
        atomic_write_json(reports / report_json(STAGE), report)
        tracker.log_artifact(reports / report_json(STAGE))
    return {"registered": report["registered"], "reason": reason, **outcome}


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
