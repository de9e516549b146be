"""Fault row 3: cancelling the Prefect flow run while pretrain trains.

The flow is served for real: `lmforge serve` (Prefect's runner, `lm_pipeline.serve`) runs
in its own process group against the session's Prefect server, and each flow run of its
deployment runs in a subprocess of the runner. A flow run is created through the API, and
once pretrain has written its first checkpoint the flow run is cancelled through the API
(what `prefect flow-run cancel <id>` does). Prefect's runner then sends SIGTERM to the
flow run's process alone; the flow passes it on to the process group of `dvc repro
pretrain` (DVC, the launcher, which forwards it to the torchrun worker), waits for it, and
only then ends. So:

- pretrain gets SIGTERM and checkpoints: "SIGTERM at step N" in the flow run's logs, the
  launcher's exit record says 143, and a newer checkpoint is on disk;
- the flow run ends Cancelled, and no process of the run is left in the project;
- the next flow run resumes from that checkpoint (its logs say so) and trains on: its next
  checkpoint follows on from the saved step (it is then cancelled as well, which checks
  cancellation a second time and keeps the test short whatever the machine's speed);
- nothing is lost: the upstream outputs are byte-identical and no temporary is left.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_GPT
from fault_helpers import (
    BIN,
    cmdline,
    flow_env,
    flow_run_logs,
    flow_run_state,
    leftover_temporaries,
    md5_files,
    orchestrated_project,
    processes_in,
    wait_for,
)

from pipeline.ops.launch import read_exit_record
from pipeline.stages import synthesize, tokenizer, validate
from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.slow

# A pretrain that cannot finish before it is cancelled, and checkpoints every few steps.
PRETRAIN = [
    *TINY_GPT,
    "pretrain.tokens_per_step=64",
    "pretrain.eval_batches=1",
    "pretrain.eval_interval=1000000",
    "pretrain.log_interval=5",
    "pretrain.checkpoint_interval=5",
    "pretrain.max_steps=1000000",
]
UPSTREAM = ("data/validated", "data/synthetic", "data/tokenizer")
DEPLOYMENT = "lm-pipeline/faults-cancel"


def serve(procs, root: Path, api: str, log: Path):
    """`lmforge serve` of the project: the deployment `lm-pipeline/faults-cancel`."""
    # A schedule that fires once a year: flow runs here come from the API only.
    argv = [str(BIN / "lmforge"), "serve", "--cron", "0 0 1 1 *", "--name", "faults-cancel"]
    with log.open("wb") as out:
        return procs.start(
            argv,
            cwd=root,
            env=flow_env(api, PREFECT_RUNNER_POLL_FREQUENCY="1"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def deployment_id(server, log: Path):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    def found():
        assert server.poll() is None, log.read_text(errors="replace")[-3000:]
        with get_client(sync_client=True) as client:
            try:
                return client.read_deployment_by_name(DEPLOYMENT).id
            except ObjectNotFound:
                return None

    return wait_for(found, 300, f"the deployment {DEPLOYMENT}", interval_s=1.0)


def new_flow_run(deployment) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(
            deployment, parameters={"until": "pretrain", "push": False}
        )
    return str(run.id)


def cancel(flow_run_id: str) -> None:
    """What `prefect flow-run cancel <id>` does: propose Cancelling to the server."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        result = client.set_flow_run_state(flow_run_id, Cancelling(message="cancelled by test"))
    assert result.status.value == "ACCEPT", result


def run_processes(root: Path) -> list[str]:
    """The command lines of DVC, launcher and stage processes still running in `root`."""
    found = [cmdline(pid) for pid in processes_in(root)]
    return [c for c in found if "dvc" in c or "pipeline." in c]


def steps(folder: Path) -> list[int]:
    return [int(p.name.removeprefix("step_")) for p in ckpt.list_checkpoints(folder)]


def cancel_once_training(root: Path, flow_run_id: str, after_step: int, server) -> int:
    """Cancel the run once it has checkpointed past `after_step`; return the step then."""
    folder = root / "models" / "checkpoints"

    def training() -> int | None:
        assert server.poll() is None, "lmforge serve exited"
        state = flow_run_state(flow_run_id)
        assert not state.is_final(), f"the flow run ended before it was cancelled: {state}"
        newer = [s for s in steps(folder) if s > after_step]
        return max(newer) if newer else None

    seen = wait_for(training, 600, f"pretrain to checkpoint past step {after_step}")
    cancel(flow_run_id)
    wait_for(lambda: flow_run_state(flow_run_id).is_cancelled(), 300, "the run to be Cancelled")
    return seen


def test_cancelled_flow_run_checkpoints_and_the_next_run_resumes(tmp_path, procs, prefect_api):
    root = orchestrated_project(tmp_path, PRETRAIN, [validate, synthesize, tokenizer])
    before = md5_files(root, *UPSTREAM)
    server = serve(procs, root, prefect_api, tmp_path / "serve.log")
    deployment = deployment_id(server, tmp_path / "serve.log")

    first = new_flow_run(deployment)
    seen = cancel_once_training(root, first, 0, server)
    # Nothing of the run is left: DVC, the launcher and the worker have all exited.
    wait_for(lambda: not run_processes(root), 120, "the run's processes to exit")
    record = read_exit_record(root, "pretrain")
    assert record is not None and record["exit_code"] == 143, record
    saved = max(steps(root / "models" / "checkpoints"))
    assert saved >= seen
    logs = flow_run_logs(first)
    assert f"SIGTERM at step {saved}" in logs, logs[-3000:]

    second = new_flow_run(deployment)
    seen_again = cancel_once_training(root, second, saved, server)
    logs = flow_run_logs(second)
    resumed = re.search(r"resumed from \S+step_(\d+) at step (\d+)", logs)
    assert resumed and int(resumed[1]) == int(resumed[2]) == saved, logs[-3000:]
    assert seen_again > saved  # trained on from the saved step
    wait_for(lambda: not run_processes(root), 120, "the run's processes to exit")
    assert read_exit_record(root, "pretrain")["exit_code"] == 143

    assert md5_files(root, *UPSTREAM) == before
    assert leftover_temporaries(root) == []
