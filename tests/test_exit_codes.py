"""Exit codes survive torchrun and DVC, so the flow retries transient failures only and
reports a SIGTERM as a SIGTERM.

Every code here comes from a real process: real torchrun agents, real `dvc repro` runs,
a real unreachable tracking server (a closed loopback port) and a real SIGTERM sent to the
process group of a running pretrain.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SMALL_DATA, TINY_GPT, cfg_for, prepared_project

from flows.pipeline_flow import EXIT_SIGTERM, StageFailed, _retry_transient, stage_exit_code
from pipeline.core.errors import EXIT_TRANSIENT
from pipeline.ops.launch import read_exit_record
from pipeline.stages import synthesize, tokenizer, validate
from pipeline.train import checkpoint as ckpt

BIN = Path(sys.executable).parent


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "TORCHELASTIC"))}
    env |= {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    return env | extra


class _State:
    """A Prefect state whose result raises `exc`, as a failed task's does."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def result(self):
        raise self.exc


WORKER = """
import os, signal, sys
mode = sys.argv[1]
if mode == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(mode))
"""


@pytest.mark.parametrize(("mode", "expected"), [("0", 0), ("75", 75), ("2", 2), ("kill", 137)])
def test_launcher_exits_with_the_workers_code(tmp_path, mode, expected):
    """torchrun exits 1 for all of these; the launcher gives the worker's own status."""
    (tmp_path / "worker.py").write_text(WORKER)
    argv = ["--standalone", "--nproc_per_node=1", "worker.py", mode]
    launched = subprocess.run(
        [sys.executable, "-m", "pipeline.ops.launch", *argv],
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == expected, launched.stderr[-2000:]
    record = read_exit_record(tmp_path, "worker")
    assert record is not None and record["exit_code"] == expected and record["stage"] == "worker"
    if expected:  # the same worker under plain torchrun: the code is lost (why the launcher)
        plain = subprocess.run(
            [str(BIN / "torchrun"), *argv], cwd=tmp_path, env=clean_env(), capture_output=True
        )
        assert plain.returncode == 1


def tiny_dvc_project(root: Path, cmd: str) -> Path:
    root.mkdir(parents=True)
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=root, check=True)
    (root / "dvc.yaml").write_text(f"stages:\n  step:\n    cmd: {cmd}\n")
    return root


STAGE_CMDS = {
    "transient": ("python -c 'import sys; sys.exit(75)'", EXIT_TRANSIENT, True),
    "rejected": ("python -c 'import sys; sys.exit(1)'", 1, False),
    "sigterm": (
        "python -c 'import os, signal; os.kill(os.getpid(), signal.SIGTERM)'",
        EXIT_SIGTERM,
        False,
    ),
}


@pytest.mark.parametrize("case", sorted(STAGE_CMDS))
def test_flow_reads_the_stage_code_through_dvc_repro(tmp_path, case):
    """`dvc repro` exits 255 whatever the stage did; the flow still finds the stage's code."""
    cmd, expected, retried = STAGE_CMDS[case]
    root = tiny_dvc_project(tmp_path / "proj", cmd)
    done = subprocess.run(
        [str(BIN / "dvc"), "repro", "step"],
        cwd=root,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 255  # DVC's own code for any error: nothing about the stage
    lines = (done.stdout + done.stderr).splitlines()
    code = stage_exit_code(done.returncode, lines, read_exit_record(root, "step"))
    assert code == expected
    failed = StageFailed("step", code, "\n".join(lines[-30:]))
    assert _retry_transient(None, None, _State(failed)) is retried
    assert failed.interrupted is (expected == EXIT_SIGTERM)
    if expected == EXIT_SIGTERM:
        assert "SIGTERM" in str(failed) and "resume" in str(failed)


# A pretrain that runs long enough to be interrupted, small enough for 2 cores.
PRETRAIN = [
    *TINY_GPT,
    "pretrain.tokens_per_step=64",
    "pretrain.eval_batches=1",
    "pretrain.eval_interval=100000",
    "pretrain.log_interval=1",
]


@pytest.fixture(scope="module")
def pretrain_project(tmp_path_factory) -> Path:
    """Tokenizer outputs in place, the repo's dvc.yaml and code (its deps), DVC without git."""
    base = tmp_path_factory.mktemp("exitcodes")
    root = prepared_project(base, PRETRAIN, [validate, synthesize, tokenizer])
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__py*"))
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=root, check=True)
    return root


def set_params(root: Path, *overrides: str) -> None:
    from pipeline.config.params_file import apply_to_params

    apply_to_params(root, None, [*SMALL_DATA, *PRETRAIN, *overrides])


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_pretrain_with_tracking_down_is_a_transient_failure_through_dvc(pretrain_project):
    root = pretrain_project
    set_params(
        root,
        "pretrain.max_steps=2",
        "tracking.enabled=true",
        f"tracking.uri=http://127.0.0.1:{closed_port()}",
    )
    done = subprocess.run(
        [str(BIN / "dvc"), "repro", "--single-item", "pretrain"],  # upstream: done in-process
        cwd=root,
        env=clean_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 255, output[-3000:]
    assert "exited with 75" in output  # the worker's code, not torchrun's 1
    code = stage_exit_code(done.returncode, output.splitlines(), read_exit_record(root, "pretrain"))
    assert code == EXIT_TRANSIENT
    assert _retry_transient(None, None, _State(StageFailed("pretrain", code, output[-2000:])))


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_a_checkpoint_and_reads_as_sigterm(pretrain_project):
    root = pretrain_project
    set_params(
        root,
        "tracking.enabled=false",
        "pretrain.max_steps=100000",
        "pretrain.checkpoint_interval=5",
    )
    folder = cfg_for(root).path("checkpoints")
    shutil.rmtree(folder, ignore_errors=True)
    exit_record = root / ".lmforge" / "exit" / "pretrain.json"
    exit_record.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [str(BIN / "dvc"), "repro", "--single-item", "pretrain"],
        cwd=root,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a scheduler's job would be
    )
    try:
        # Training is under way (SIGTERM handler installed) once the first checkpoint exists.
        while not ckpt.list_checkpoints(folder) and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        # The step is read from the folder name: keep_checkpoints may prune this folder
        # before the run ends (a slow machine writes several checkpoints before the signal).
        first_step = int(ckpt.list_checkpoints(folder)[-1].name.removeprefix("step_"))
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=300)  # EOF once the launcher has finished
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "SIGTERM at step" in output, output[-3000:]
    saved = ckpt.list_checkpoints(folder)[-1]
    assert ckpt.read_state(saved).step > first_step
    code = stage_exit_code(proc.returncode, output.splitlines(), read_exit_record(root, "pretrain"))
    assert code == EXIT_SIGTERM
    failed = StageFailed("pretrain", code, output[-2000:])
    assert failed.interrupted and not _retry_transient(None, None, _State(failed))
    assert "SIGTERM" in str(failed)
