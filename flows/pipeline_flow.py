"""The Prefect flow `lm-pipeline`: one task per stage, each run through DVC.

    lmforge run --preset ci                 # in-process, ephemeral Prefect API
    python -m flows.pipeline_flow --preset ci

Prefect orchestrates, DVC decides: every task calls `dvc repro <stage>`, so a stage whose
deps and params are unchanged is skipped by DVC, and DVC records what ran in dvc.lock.
When `dvc status` finds nothing stale, no stage process is started at all.

A run, in order:
1. takes the workspace lock (a second run on the same work tree fails with a clear message);
2. writes the preset and `--set` overrides into params.yaml (as `dvc exp run -S` does),
   after the strict loader has checked them;
3. opens the MLflow parent run, tagged with the git commit, the DVC experiment name and the
   Prefect flow run id, and hands its id to the stage processes (their runs are children);
4. runs the stages; only transient failures (exit code 75, e.g. an unreachable tracking
   server) are retried; a gate or bad-input failure fails fast and shows its report; a
   stage stopped by SIGTERM (143: pretrain saved a checkpoint) is reported as such;
5. saves the workspace as a named DVC experiment (`dvc exp save`: params.yaml, dvc.lock and
   the metrics files) and pushes the outputs to the DVC remote (unless `push=False`);
6. ends the MLflow parent run, FAILED if a stage, the save or the push failed;
7. publishes Prefect artifacts: the summary, the GX result, the evaluation table and the
   registered model; then a failed save or push, or a failed quality gate, fails the run
   (so a nightly run whose outputs never reached the remote does not end Completed).

How the flow learns a stage's exit code: `dvc repro` exits 255 whatever the stage returned,
and prints "failed to run: <cmd>, exited with <code>" (negative: killed by that signal).
The pretrain stage runs under `pipeline.ops.launch`, which maps torchrun's generic 1 back to the
worker's code and also writes it to `.lmforge/exit/pretrain.json`; that record is read
first, because a SIGTERM to the whole process group kills DVC itself before it can print
anything (`stage_exit_code`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from flows import artifacts
from flows.streaming import stream_command
from pipeline.config import load_config
from pipeline.config.params_file import apply_to_params
from pipeline.core.errors import EXIT_TRANSIENT, is_transient
from pipeline.core.names import PLOTS_DIR, REGISTER_VERSION, STAGES, report_json
from pipeline.core.nested import dig
from pipeline.ops.launch import describe_status, exit_record_path, read_exit_record, shell_status
from pipeline.ops.tracking import (
    DVC_EXP_ENV,
    FLOW_RUN_ENV,
    PARENT_RUN_ENV,
    close_run,
    open_parent_run,
)
from pipeline.ops.workspace_lock import workspace_lock

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
EXTRA_REPORTS = {"register": REGISTER_VERSION}


# Exit status of a process stopped by SIGTERM (128 + 15); pretrain saves a checkpoint first.
EXIT_SIGTERM = 128 + 15


class StageFailed(RuntimeError):
    """`dvc repro <stage>` exited non-zero; the message carries the end of its output."""

    def __init__(self, stage: str, exit_code: int | None, tail: str) -> None:
        meaning = describe_status(exit_code)
        if exit_code == EXIT_SIGTERM:
            meaning += (
                "; a checkpoint was saved if the stage had started training, run again to resume"
            )
        code = "" if exit_code is None else f"exit {exit_code}: "
        super().__init__(f"stage {stage} failed (dvc repro {stage}; {code}{meaning}):\n{tail}")
        self.stage, self.exit_code, self.tail = stage, exit_code, tail

    @property
    def transient(self) -> bool:
        return self.exit_code == EXIT_TRANSIENT

    @property
    def interrupted(self) -> bool:
        """Stopped by SIGTERM (not a failure of the stage's own making)."""
        return self.exit_code == EXIT_SIGTERM


class PublishFailed(RuntimeError):
    """The stages ran, but `dvc exp save` or `dvc push` failed: the run must not look green."""


class QualityGateFailed(RuntimeError):
    """The register stage's quality gate rejected the model (nothing was registered)."""


def stage_env(root: Path, parent_run_id: str | None, experiment: str | None) -> dict[str, str]:
    """Environment for DVC and the stage processes it starts."""
    env = dict(os.environ)
    # DVC runs `python -m ...` through a shell: make it this interpreter's python.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env[FLOW_RUN_ENV] = str(flow_run.get_id() or "")
    if experiment:
        env[DVC_EXP_ENV] = experiment
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    return env


def dvc(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True)


def key_metrics(reports: Path, stage: str) -> dict[str, Any]:
    """The summary figures of a stage, read from its DVC metrics file in `reports`."""
    path = reports / report_json(stage)
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    extra = reports / EXTRA_REPORTS.get(stage, "-")
    if extra.is_file():  # e.g. the registered version, which DVC does not track
        report |= json.loads(extra.read_text())
    figures = {label: dig(report, keys) for label, keys in KEY_METRICS.get(stage, [])}
    # a figure is a leaf: a mapping at its path (a report of another shape) shows as absent
    return {k: None if isinstance(v, dict) else v for k, v in figures.items()}


def anything_stale(root: Path, env: dict[str, str]) -> bool:
    """Whether `dvc status` reports anything to run (True when it cannot tell)."""
    status = dvc(root, env, "status", "--json")
    if status.returncode != 0:
        return True
    try:
        return bool(json.loads(status.stdout or "{}"))
    except json.JSONDecodeError:
        return True


def stage_exit_code(dvc_code: int, lines: list[str], record: dict[str, Any] | None) -> int | None:
    """The stage command's exit status, from what one failed `dvc repro <stage>` left.

    In order of trust: the launcher's exit record (written by this attempt: the caller
    removes any older one first); DVC's "exited with N" line (N < 0: killed by signal -N);
    DVC's own death by a signal (a signal to the process group reaches DVC too). A signal
    N is reported as 128 + N, as a shell does. None when nothing says.
    """
    if record is not None and isinstance(record.get("exit_code"), int):
        return record["exit_code"]
    codes = re.findall(r"exited with (-?\d+)", "\n".join(lines[-30:]))
    if codes:
        return shell_status(int(codes[-1]))
    if dvc_code < 0:
        return shell_status(dvc_code)
    return None


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry a stage only after a transient failure (exit 75)."""
    try:
        state.result()
    except StageFailed as e:
        return e.transient
    except Exception as e:  # any other error: retry only if transient
        return is_transient(e)
    return False


@task(
    name="dvc-repro",
    task_run_name="{stage}",
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=_retry_transient,
)
def repro_stage(stage: str, root: str, reports: str, env: dict[str, str]) -> dict[str, Any]:
    """Run `dvc repro <stage>`, streaming its output into the Prefect log."""
    t0 = time.perf_counter()
    record = exit_record_path(root, stage)
    record.unlink(missing_ok=True)  # only this attempt's record may speak for it
    code, lines = stream_command(["dvc", "repro", stage], root, env, stage)
    if code != 0:
        tail = "\n".join(lines[-30:])
        raise StageFailed(stage, stage_exit_code(code, lines, read_exit_record(root, stage)), tail)
    ran = any(f"Running stage '{stage}'" in line for line in lines)
    return {
        "stage": stage,
        "status": "ran" if ran else "skipped (unchanged)",
        "seconds": round(time.perf_counter() - t0, 1),
        "metrics": key_metrics(Path(reports), stage),
    }


@task(name="open-mlflow-parent-run", retries=2, retry_delay_seconds=[5, 30])
def open_parent(root: str, tags: dict[str, str]) -> str | None:
    """The MLflow parent run (retried: the tracking server may be briefly unreachable)."""
    return open_parent_run(load_config(Path(root)), "lm-pipeline", tags)


def experiment_name(preset: str | None) -> str:
    """A DVC experiment name: preset, UTC time and the flow run's short id (unique)."""
    run_id = str(flow_run.get_id() or "local")[:8]
    return f"{preset or 'params'}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{run_id}"


def _failure(step: str, result: subprocess.CompletedProcess) -> str:
    """`step` failed (exit N): the end of its stderr (else stdout), for the run's message."""
    output = (result.stderr.strip() or result.stdout.strip())[-2000:]
    return f"{step} failed (exit {result.returncode}):\n{output}"


def save_experiment(
    root: Path, reports: Path, env: dict[str, str], name: str
) -> tuple[str | None, str | None]:
    """`dvc exp save -n <name>`: params.yaml, dvc.lock and the metrics files, by name.

    Returns (experiment name, None) or (None, the error): the flow fails the run on it
    after recording the rest.
    """
    tracked = [p for p in reports.glob("*.json") if not p.name.endswith(".failed.json")]
    tracked = [p for p in tracked if p.name not in EXTRA_REPORTS.values()]
    tracked += [*reports.glob("*.md"), *(reports / PLOTS_DIR).glob("*.json")]
    include = [a for p in sorted(tracked) for a in ("-I", str(p.relative_to(root)))]
    saved = dvc(root, env, "exp", "save", "-f", "-n", name, *include, "-I", "dvc.lock")
    if saved.returncode != 0:
        error = _failure(f"dvc exp save -n {name}", saved)
        get_run_logger().error("%s", error)
        return None, error
    return name, None


def push_outputs(root: Path, env: dict[str, str]) -> str | None:
    """`dvc push` of every stage's outputs to the default remote; the error, if it failed."""
    pushed = dvc(root, env, "push")
    if pushed.returncode != 0:
        error = _failure("dvc push", pushed)
        get_run_logger().error("%s", error)
        return error
    return None


def publish_markdown(push: bool, errors: list[str]) -> str:
    """The summary's last section: did the run's record reach DVC and the remote?"""
    lines = ["", "## DVC experiment and remote", ""]
    if not errors:
        lines.append("Saved" + (" and pushed." if push else "; not pushed (`--no-push`)."))
    for error in errors:
        step, _, output = error.partition("\n")
        lines += [f"**{step}**", "", "```", output, "```", ""]
    return "\n".join(lines)


def run_stages(root: Path, reports: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """Every stage in chain order; when nothing is stale, no stage process starts."""
    if not anything_stale(root, env):
        return [
            {
                "stage": s,
                "status": "skipped (unchanged)",
                "seconds": 0.0,
                "metrics": key_metrics(reports, s),
            }
            for s in STAGES
        ]
    results = []
    for stage in STAGES:
        try:
            results.append(repro_stage(stage, str(root), str(reports), env))
        except StageFailed as e:
            artifacts.publish(
                "stage-failure",
                artifacts.failure_markdown(stage, reports, e.tail),
                f"stage {stage} failed",
            )
            raise
    return results


@flow(name="lm-pipeline", log_prints=True)
def lm_pipeline(
    preset: str | None = None,
    overrides: list[str] | None = None,
    root: str = ".",
    push: bool = True,
) -> dict[str, Any]:
    """Run every stage in chain order through DVC; return each stage's status and metrics."""
    logger = get_run_logger()
    root_path = Path(root).resolve()
    with workspace_lock(root_path, owner=str(flow_run.get_id() or "")):
        changed = apply_to_params(root_path, preset, overrides or [])
        if changed:
            logger.info("params.yaml updated (%s): %s", preset or "overrides", ", ".join(changed))
        cfg = load_config(root_path)
        reports = cfg.path("reports")
        name = experiment_name(preset)
        tags = {
            "lmforge.prefect_flow_run_id": str(flow_run.get_id() or ""),
            "lmforge.dvc_experiment": name,
            "preset": preset or "",
        }
        parent = open_parent(str(root_path), tags)
        env = stage_env(root_path, parent, name)
        results: list[dict[str, Any]] = []
        errors: list[str] = []  # of `dvc exp save` / `dvc push`: they fail the run below
        experiment, pushed = None, False
        try:
            results = run_stages(root_path, reports, env)
            experiment, error = save_experiment(root_path, reports, env, name)
            errors += [error] if error else []
            if push:
                error = push_outputs(root_path, env)
                errors += [error] if error else []
                pushed = error is None
        finally:
            close_run(
                cfg,
                parent,
                len(results) == len(STAGES) and not errors,
                {f"{r['stage']}_seconds": r["seconds"] for r in results},
            )
    artifacts.publish(
        "lm-pipeline-summary",
        artifacts.summary_markdown(results, parent, experiment) + publish_markdown(push, errors),
        "stage status, durations and key metrics",
    )
    artifacts.publish("gx-validation", artifacts.gx_markdown(reports), "Great Expectations")
    artifacts.publish("evaluation", artifacts.evaluation_markdown(reports), "evaluation tables")
    artifacts.publish("registered-model", artifacts.registry_markdown(reports), "model registry")
    for r in results:
        logger.info("%-11s %-20s %6.1fs  %s", r["stage"], r["status"], r["seconds"], r["metrics"])
    registered = json.loads((reports / report_json("register")).read_text())
    if errors:
        gate = "" if registered["gate"]["passed"] else "\n(the quality gate failed too)"
        raise PublishFailed("\n\n".join(errors) + gate)
    if not registered["gate"]["passed"]:
        raise QualityGateFailed(registered.get("reason", "quality gate failed"))
    return {
        "stages": results,
        "mlflow_parent_run_id": parent,
        "dvc_experiment": experiment,
        "dvc_pushed": pushed,
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.pipeline_flow")
    parser.add_argument("--preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-push", dest="push", action="store_false")
    args = parser.parse_args()
    lm_pipeline(preset=args.preset, overrides=args.overrides, push=args.push)
