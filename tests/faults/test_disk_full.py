"""Fault 7: the disk fills while a stage writes its outputs.

A real filesystem fills up: the project lives on a tmpfs mounted for the test, holding
the last good run's outputs, and is shrunk to leave less room than the stage's next
outputs need (`remount`). Then the real stage runs, `python -m pipeline.stages.<name>`:
validate (the cleaned parquet), tokenizer (the token shards), pretrain (a checkpoint).
Where mounting is not allowed (not root), the same runs are made under RLIMIT_FSIZE, a
real per-file size limit enforced by the kernel, instead.

Each must exit 1 with one line naming the output and "no space left on device" (or
"file too large"), keep the previous outputs byte for byte, and leave no temporary.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_GPT, cfg_for, prepared_project
from fault_helpers import (
    can_mount,
    file_size_limit,
    leftover_temporaries,
    md5_files,
    remount,
    small_disk,
    used_bytes,
)

from pipeline.stages import pretrain, synthesize, tokenizer, validate

PARAMS = [
    *TINY_GPT,
    "pretrain.tokens_per_step=64",
    "pretrain.max_steps=4",
    "pretrain.warmup_steps=2",
    "pretrain.eval_batches=1",
    "pretrain.eval_interval=4",
    "pretrain.checkpoint_interval=4",
]
OUTPUTS = ("data", "models", "reports")  # everything the last good run left
PAGE = 4096


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A project after validate, synthesize, tokenizer and a 4-step pretrain (checkpointed)."""
    root = prepared_project(
        tmp_path_factory.mktemp("diskfull"), PARAMS, [validate, synthesize, tokenizer]
    )
    pretrain.run(cfg_for(root))
    return root


def pages(n_bytes: int) -> int:
    return -(-n_bytes // PAGE) * PAGE


# Per stage: extra --set overrides (pretrain: a new trajectory, so it trains and checkpoints),
# the room left beside the old outputs (tmpfs), the file-size limit (fallback), and the
# output the message must name. The room is less than the output that must fail needs;
# files written before it (the tokenizer's tokenizer.json) are given room.
def plan(root: Path, stage: str) -> tuple[list[str], int, int, str]:
    tok = root / "data/tokenizer"
    if stage == "validate":
        return [], PAGE, PAGE, r"data/validated/(train|val|test)\.parquet"
    if stage == "tokenizer":
        before_shards = pages((tok / "tokenizer.json").stat().st_size)
        assert (tok / "train.bin").stat().st_size > before_shards + 2 * PAGE
        limit = (tok / "tokenizer.json").stat().st_size + 64
        return [], before_shards + PAGE, limit, r"data/tokenizer/train\.bin"
    weights = root / "models/pretrain/model.safetensors"
    assert weights.stat().st_size > 4 * PAGE
    return ["pretrain.max_steps=8"], PAGE, 2 * PAGE, r"models/checkpoints/step_0000004"


def mount_problem() -> str | None:
    """Why no tmpfs can be mounted here (None: it can). LMFORGE_FAULT_DISK=rlimit forces
    the fallback, to check it where mounting is allowed."""
    if os.environ.get("LMFORGE_FAULT_DISK") == "rlimit":
        return "LMFORGE_FAULT_DISK=rlimit"
    return can_mount()


def run_stage(root: Path, stage: str, sets: list[str], preexec=None):
    args = [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", f"pipeline.stages.{stage}", *args],
        cwd=root,
        env={**env, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec,
    )


def check(done: subprocess.CompletedProcess, root: Path, stage: str, names: str, cause: str):
    err = done.stderr
    assert done.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    message = err.split(f"error: stage {stage} failed:\n", 1)[-1].strip()
    assert len(message.splitlines()) == 1, message
    assert re.search(rf"{re.escape(str(root))}/{names}\S*: cannot write: {cause}", message), message
    assert "the previous output is unchanged" in message


@pytest.mark.parametrize("stage", ["validate", "tokenizer", "pretrain"])
def test_a_full_disk_keeps_the_previous_outputs_and_names_the_path(base, tmp_path, stage):
    problem = mount_problem()
    if problem is None:
        with small_disk(tmp_path / "disk", "64m") as disk:
            root = shutil.copytree(base, disk / "proj")
            sets, room, _, names = plan(root, stage)
            before = md5_files(root, *OUTPUTS)
            remount(disk, used_bytes(disk) + room)  # the old outputs, and barely more
            done = run_stage(root, stage, sets)
            check(done, root, stage, names, "no space left on device")
            assert md5_files(root, *OUTPUTS) == before
            assert leftover_temporaries(root) == []
    else:
        print(f"tmpfs not mountable ({problem}): RLIMIT_FSIZE instead")
        root = shutil.copytree(base, tmp_path / "proj")
        sets, _, limit, names = plan(root, stage)
        before = md5_files(root, *OUTPUTS)
        done = run_stage(root, stage, sets, preexec=file_size_limit(limit))
        check(done, root, stage, names, r"file too large")
        assert md5_files(root, *OUTPUTS) == before
        assert leftover_temporaries(root) == []
