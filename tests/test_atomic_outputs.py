"""Outputs before reports, and what a killed writer leaves behind is cleared at the next start.

The kills are real: a stage (or an `atomic_dir` writer) runs in a subprocess whose audit hook
sends it SIGKILL at the exact moment it is about to rename its finished temporary folder into
place (`os.replace` raises the audit event `os.rename` before doing anything). That is the
window the report ordering is about: whatever the process wrote before that moment is what a
kill leaves on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import cfg_for, prepared_project

from pipeline.core.io import atomic_dir, remove_stale_temporaries, tree_md5
from pipeline.stages import pretrain, synthesize, tokenizer, validate

# Kill this process when it is about to rename something onto TARGET (argv[1]).
KILL_AT_SWAP = """
import os, signal, sys
target = os.path.abspath(sys.argv[1])

def kill_at_swap(event, args):
    if event == "os.rename" and os.path.abspath(os.fsdecode(args[1])) == target:
        os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(kill_at_swap)
"""


def run_killed_at_swap(target: Path, body: str, cwd: Path) -> subprocess.CompletedProcess:
    code = KILL_AT_SWAP + textwrap.dedent(body)
    result = subprocess.run(
        [sys.executable, "-c", code, str(target)], cwd=cwd, capture_output=True, text=True
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    return result


def temporaries(target: Path) -> list[Path]:
    return sorted(p for p in target.parent.glob(f".{target.name}.*") if p.name.endswith(".tmp"))


WRITE_FOLDER = """
from pathlib import Path
from pipeline.core.io import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "weights.bin").write_bytes(b"new" * 1000)
"""


def test_killed_writers_temporary_is_removed_at_the_next_start(tmp_path):
    target = tmp_path / "out"
    run_killed_at_swap(target, WRITE_FOLDER, tmp_path)
    (stale,) = temporaries(target)
    assert (stale / "weights.bin").is_file() and not target.exists()
    # A temporary whose owner is alive (a real running process) belongs to a live writer.
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        live = tmp_path / f".out.{sleeper.pid}.abcdefgh.tmp"
        live.mkdir()
        with atomic_dir(target) as tmp:
            (tmp / "weights.bin").write_bytes(b"good")
        assert not stale.exists()
        assert live.is_dir()
        assert temporaries(target) == [live]
        assert (target / "weights.bin").read_bytes() == b"good"
    finally:
        sleeper.kill()
        sleeper.wait()
    # Once its owner has exited, the next start removes it too.
    remove_stale_temporaries(target)
    assert temporaries(target) == []


def test_kill_between_the_two_renames_puts_the_last_good_output_back(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"good")
    # Killed after `out` was moved aside to `.out.old`, before the new folder took its place.
    run_killed_at_swap(target, WRITE_FOLDER, tmp_path)
    assert not target.exists() and (tmp_path / ".out.old" / "weights.bin").is_file()
    # The next writer fails in its body; the last good output must still be there.
    with pytest.raises(RuntimeError, match="bad input"), atomic_dir(target):
        raise RuntimeError("bad input")
    assert (target / "weights.bin").read_bytes() == b"good"
    assert not (tmp_path / ".out.old").exists() and temporaries(target) == []


SMALL = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=64",
    "pretrain.micro_batch_size=4",
    "pretrain.tokens_per_step=256",
    "pretrain.max_steps=2",
    "pretrain.eval_interval=2",
    "pretrain.eval_batches=1",
    "synthesize.finetune_docs=60",
    "finetune.max_steps=2",
    "finetune.micro_batch_size=4",
    "finetune.warmup_steps=1",
    "finetune.eval_examples=8",
    "finetune.sharpness_steps=1",
    "finetune.hessian_iters=2",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    return prepared_project(
        tmp_path_factory.mktemp("atomic"), SMALL, [validate, synthesize, tokenizer, pretrain]
    )


STAGE_MAIN = """
import importlib
stage = importlib.import_module("pipeline.stages." + sys.argv[2])
raise SystemExit(stage.main([]))
"""


@pytest.mark.parametrize(
    ("stage", "output"),
    [("validate", "validated"), ("synthesize", "synthetic"), ("finetune", "finetune")],
)
def test_a_stage_killed_as_its_outputs_swap_in_leaves_no_report_of_that_run(
    pretrained, tmp_path, stage, output
):
    root = shutil.copytree(pretrained, tmp_path / "proj")
    cfg = cfg_for(root)
    out, report = cfg.path(output), cfg.path("reports") / f"{stage}.json"
    previous = tree_md5(out) if out.exists() else None
    report.unlink(missing_ok=True)
    code = KILL_AT_SWAP + STAGE_MAIN
    result = subprocess.run(
        [sys.executable, "-c", code, str(out), stage],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert not report.exists(), f"{report} was written before {out} was in place"
    # The next start clears the killed run's leftovers and puts the last good output back.
    assert temporaries(out)
    remove_stale_temporaries(out)
    assert temporaries(out) == []
    assert (tree_md5(out) if out.exists() else None) == previous
    # And a complete run writes a report that matches the outputs now in place.
    summary = {"validate": validate, "synthesize": synthesize}.get(stage)
    if summary is not None:
        summary.run(cfg)
        written = json.loads(report.read_text())
        if stage == "validate":
            import pyarrow.parquet as pq

            rows = pq.read_metadata(out / "train.parquet").num_rows
            assert written["splits"]["train"]["docs"] == rows
        else:
            assert (out / "finetune_train.jsonl").read_text().count("\n") == written["finetune"][
                "train_examples"
            ]
