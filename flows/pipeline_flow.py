"""The Prefect flow `lm-pipeline`: one task per stage, each run through DVC.

    lmforge run --preset ci                 # in-process, ephemeral Prefect API
    python -m flows.pipeline_flow --preset ci

Prefect orchestrates, DVC decides: every task calls `dvc repro <stage>`, so a stage whose
deps and params are unchanged is skipped by DVC, and DVC records what ran in dvc.lock.
A preset and `--set` overrides are written into params.yaml first (as `dvc exp run -S`
does), after the strict loader has checked them. The flow opens the MLflow parent run and
hands its id to the stage processes, which log as its children.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from pipeline.config import load_config
from pipeline.params_file import apply_to_params
from pipeline.stages import STAGES
from pipeline.tracking import FLOW_RUN_ENV, PARENT_RUN_ENV, close_run, open_parent_run

# The figures shown per stage in the run summary: (label, path into reports/<stage>.json).
KEY_METRICS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "validate": [
        ("train docs", ("splits", "train", "docs")),
        ("val docs", ("splits", "val", "docs")),
        ("duplicate fraction", ("aggregates", "duplicate_fraction")),
    ],
    "synthesize": [
        ("entropy bits/byte", ("source_entropy", "bits_per_byte")),
        ("synthetic share", ("mix", "synthetic_share_bytes")),
        ("fine-tune examples", ("finetune", "train_examples")),
    ],
    "tokenizer": [
        ("vocab", ("vocab_size",)),
        ("bytes/token (val)", ("bytes_per_token_val",)),
    ],
    "pretrain": [
        ("train loss", ("train_loss",)),
        ("val bits/byte", ("val_bpb",)),
        ("tokens", ("tokens_seen",)),
    ],
    "finetune": [
        ("method", ("method",)),
    ],
    "evaluate": [
        ("test bits/byte", ("test", "bits_per_byte")),
        ("KL bits/byte (story world)", ("source_kl", "storyworld", "kl_bits_per_byte")),
        ("task accuracy", ("task_accuracy",)),
    ],
    "register": [
        ("registered", ("registered",)),
        ("version", ("version",)),
        ("alias", ("alias",)),
        ("why not", ("reason",)),
    ],
}

# Reports beside reports/<stage>.json that the summary reads too (not DVC outputs).
EXTRA_REPORTS = {"register": "register_version.json"}


class StageFailed(RuntimeError):
    """`dvc repro <stage>` exited non-zero; the message carries the end of its output."""


def stage_env(root: Path, parent_run_id: str | None) -> dict[str, str]:
    """Environment for DVC and the stage processes it starts."""
    env = dict(os.environ)
    # DVC runs `python -m ...` through a shell: make it this interpreter's python.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env[FLOW_RUN_ENV] = str(flow_run.get_id() or "")
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    return env


def _dig(report: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        report = report.get(key, {}) if isinstance(report, dict) else {}
    return report if not isinstance(report, dict) else None


def key_metrics(root: Path, stage: str) -> dict[str, Any]:
    """The summary figures of a stage, read from its DVC metrics file."""
    cfg_reports = load_config(root).path("reports")
    path = cfg_reports / f"{stage}.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    extra = cfg_reports / EXTRA_REPORTS.get(stage, "-")
    if extra.is_file():  # e.g. the registered version, which DVC does not track
        report |= json.loads(extra.read_text())
    return {label: _dig(report, keys) for label, keys in KEY_METRICS.get(stage, [])}


@task(name="dvc-repro", task_run_name="{stage}")
def repro_stage(stage: str, root: str, env: dict[str, str]) -> dict[str, Any]:
    """Run `dvc repro <stage>`, streaming its output into the Prefect log."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["dvc", "repro", stage],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        logger.info("%s | %s", stage, line.rstrip())
    if proc.wait() != 0:
        tail = "\n".join(lines[-30:])
        raise StageFailed(f"stage {stage} failed (dvc repro {stage}):\n{tail}")
    ran = any(f"Running stage '{stage}'" in line for line in lines)
    return {
        "stage": stage,
        "status": "ran" if ran else "skipped (unchanged)",
        "seconds": round(time.perf_counter() - t0, 1),
        "metrics": key_metrics(Path(root), stage),
    }


def summary_markdown(results: list[dict[str, Any]], parent_run_id: str | None) -> str:
    lines = [
        "# lm-pipeline run",
        "",
        "| stage | status | seconds | key metrics |",
        "|---|---|---|---|",
    ]
    for r in results:
        shown = {k: v for k, v in r["metrics"].items() if v is not None}
        figures = ", ".join(f"{k}: {_fmt(v)}".replace("|", "\\|") for k, v in shown.items())
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']} | {figures} |")
    if parent_run_id:
        lines += ["", f"MLflow parent run: `{parent_run_id}`"]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@flow(name="lm-pipeline", log_prints=True)
def lm_pipeline(
    preset: str | None = None, overrides: list[str] | None = None, root: str = "."
) -> dict[str, Any]:
    """Run every stage in chain order through DVC; return each stage's status and metrics."""
    logger = get_run_logger()
    root_path = Path(root).resolve()
    changed = apply_to_params(root_path, preset, overrides or [])
    if changed:
        logger.info("params.yaml updated (%s): %s", preset or "overrides", ", ".join(changed))
    cfg = load_config(root_path)
    parent = open_parent_run(
        cfg,
        "lm-pipeline",
        {"lmforge.prefect_flow_run_id": flow_run.get_id() or "", "preset": preset},
    )
    env = stage_env(root_path, parent)
    results: list[dict[str, Any]] = []
    try:
        for stage in STAGES:
            results.append(repro_stage(stage, str(root_path), env))
    finally:
        ok = len(results) == len(STAGES)
        close_run(cfg, parent, ok, {f"{r['stage']}_seconds": r["seconds"] for r in results})
    create_markdown_artifact(summary_markdown(results, parent), key="lm-pipeline-summary")
    for r in results:
        logger.info("%-11s %-20s %6.1fs  %s", r["stage"], r["status"], r["seconds"], r["metrics"])
    return {"stages": results, "mlflow_parent_run_id": parent}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.pipeline_flow")
    parser.add_argument("--preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    lm_pipeline(preset=args.preset, overrides=args.overrides)
