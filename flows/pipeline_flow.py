"""The Prefect flow `lm-pipeline`: one task per stage, each run through DVC.

    lmforge run --preset ci                 # in-process, ephemeral Prefect API
    python -m flows.pipeline_flow --preset ci --until tokenizer --retry-delays 5,30

Prefect orchestrates, DVC decides: every task calls `dvc repro <stage>`, so a stage whose
deps and params are unchanged is skipped by DVC, and DVC records what ran in dvc.lock.
When `dvc status` finds nothing stale, no stage process is started at all.

A run, in order:
1. takes the workspace lock (a second run on the same work tree fails at once, naming it);
2. writes the preset and `--set` overrides into params.yaml (as `dvc exp run -S` does),
   after the strict loader has checked them;
3. opens the MLflow parent run, tagged with the git commit, the DVC experiment name and the
   Prefect flow run id, and hands its id to the stage processes (their runs are children);
4. runs the stages (all, or up to `until`); only transient failures (exit code 75, e.g. an
   unreachable tracking server) are retried, after `retry_delays`; a gate or bad-input
   failure fails fast and shows its report; a stage stopped by SIGTERM (143: pretrain saved
   a checkpoint) is reported as such. Cancelling the flow run stops the stage the same way;
5. saves the workspace as a named DVC experiment (`dvc exp save`: params.yaml, dvc.lock and
   the metrics files) and pushes the outputs to the DVC remote (unless `push=False`, or
   the run stopped at `until`);
6. ends the MLflow parent run, FAILED if a stage, the save or the push failed;
7. publishes Prefect artifacts (summary, GX result, evaluation, registered model); then a
   failed save or push, or a failed quality gate, fails the run.

`dvc repro` exits 255 whatever the stage returned: `stage_exit_code` finds the stage's own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from flows import artifacts
from flows.stage_line import stage_line
from flows.streaming import stream_command
from pipeline.config import load_config
from pipeline.config.params_file import apply_to_params
from pipeline.core.errors import EXIT_TRANSIENT, is_transient
from pipeline.core.names import PLOTS_DIR, STAGES, report_json
from pipeline.ops.launch import describe_status, exit_record_path, read_exit_record, shell_status
from pipeline.ops.tracking import (
    DVC_EXP_ENV,
    FLOW_RUN_ENV,
    PARENT_RUN_ENV,
    close_run,
    open_parent_run,
)
from pipeline.ops.workspace_lock import workspace_lock

EXIT_SIGTERM = 128 + 15  # stopped by SIGTERM (pretrain saves a checkpoint first)


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


GATE_FAILED_TOO = "\n(the quality gate failed too)"


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

    DVC prints "failed to run: <cmd>, exited with <code>"; pretrain runs under
    `pipeline.ops.launch`, which writes the worker's code to `.lmforge/exit/pretrain.json`
    (a SIGTERM to the process group kills DVC before it can print anything).
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
    """Prefect retry condition: retry only after a transient failure (exit code 75).

    A stage reports one through its exit code; an error in this process (the parent run)
    is transient when `is_transient` says so or it carries exit code 75 (the tracking
    edge's `TrackingUnavailable`). A gate, bad input, bad credentials or SIGTERM: no retry.
    """
    try:
        state.result()
    except StageFailed as e:
        return e.transient
    except Exception as e:
        return is_transient(e) or getattr(e, "exit_code", None) == EXIT_TRANSIENT
    return False


RETRY_DELAYS_S = [5.0, 30.0]  # seconds before each retry of a transient failure (2 retries)
RETRIES: dict[str, Any] = {
    "retries": len(RETRY_DELAYS_S),
    "retry_delay_seconds": RETRY_DELAYS_S,
    "retry_condition_fn": _retry_transient,
}


@task(name="dvc-repro", task_run_name="{stage}", **RETRIES)
def repro_stage(stage: str, root: str, reports: str, env: dict[str, str]) -> dict[str, Any]:
    """Run `dvc repro <stage>`, streaming its output into the Prefect log.

    DVC runs in its own process group; if this process is told to stop (a cancelled flow
    run's SIGTERM, Ctrl-C), the group gets SIGTERM and is waited for, so pretrain saves a
    checkpoint (`stream_command`). On a terminal, the stage's progress lines redraw one
    line instead of printing (`stage_line`); the log keeps them.
    """
    t0 = time.perf_counter()
    record = exit_record_path(root, stage)
    record.unlink(missing_ok=True)  # only this attempt's record may speak for it
    with stage_line(stage):  # raising inside marks the line failed
        code, lines = stream_command(["dvc", "repro", stage], root, env, stage)
        if code != 0:
            exit_code = stage_exit_code(code, lines, read_exit_record(root, stage))
            raise StageFailed(stage, exit_code, "\n".join(lines[-30:]))
    ran = any(f"Running stage '{stage}'" in line for line in lines)
    return {
        "stage": stage,
        "status": "ran" if ran else "skipped (unchanged)",
        "seconds": round(time.perf_counter() - t0, 1),
        "metrics": artifacts.key_metrics(Path(reports), stage),
    }


@task(name="open-mlflow-parent-run", **RETRIES)
def open_parent(root: str, tags: dict[str, str]) -> str | None:
    """The MLflow parent run (retried: the tracking server may be briefly unreachable)."""
    return open_parent_run(
        load_config(Path(root)), "lm-pipeline", tags, source="flows.pipeline_flow"
    )


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
    tracked = [p for p in tracked if p.name not in artifacts.EXTRA_REPORTS.values()]
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


def stages_until(until: str | None) -> list[str]:
    """The stages of a run: all, or the chain up to and including `until`."""
    if until is None:
        return list(STAGES)
    if until not in STAGES:
        raise ValueError(f"until={until!r}: expected one of {', '.join(STAGES)}")
    return list(STAGES[: STAGES.index(until) + 1])


def with_retries(task_: Any, delays: list[float] | None) -> Any:
    """`task_` retried after a transient failure once per entry of `delays` (seconds)."""
    if delays is None:
        return task_
    return task_.with_options(retries=len(delays), retry_delay_seconds=list(delays) or 0)


SKIPPED = {"status": "skipped (unchanged)", "seconds": 0.0}


def run_stages(
    root: Path, reports: Path, env: dict[str, str], stages: list[str], delays: list[float] | None
) -> list[dict[str, Any]]:
    """`stages` in chain order; when nothing is stale, no stage process starts."""
    if not anything_stale(root, env):
        metrics = artifacts.key_metrics
        return [{"stage": s, **SKIPPED, "metrics": metrics(reports, s)} for s in stages]
    repro = with_retries(repro_stage, delays)
    results = []
    for stage in stages:
        try:
            results.append(repro(stage, str(root), str(reports), env))
        except StageFailed as e:
            artifacts.publish(
                "stage-failure",
                artifacts.failure_markdown(stage, reports, e.tail),
                f"stage {stage} failed",
            )
            raise
    return results


@dataclass
class RunRecord:
    """What a run did, for the parent run, the artifacts and the return value."""

    results: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # of `dvc exp save` / `dvc push`
    experiment: str | None = None
    pushed: bool = False


def prepare_run(root: Path, preset: str | None, overrides: list[str]) -> tuple[Any, str]:
    """Write the preset and overrides into params.yaml; (checked config, experiment name)."""
    if changed := apply_to_params(root, preset, overrides):
        get_run_logger().info("params.yaml updated (%s): %s", preset or "--set", ", ".join(changed))
    return load_config(root), experiment_name(preset)


def record_run(root: Path, reports: Path, env: dict[str, str], push: bool, run: RunRecord) -> None:
    """Save the workspace as the DVC experiment `env` names, then push (errors kept in `run`).

    A partial run (`until`) is neither: `dvc exp save` needs every stage's outputs.
    """
    if len(run.results) < len(STAGES):
        get_run_logger().info("partial run: not saved as a DVC experiment, not pushed")
        return
    run.experiment, error = save_experiment(root, reports, env, env[DVC_EXP_ENV])
    run.errors += [error] if error else []
    if push:
        error = push_outputs(root, env)
        run.errors += [error] if error else []
        run.pushed = error is None


def end_parent(cfg: Any, parent: str | None, success: bool, run: RunRecord) -> None:
    """Close the MLflow parent run; when the run already failed, a close error only warns."""
    seconds = {f"{r['stage']}_seconds": r["seconds"] for r in run.results}
    try:
        close_run(cfg, parent, success, seconds)
    except Exception as e:
        if success:  # else the run's own error (e.g. the stage's) must not be masked
            raise
        get_run_logger().warning("could not close MLflow parent run %s: %s", parent, e)


def check_outcome(reports: Path, stages: list[str], run: RunRecord) -> None:
    """Fail the run on a failed save or push, or on a failed quality gate."""
    registered = {"gate": {"passed": True}}
    if "register" in stages:
        registered = json.loads((reports / report_json("register")).read_text())
    passed = registered["gate"]["passed"]
    if run.errors:
        raise PublishFailed("\n\n".join(run.errors) + ("" if passed else GATE_FAILED_TOO))
    if not passed:
        raise QualityGateFailed(registered.get("reason", "quality gate failed"))


@flow(name="lm-pipeline", log_prints=True)
def lm_pipeline(
    preset: str | None = None,
    overrides: list[str] | None = None,
    root: str = ".",
    push: bool = True,
    until: str | None = None,
    retry_delays: list[float] | None = None,
) -> dict[str, Any]:
    """Run the stages in chain order through DVC; return each stage's status and metrics.

    `until`: the last stage to run (default: all); `retry_delays`: seconds before each
    retry of a transient failure (default RETRY_DELAYS_S).
    """
    stages = stages_until(until)
    root_path = Path(root).resolve()
    flow_run_id = str(flow_run.get_id() or "")
    run = RunRecord()
    with workspace_lock(root_path, owner=flow_run_id):
        cfg, name = prepare_run(root_path, preset, overrides or [])
        reports = cfg.path("reports")
        tags = {
            "lmforge.prefect_flow_run_id": flow_run_id,
            "lmforge.dvc_experiment": name,
            "preset": preset or "",
        }
        parent = with_retries(open_parent, retry_delays)(str(root_path), tags)
        env = stage_env(root_path, parent, name)
        try:
            run.results = run_stages(root_path, reports, env, stages, retry_delays)
            record_run(root_path, reports, env, push, run)
        except BaseException:
            end_parent(cfg, parent, False, run)
            raise
        end_parent(cfg, parent, len(run.results) == len(stages) and not run.errors, run)
    summary = artifacts.summary_markdown(run.results, parent, run.experiment)
    artifacts.publish_run(summary, reports, stages, push, run.errors)
    for r in run.results:  # the log's copy of the summary table, figures as the table shows them
        get_run_logger().info(artifacts.summary_line(r))
    check_outcome(reports, stages, run)
    return {
        "stages": run.results,
        "mlflow_parent_run_id": parent,
        "dvc_experiment": run.experiment,
        "dvc_pushed": run.pushed,
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.pipeline_flow")
    parser.add_argument("--preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-push", dest="push", action="store_false")
    parser.add_argument("--until", choices=STAGES, help="the last stage to run (default: all)")
    parser.add_argument("--retry-delays", type=lambda s: [float(x) for x in s.split(",")])
    args = parser.parse_args()
    lm_pipeline(**vars(args))
