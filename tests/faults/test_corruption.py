"""Faults 8 and 9: real bytes flipped or cut off in a token shard and in a checkpoint.

Each case damages a file on disk the way bit rot, a torn copy or a hostile edit does, then
runs the real stage, `python -m pipeline.stages.pretrain`, and checks its exit code (1: the
stage rejected its input), its one message (the file, what is wrong, how to go on, no
traceback) and that nothing is lost: the last good run's outputs and the other
checkpoints keep their md5, no temporary is left, nothing is trained or unpickled.

Decided for a damaged checkpoint (row 9): resume refuses it and stops, naming it; it
never falls back to an older checkpoint on its own (which would silently drop progress
and hide failing storage). The message says how to go on: delete that checkpoint folder
to resume from the previous one, or set pretrain.resume=false.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_GPT, cfg_for, prepared_project
from fault_helpers import flip_bytes, leftover_temporaries, md5_files, truncate

from pipeline.core.io import file_md5
from pipeline.stages import pretrain, synthesize, tokenizer, validate
from pipeline.text.shards import HEADER_SIZE
from pipeline.train import checkpoint as ckpt

PARAMS = [
    *TINY_GPT,
    "pretrain.tokens_per_step=64",
    "pretrain.max_steps=8",
    "pretrain.warmup_steps=2",
    "pretrain.eval_batches=1",
    "pretrain.eval_interval=4",
    "pretrain.checkpoint_interval=4",
    "pretrain.keep_checkpoints=2",
]
KEPT = ("data/tokenizer", "models/pretrain", "reports/pretrain.json", "reports/plots")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Tokenized data and a finished pretrain with checkpoints step 4 and step 8."""
    root = prepared_project(
        tmp_path_factory.mktemp("corrupt"), PARAMS, [validate, synthesize, tokenizer]
    )
    pretrain.run(cfg_for(root))
    return root


@pytest.fixture
def project(base, tmp_path) -> Path:
    return shutil.copytree(base, tmp_path / "proj")


def run_pretrain(root: Path, *sets: str) -> subprocess.CompletedProcess:
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run(
        [sys.executable, "-m", "pipeline.stages.pretrain", *args],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_refused(done: subprocess.CompletedProcess, *patterns: str) -> str:
    """Exit 1, the stage's one error message matching every pattern, no traceback."""
    err = done.stderr
    assert done.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    message = err.split("error: stage pretrain failed:\n", 1)[-1].strip()
    assert len(message.splitlines()) == 1, message
    for p in patterns:
        assert re.search(p, message), (p, message)
    assert "val_loss" not in err  # refused before any step: nothing was trained
    return message


# --- row 8: a token shard changed after the tokenizer stage ---------------------------


def test_a_flipped_byte_in_the_train_shard_is_refused_before_training(project):
    shard = project / "data/tokenizer/train.bin"
    meta = json.loads((project / "data/tokenizer/meta.json").read_text())
    assert file_md5(shard) == meta["splits"]["train"]["md5"]
    flip_bytes(shard, HEADER_SIZE + 101, mask=0x01)  # one bit of one token: size and header OK
    damaged = md5_files(project, *KEPT)
    ckpts = md5_files(project, "models/checkpoints")
    done = run_pretrain(project, "pretrain.max_steps=12")  # a new trajectory: trains, if let
    message = assert_refused(
        done,
        r"data/tokenizer/train\.bin: content md5 [0-9a-f]{32} does not match meta\.json",
        re.escape(meta["splits"]["train"]["md5"]),
        r"dvc repro --force tokenizer",
    )
    assert str(shard) in message
    assert md5_files(project, *KEPT) == damaged  # nothing else was touched
    assert md5_files(project, "models/checkpoints") == ckpts
    assert leftover_temporaries(project) == []


# --- row 9: a damaged checkpoint --------------------------------------------------------


def first_history_digit(path: Path) -> int:
    """The offset of the first digit of a loss in state.json (a flip keeps it valid JSON)."""
    text = path.read_bytes()
    return re.search(rb'"loss": -?\d', text).end() - 1


def weights_data_offset(path: Path) -> int:
    """Where a safetensors file's tensor bytes start (after its 8-byte length and header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def bit_flip_state(c: Path) -> str:
    flip_bytes(c / "state.json", first_history_digit(c / "state.json"), mask=0x01)
    json.loads((c / "state.json").read_text())  # still valid JSON: only the checksum knows
    return r"state\.json: unreadable training state \(md5 [0-9a-f]{32} of its \d+ bytes"


def truncate_state(c: Path) -> str:
    truncate(c / "state.json", (c / "state.json").stat().st_size // 2)
    return r"state\.json: unreadable training state"


def bit_flip_weights(c: Path) -> str:
    w = c / "model.safetensors"
    flip_bytes(w, weights_data_offset(w) + 10, mask=0x01)  # a weight, not the header
    return r"model\.safetensors: not a readable safetensors file \(md5"


def truncate_weights(c: Path) -> str:
    truncate(c / "model.safetensors", 100)
    return r"model\.safetensors: not a readable safetensors file"


DAMAGE = {
    "state.json one bit flipped": bit_flip_state,
    "state.json truncated": truncate_state,
    "weights one bit flipped": bit_flip_weights,
    "weights truncated": truncate_weights,
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_refused_naming_it(project, case):
    folder = cfg_for(project).path("checkpoints")
    older, newest = ckpt.list_checkpoints(folder)
    pattern = DAMAGE[case](newest)
    kept = md5_files(project, *KEPT)
    damaged = md5_files(project, "models/checkpoints")
    done = run_pretrain(project)  # same config: would resume from the newest checkpoint
    message = assert_refused(
        done,
        pattern,
        rf"checkpoint \S*{newest.name} is refused",
        r"Delete that folder to resume from the previous checkpoint",
        r"pretrain\.resume=false",
    )
    assert str(newest) in message
    assert md5_files(project, *KEPT) == kept  # the last good run's outputs
    assert md5_files(project, "models/checkpoints") == damaged  # nothing pruned or rewritten
    assert leftover_temporaries(project) == []
    # The way out the message gives works: without the bad one, resume takes the older one.
    shutil.rmtree(newest)
    state = ckpt.read_state(older)
    resumed = pretrain.run(cfg_for(project))
    assert resumed["steps"] == 8 and state.step == 4
    assert ckpt.read_state(ckpt.list_checkpoints(folder)[-1]).step == 8


class Evil:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("model.safetensors", r"model\.safetensors: not a readable safetensors file"),
        ("optimizer.pt", r"optimizer\.pt: unreadable optimizer state .*weights_only"),
    ],
)
def test_a_pickle_planted_in_a_checkpoint_is_never_unpickled(project, tmp_path, name, pattern):
    """A hostile file with matching checksums (whoever can write it can rewrite those)."""
    newest = ckpt.list_checkpoints(cfg_for(project).path("checkpoints"))[-1]
    marker = tmp_path / "pwned"
    torch.save({"state": Evil(marker)}, newest / name)
    sums = json.loads((newest / "checksums.json").read_text())
    sums[name] = file_md5(newest / name)
    (newest / "checksums.json").write_text(json.dumps(sums))
    assert_refused(run_pretrain(project), pattern, rf"{newest.name} is refused")
    assert not marker.exists()
