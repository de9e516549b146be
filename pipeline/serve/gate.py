"""The register stage's quality gate: `register.gate` thresholds against `reports/evaluate.json`.

    python -m pipeline.stages.register --set register.gate.min_gain_over_ngram=0.05

A model that fails a check is not registered; the stage still exits 0 and
`reports/register.json` names the failed checks. A figure the evaluation did not produce
(e.g. no task split) fails its check: a gate that cannot be checked must not let a model
through. The model card shows the same checks (`pipeline.serve.model_card.gate_section`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import Config, GateConfig
from pipeline.core.errors import LmforgeError


def read_json(path: Path, hint: str) -> dict[str, Any]:
    """A JSON file another stage (or step) wrote; missing or broken is an error with `hint`."""
    if not path.is_file():
        raise LmforgeError(f"{path}: not found; {hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path}: not valid JSON ({e}); {hint}") from None


def check_gate(evaluation: dict[str, Any], gate: GateConfig) -> dict[str, Any]:
    """Each threshold of `register.gate` against `reports/evaluate.json`, and the verdict."""
    test, baselines = evaluation.get("test", {}), evaluation.get("baselines", {})
    rules = [
        ("gain_over_ngram", baselines.get("gain_over_ngram"), ">=", gate.min_gain_over_ngram),
        ("test_bits_per_byte", test.get("bits_per_byte"), "<=", gate.max_test_bits_per_byte),
        ("ece", test.get("calibration", {}).get("ece"), "<=", gate.max_ece),
    ]
    # Exact match is a skill only on question answering: on real text the task is a
    # continuation, scored by its loss, and no exact-match threshold applies.
    if evaluation.get("task", {}).get("kind") != "continuation":
        rules.append(
            ("task_accuracy", evaluation.get("task_accuracy"), ">=", gate.min_task_accuracy)
        )
    checks = []
    for name, value, op, threshold in rules:
        ok = value is not None and (value <= threshold if op == "<=" else value >= threshold)
        checks.append(
            {"name": name, "value": value, "op": op, "threshold": threshold, "passed": ok}
        )
    failed = [c["name"] for c in checks if not c["passed"]]
    return {"passed": not failed, "failed": failed, "checks": checks}


def describe_failure(gate: dict[str, Any]) -> str:
    """'ece=0.31 (needs <= 0.25); ...' for the failed checks."""
    parts = []
    for c in gate["checks"]:
        if not c["passed"]:
            shown = "missing" if c["value"] is None else f"{c['value']:.4g}"
            parts.append(f"{c['name']}={shown} (needs {c['op']} {c['threshold']:.4g})")
    return "; ".join(parts)


def gate_metrics(gate: dict[str, Any]) -> dict[str, float]:
    """`gate.<check>`: each checked figure the evaluation produced, for MLflow."""
    return {f"gate.{c['name']}": c["value"] for c in gate["checks"] if c["value"] is not None}


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
