"""torchrun that exits with the stage's own exit code.

    python -m pipeline.ops.launch <torchrun args>
    python -m pipeline.ops.launch --standalone --nproc_per_node=2 -m pipeline.stages.pretrain
    python -m pipeline.ops.launch --nnodes=2 --node_rank=0 --rdzv_backend=c10d \
        --rdzv_endpoint=host:29400 --nproc_per_node=8 -m pipeline.stages.pretrain

The arguments are torchrun's own, parsed by torchrun's parser (`torch.distributed.run`), and
the same elastic agent runs in this process, so every torchrun option (multi-node included)
works unchanged. What differs is the exit code. torchrun itself exits 1 for any failed worker
(it raises `ChildFailedError`) and 1 when it is sent SIGTERM (it raises `SignalException`
after stopping its workers), which hides the codes the flow acts on: 75 (transient, retried)
and 143 (SIGTERM, checkpoint saved). This launcher exits with:

- the root-cause worker's exit code (`ChildFailedError.get_first_failure()`, the earliest
  failure); a worker killed by signal N gives 128 + N, as a shell reports it;
- 128 + N when the launcher itself gets signal N: the agent has then already forwarded N to
  the workers (they run in their own sessions, so a signal to this process group reaches
  them only that way) and waited for them to stop (`TORCH_ELASTIC_SHUTDOWN_TIMEOUT`, 30 s);
  pretrain saves a checkpoint on SIGTERM within one step.

It also writes that code to `.lmforge/exit/<stage>.json` (under `$DVC_ROOT`, else the current
folder), because `dvc repro` exits 255 whatever the stage returned and DVC may be gone:
a SIGTERM sent to the whole process group kills DVC at once, while this process, which holds
DVC's output pipe, finishes the shutdown. The flow reads the record (see
`flows/pipeline_flow.stage_exit_code`).

The parent's side of the chain is `run_group`: the flow starts `dvc repro` in its own
process group, and when the flow process is told to stop (Prefect delivers a cancelled flow
run as SIGTERM to that process alone; Ctrl-C is SIGINT), it sends SIGTERM to the group
(DVC, this launcher), waits for the group's output to end (pretrain checkpoints, the record
is written), and only then stops itself. Without it, DVC and the training would outlive the
cancelled flow run, unsignalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.io import atomic_write_json

EXIT_RECORDS = Path(".lmforge") / "exit"


def exit_record_path(root: Path | str, stage: str) -> Path:
    """Where the launcher of `stage` records its exit code, under project `root`."""
    return Path(root) / EXIT_RECORDS / f"{stage}.json"


def read_exit_record(root: Path | str, stage: str) -> dict[str, Any] | None:
    """The record the launcher wrote for `stage`, or None if there is none (or it is torn)."""
    try:
        return json.loads(exit_record_path(root, stage).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def shell_status(exitcode: int) -> int:
    """A process exit status as a shell reports it: signal N (Popen's -N) is 128 + N."""
    return 128 - exitcode if exitcode < 0 else exitcode


def describe_status(code: int | None) -> str:
    """What an exit status means in this project (see pipeline/ops/stage_runner.py)."""
    if code is None:
        return "exit code unknown"
    known = {
        0: "success",
        1: "the stage rejected its input",
        2: "bad configuration",
        75: "transient failure, worth retrying",
    }
    if code in known:
        return known[code]
    if code > 128:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            return f"signal {code - 128}"
        return f"stopped by {name}"
    return "failed"


def _stage_name(args: Any) -> str:
    """DVC's stage name when run by DVC, else the last part of the training module/script."""
    stage = os.environ.get("DVC_STAGE", "")
    if stage:
        return stage.rsplit(":", 1)[-1]  # "dvc.yaml:pretrain" in some DVC versions
    script = Path(str(args.training_script)).name
    return script.removesuffix(".py").rsplit(".", 1)[-1]


def launch(argv: list[str]) -> tuple[str, int, str]:
    """Run torchrun's agent in this process; (stage, exit status, one-line reason)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    stage = _stage_name(args)
    # The workers watch this pid and die with it (pipeline.train.distributed.exit_with_launcher).
    os.environ["LMFORGE_LAUNCHER_PID"] = str(os.getpid())
    try:
        record(run)(args)  # `record`: torchrun's error-file handling, as its own main has
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(str(e), file=sys.stderr)  # torchrun's table of failures
        code = shell_status(failure.exitcode)
        reason = f"rank {rank} (pid {failure.pid}) exited with {failure.exitcode}"
    except SignalException as e:
        code = 128 + int(e.sigval)
        reason = f"launcher got {signal.Signals(e.sigval).name}; workers were sent it too"
    else:
        code, reason = 0, "all ranks exited with 0"
    return stage, code, f"{stage}: {reason}: exit {code} ({describe_status(code)})"


# How long a stopped group may take to finish before SIGKILL: the agent itself waits up to
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s) for its workers, pretrain checkpoints within a step.
STOP_GRACE_S = 60.0


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group has already exited
        os.killpg(pgid, sig)


def run_group(
    argv: list[str],
    cwd: Path | str,
    env: dict[str, str],
    on_line: Callable[[str], None],
    grace_s: float = STOP_GRACE_S,
) -> tuple[int, list[str]]:
    """Run `argv` in its own process group, handing each output line to `on_line`.

    Returns (exit status, output lines). If waiting is interrupted (any BaseException: the
    TerminationSignal Prefect raises for a cancelled flow run, KeyboardInterrupt), the group
    gets SIGTERM and its output is read to the end, which comes once every process holding
    it has exited; SIGKILL after `grace_s`, or at once on a second interruption. Then the
    interruption is re-raised.
    """
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # one group to signal: DVC, its shell, this launcher
    )
    assert proc.stdout is not None  # stdout=PIPE
    lines: list[str] = []

    def read_to_end() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip())
            on_line(line.rstrip())

    try:
        read_to_end()
    except BaseException:
        _signal_group(proc.pid, signal.SIGTERM)
        deadline = threading.Timer(grace_s, _signal_group, (proc.pid, signal.SIGKILL))
        deadline.daemon = True
        deadline.start()
        try:
            read_to_end()
            proc.wait()
        except BaseException:
            _signal_group(proc.pid, signal.SIGKILL)
            raise
        finally:
            deadline.cancel()
        raise
    return proc.wait(), lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stage, code, reason = launch(argv)
    root = os.environ.get("DVC_ROOT") or os.getcwd()
    record = {"stage": stage, "exit_code": code, "reason": reason, "time": time.time()}
    atomic_write_json(exit_record_path(root, stage), record)
    print(f"pipeline.ops.launch: {reason}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
