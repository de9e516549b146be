"""Faults 1 and 2: `kill -9` of a `dvc repro pretrain`, at a random step and mid-checkpoint.

Everything is real: `dvc repro --single-item pretrain` runs torchrun (pipeline.ops.launch)
in its own process group, the test sends SIGKILL to that group, and re-runs the same
command. The uninterrupted reference is the same command in a copy of the same project.
The random step comes from LMFORGE_FAULT_SEED (default below) and is printed, so a
failure can be replayed:

    LMFORGE_FAULT_SEED=7 .venv/bin/python -m pytest tests/faults/test_kill_resume.py -s
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
from conftest import REPO, TINY_GPT, cfg_for, prepared_project
from fault_helpers import (
    BIN,
    LineWatcher,
    dvc_env,
    leftover_temporaries,
    md5_files,
    wait_for,
)

from pipeline.config.params_file import apply_to_params
from pipeline.stages import pretrain, synthesize, tokenizer, validate
from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.slow  # runs the pipeline through DVC

SEED = int(os.environ.get("LMFORGE_FAULT_SEED", "1201"))
MAX_STEPS = 200
# 20 to 90 steps/s on 2 cores: a run of 2 to 10 s, killed in its first quarter, so that the
# kill lands mid-run even when the test reads the step line late on a loaded machine and
# the worker takes its watchdog's 0.5 s to notice the dead launcher. Evaluating every step
# gives one log line per step to wait on (evaluation never touches the trajectory:
# pipeline/train/resume.py NOT_TRAJECTORY), checkpoints every 5 steps.
PARAMS = [
    *TINY_GPT,
    "model.dropout=0.1",  # resume must restore the RNG too
    "pretrain.tokens_per_step=128",  # 2 micro-steps
    f"pretrain.max_steps={MAX_STEPS}",
    "pretrain.warmup_steps=5",
    "pretrain.eval_batches=1",
    "pretrain.eval_interval=1",
    "pretrain.log_interval=1",
    "pretrain.checkpoint_interval=5",
    "pretrain.keep_checkpoints=2",
]
# What the last good run left, and what the finished run must reproduce bit for bit.
BEFORE = ("data/tokenizer", "models/pretrain", "reports/pretrain.json", "reports/plots")
# (Not models/pretrain/config.yaml: it records this run's params, checkpoint_interval too.)
FINAL = (
    "models/pretrain/model.safetensors",
    "models/pretrain/model_config.json",
    "reports/pretrain.json",
    "reports/plots/pretrain_loss.json",
)
STEP_LINE = r"pretrain: step (\d+) val_loss"
RESUMED = r"resumed from \S*step_(\d{7}) at step (\d+)"


def repro(root: Path, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "dvc"), "repro", "--single-item", "pretrain"],
        cwd=root,
        env=dvc_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Tokenized data, a finished earlier pretrain (the last good run), DVC without git."""
    root = prepared_project(tmp_path_factory.mktemp("killres"), PARAMS, [validate, synthesize])
    tokenizer.run(cfg_for(root))
    pretrain.run(cfg_for(root, "pretrain.max_steps=3"))  # a good run of other params
    shutil.rmtree(cfg_for(root).path("checkpoints"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__py*"))
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=root, check=True)
    return root


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> dict[str, str]:
    """md5 of the outputs of an uninterrupted `dvc repro pretrain` of the same project."""
    root = shutil.copytree(base, tmp_path_factory.mktemp("straight") / "proj", symlinks=True)
    done = repro(root)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return md5_files(root, *FINAL)


@pytest.fixture
def project(base, tmp_path) -> Path:
    return shutil.copytree(base, tmp_path / "proj", symlinks=True)


def start(procs, root: Path):
    """`dvc repro pretrain` in its own session; (process, its output watcher)."""
    proc = procs.start(
        [str(BIN / "dvc"), "repro", "--single-item", "pretrain"],
        cwd=root,
        env=dvc_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, LineWatcher(proc.stdout)


def tree(proc) -> list[psutil.Process]:
    """The run's processes: DVC, the launcher, and the workers (in sessions of their own)."""
    return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]


def wait_all_dead(procs_: list[psutil.Process], proc, what: str) -> None:
    """Every process of the run is gone (workers die with their launcher), bounded."""
    proc.wait(timeout=60)

    def dead() -> bool:
        return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs_)

    wait_for(dead, 30, what)  # zombies count as dead: orphans wait for init to reap them


def check_resumed_and_identical(root: Path, before: dict, reference: dict, step: int) -> str:
    """Nothing lost after the kill; the re-run resumes from `step` and ends bit-identical."""
    assert md5_files(root, *BEFORE) == before  # the last good run's outputs are untouched
    done = repro(root)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    resumed = re.search(RESUMED, out)
    assert resumed, f"the re-run did not resume:\n{out[-3000:]}"
    assert int(resumed.group(2)) == step, resumed.group(0)
    assert md5_files(root, *FINAL) == reference  # weights, report and loss curve
    assert leftover_temporaries(root) == []
    return out


def test_sigkill_of_the_process_group_at_a_random_step_resumes_bit_identical(
    project, reference, procs
):
    rng = random.Random(SEED)
    kill_after = rng.randrange(6, MAX_STEPS // 4)  # past the first checkpoint, early in the run
    print(f"fault seed {SEED}: SIGKILL after step {kill_after}")
    before = md5_files(project, *BEFORE)
    proc, out = start(procs, project)
    out.wait_for_line(rf"pretrain: step {kill_after} val_loss", 240)
    members = tree(proc)
    assert any("pipeline.stages.pretrain" in " ".join(p.cmdline()) for p in members[2:])
    os.killpg(proc.pid, signal.SIGKILL)  # DVC, the launcher: the whole group, no warning
    wait_all_dead(members, proc, "the pretrain worker to die with its killed launcher")

    folder = cfg_for(project).path("checkpoints")
    last = ckpt.list_checkpoints(folder)[-1]
    step = ckpt.read_state(last).step
    # Killed mid-run: a checkpoint at or after the step seen, and the run did not finish
    # (how far past the step seen it got depends on the machine's speed and load).
    assert kill_after - 5 < step < MAX_STEPS and step % 5 == 0, (last, kill_after)
    check_resumed_and_identical(project, before, reference, step)


def writer_temporary(folder: Path) -> tuple[Path, int] | None:
    """A checkpoint being written: its temporary folder and the writer's pid (in the name)."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return None
    for e in entries:
        m = re.match(r"^\.step_\d{7}\.(\d+)\..*\.tmp$", e.name)
        if m:
            return Path(e.path), int(m.group(1))
    return None


def test_sigkill_while_a_checkpoint_is_written_never_loads_the_half_written_one(
    project, reference, procs
):
    """Kill at the moment a checkpoint's temporary folder exists; resume uses the one before.

    Checkpoints every step here (checkpoint_interval does not change the trajectory, so the
    uninterrupted reference still applies). The writer (a torchrun worker, in a session of
    its own) and DVC's group are both killed, as a job scheduler kills a job. The kill
    may land just after the rename: then it was not mid-write, and the run is resumed and
    killed again (bounded), so the fault is the real one when the test passes.
    """
    apply_to_params(project, None, ["pretrain.checkpoint_interval=1"])
    before = md5_files(project, *BEFORE)
    folder = cfg_for(project).path("checkpoints")
    for attempt in range(6):
        proc, out = start(procs, project)
        out.wait_for_line(STEP_LINE, 240)  # training is under way: all processes exist
        members = tree(proc)
        # A complete checkpoint first, so that there is a previous one to resume from.
        wait_for(lambda: ckpt.list_checkpoints(folder), 120, "a first complete checkpoint")
        tmp, writer = wait_for(
            lambda: writer_temporary(folder), 120, "a checkpoint's temporary folder", 0.0005
        )
        os.killpg(os.getpgid(writer), signal.SIGKILL)  # the writer, mid-write
        os.killpg(proc.pid, signal.SIGKILL)  # and DVC with the launcher
        wait_all_dead(members, proc, "every process of the killed run")
        if tmp.exists():
            break
        print(f"attempt {attempt}: the kill landed after {tmp.name} was complete; again")
    else:
        pytest.fail("no kill landed while a checkpoint was being written, in 6 attempts")
    half = tmp.name  # `.step_<N>.<pid>.<random>.tmp`, left by the killed writer
    complete = ckpt.list_checkpoints(folder)
    assert complete and all(p.name != half for p in complete)
    step = ckpt.read_state(complete[-1]).step
    written = int(half[len(".step_") : len(".step_") + 7])
    assert step == written - 1, (complete, half)  # resume must use the previous one
    out = check_resumed_and_identical(project, before, reference, step)
    assert not (folder / half).exists()
    assert re.search(rf"removed \S*{re.escape(half)}, left by a killed checkpoint writer", out)
