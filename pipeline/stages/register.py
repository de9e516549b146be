"""Stage `register`: quality gate, MLflow model version, champion/challenger, model card.

    dvc repro register
    python -m pipeline.stages.register --set register.gate.max_ece=0.3

1. The quality gate (`pipeline/serve/gate.py`) reads `reports/evaluate.json` and checks the
   thresholds of `register.gate`. A model that fails is NOT registered; the stage still
   exits 0 and `reports/register.json` names the failed checks (the pipeline summary shows
   them).
2. A model that passes is packaged (weights as safetensors, tokenizer, resolved config,
   decoding defaults, model card: `pipeline/serve/package.py`), logged as an MLflow pyfunc
   from code (nothing pickled), and registered as a new version of `register.model_name`
   with lineage tags (`pipeline/serve/publish.py`). It gets the alias `challenger`.
3. It becomes `champion` when there is none yet, or when it beats the champion's bits per
   byte on the same test documents by more than `register.promote_margin`. A registry that
   cannot answer the champion lookup fails the stage (exit 75 when it is transient, so the
   flow retries); only "does not exist" means there is no champion.

Serve the champion: `mlflow models serve -m models:/lmforge-gpt@champion --env-manager local`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from pipeline.config import Config
from pipeline.core.io import atomic_write_json
from pipeline.core.names import REGISTER_VERSION, report_json, split_parquet
from pipeline.ops.stage_runner import stage_entry
from pipeline.serve.gate import check_gate, gate_metrics, read_json, why_not
from pipeline.serve.publish import STAGE, register

log = logging.getLogger(__name__)
VERSION_FILE = REGISTER_VERSION  # the registry's answer; not a DVC output


def run(cfg: Config) -> dict[str, Any]:
    """Gate the evaluated model; register it when it passes.

    `reports/register.json` (DVC metrics) holds the gate and the decision, which depend only
    on the stage's inputs, so a reproduced run gives the same file. The registry's answer
    (version, alias, champion comparison) differs between registries: it goes to MLflow and
    to `reports/register_version.json`, which DVC does not track.
    """
    from pipeline.ops.tracking import SPLIT_CONTEXT, start_run

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
        tracker.log_metrics(gate_metrics(gate))
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
        # What the gate read: the test-split evaluation (and the test documents, when the
        # challenger was compared with a champion on them).
        test = SPLIT_CONTEXT["test"]
        tracker.log_dataset(reports / report_json("evaluate"), "evaluation-test", test)
        if outcome.get("comparison", {}).get("documents"):
            path = cfg.path("validated") / split_parquet("test")
            tracker.log_dataset(path, "validated-test", test)
        summary = {"registered": report["registered"], "reason": reason, **outcome}
        tracker.describe(STAGE, summary)
    return summary


# `dvc repro register`; by hand `python -m pipeline.stages.register --set k=v`
main = stage_entry(STAGE, run)

if __name__ == "__main__":
    raise SystemExit(main())
