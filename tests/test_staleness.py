"""Staleness of pretraining: a checkpoint resumes only the trajectory that made it.

`models/checkpoints/` survives between runs and `pretrain.resume` is on by default, so a
run on other data (other shards, other tokenizer) or another config must train from step
0 instead of "resuming" a finished run of the old one. Stage-level tests run the stages
in-process on a tiny project; the last test goes through a real DVC project.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, SMALL_DATA, cfg_for, make_project, prepared_project
from dvc_helpers import dvc as run_dvc

from pipeline.config.params_file import apply_to_params
from pipeline.core.io import file_md5
from pipeline.stages import pretrain, synthesize, tokenizer, validate
from pipeline.train import checkpoint as ckpt
from pipeline.train import precision, resume

TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "model.dropout=0.1",
    "pretrain.micro_batch_size=4",
    "pretrain.tokens_per_step=256",
    "pretrain.max_steps=8",
    "pretrain.warmup_steps=2",
    "pretrain.log_interval=2",
    "pretrain.eval_interval=4",
    "pretrain.eval_batches=2",
    "pretrain.checkpoint_interval=4",
    "pretrain.keep_checkpoints=2",
]
FAKE_DATA = {"train_shard_md5": "a" * 32, "val_shard_md5": "b" * 32, "tokenizer_md5": "c" * 32}


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    """A project with validated, synthesized and tokenized story-world data."""
    return prepared_project(
        tmp_path_factory.mktemp("stale"),
        ["synthesize.finetune_docs=20"],
        [validate, synthesize, tokenizer],
    )


def out_cfg(root: Path, name: str, *extra: str):
    """TINY config with the model, checkpoints and reports in folders named `name`."""
    paths = [f"paths.{k}=out/{name}/{k}" for k in ("pretrain", "checkpoints", "reports")]
    return cfg_for(root, *TINY, *paths, *extra)


def losses(cfg) -> list[float]:
    curve = json.loads((cfg.path("reports") / "plots" / "pretrain_loss.json").read_text())
    return [r["loss"] for r in curve]


def weights_md5(cfg) -> str:
    return file_md5(cfg.path("pretrain") / "model.safetensors")


def test_digest_covers_what_shapes_the_trajectory_and_nothing_else(project):
    def digest(*overrides: str, data=FAKE_DATA, world: int = 1, device: str = "cpu") -> str:
        cfg = cfg_for(project, *overrides)
        return resume.training_digest(resume.digest_inputs(cfg, data, world, device))

    base = digest()
    same = [
        "pretrain.resume=false",
        "pretrain.log_interval=7",
        "pretrain.eval_interval=7",
        "pretrain.eval_batches=3",
        "pretrain.checkpoint_interval=7",
        "pretrain.keep_checkpoints=5",
        "pretrain.device=cpu",  # the device actually used is hashed, not the request
        "tokenizer.encode_batch_docs=7",  # the tokenizer's effect is in its md5
    ]
    for override in same:
        assert digest(override) == base, override
    changed = [
        "seed=7",
        "model.dropout=0.2",
        "model.n_embd=32",
        "pretrain.lr=0.001",
        "pretrain.max_steps=61",  # the cosine schedule ends at max_steps
        "pretrain.micro_batch_size=8",
        "pretrain.strategy=fsdp",
        "pretrain.dtype=bfloat16",  # the ci preset's is float32
        "pretrain.compile=on",
    ]
    for override in changed:
        assert digest(override) != base, override
    for key in FAKE_DATA:
        assert digest(data={**FAKE_DATA, key: "d" * 32}) != base, key
    assert digest(world=2) != base and digest(device="cuda") != base


def test_digest_hashes_what_auto_resolves_to_on_the_machine(project, monkeypatch):
    """The same params.yaml (`dtype: auto`, `compile: auto`) trains in bf16, compiled, on a
    native-bf16 CPU and in fp32, eager, on another: their checkpoints never cross."""
    cfg = cfg_for(project, "pretrain.dtype=auto", "pretrain.compile=auto")

    def inputs(native: bool, cxx: str | None = None) -> dict:
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
        if cxx is not None:
            monkeypatch.setenv("CXX", cxx)
        return resume.digest_inputs(cfg, FAKE_DATA, 1, "cpu")

    fp32 = inputs(native=False)
    assert (fp32["compute_dtype"], fp32["compiled"]) == ("float32", False)
    eager_bf16 = inputs(native=True, cxx="/no/such/compiler")
    assert (eager_bf16["compute_dtype"], eager_bf16["compiled"]) == ("bfloat16", False)
    digests = {resume.training_digest(fp32), resume.training_digest(eager_bf16)}
    gxx = shutil.which("g++")
    if gxx is not None:  # with inductor's compiler the same params compile too
        compiled = inputs(native=True, cxx=gxx)
        assert (compiled["compute_dtype"], compiled["compiled"]) == ("bfloat16", True)
        digests.add(resume.training_digest(compiled))
    assert len(digests) == (3 if gxx else 2)


def test_new_shards_train_from_step_0(tokenized, tmp_path, caplog):
    """Run, re-run the tokenizer on other data, run again: step 0, not a 0-step resume."""
    root = shutil.copytree(tokenized, tmp_path / "proj")
    cfg = out_cfg(root, "run")
    pretrain.run(cfg)
    first_losses, first_weights = losses(cfg), weights_md5(cfg)
    old_digest = ckpt.read_state(ckpt.list_checkpoints(cfg.path("checkpoints"))[-1]).config_digest

    # Other data: the training mix without its last third of documents.
    train = cfg.path("synthetic") / "pretrain_train.parquet"
    table = pq.read_table(train)
    pq.write_table(table.slice(0, 2 * table.num_rows // 3), train)
    tokenizer.run(cfg)

    caplog.set_level(logging.INFO)
    pretrain.run(cfg)
    assert "resumed from" not in caplog.text
    skipped = re.findall(
        r"not resuming from \S+step_(\d+): it was made under training digest (\w+), "
        r"this run's is (\w+) \(differs in ([^)]*)",
        caplog.text,
    )
    assert [s[0] for s in skipped] == ["0000008", "0000004"]  # both, newest first
    _, made_under, this_run, differences = skipped[0]
    assert made_under == old_digest != this_run
    assert "data.train_shard_md5" in differences
    new_losses = losses(cfg)
    assert len(new_losses) == 8 and new_losses[0] != first_losses[0]
    assert weights_md5(cfg) != first_weights
    # Only this trajectory's checkpoints are left.
    left = ckpt.list_checkpoints(cfg.path("checkpoints"))
    assert {ckpt.read_state(p).config_digest for p in left} == {this_run}

    # And it is exactly a run from scratch on the new data, in an empty checkpoint folder.
    fresh = out_cfg(root, "fresh")
    pretrain.run(fresh)
    assert losses(fresh) == new_losses and weights_md5(fresh) == weights_md5(cfg)


def test_eval_only_changes_resume_and_redo_the_final_evaluation(tokenized, caplog):
    """eval_batches does not shape the trajectory: resume at the end, evaluate again."""
    cfg = out_cfg(tokenized, "evals")
    pretrain.run(cfg)
    trained = losses(cfg)
    more = out_cfg(tokenized, "evals", "pretrain.eval_batches=3", "pretrain.log_interval=4")
    caplog.set_level(logging.INFO)
    report = pretrain.run(more)
    assert re.search(r"resumed from \S+step_0000008 at step 8", caplog.text)
    assert losses(more) == trained  # nothing was trained again

    fresh = out_cfg(tokenized, "evals-fresh", "pretrain.eval_batches=3")
    want = pretrain.run(fresh)
    assert weights_md5(more) == weights_md5(fresh)
    assert (report["val_loss"], report["val_bpb"]) == (want["val_loss"], want["val_bpb"])


# --------------------------------------------------------------------------------------
# Through DVC: `lmforge run --set synthesize.synthetic_share=0.3` after a finished run
# --------------------------------------------------------------------------------------
SKIP = {".venv", ".git", "data", "models", "reports", "mlflow.db", "mlruns", "dvc.lock"}
CACHES = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*_cache", ".hypothesis", "tmp")


def _ignore(folder: str, names: list[str]) -> set[str]:
    """Skip outputs and environments at the top level only (pipeline/data is source code)."""
    return set(CACHES(folder, names)) | (SKIP & set(names) if Path(folder) == REPO else set())


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return run_dvc(root, *args, OMP_NUM_THREADS="1")  # one thread: steady on 2 cores


@pytest.mark.slow
def test_dvc_repro_after_a_data_change_trains_from_step_0(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(REPO, root, ignore=_ignore)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    make_project(root, overrides=[*SMALL_DATA, "synthesize.finetune_docs=20", *TINY])
    model = root / "models" / "pretrain" / "model.safetensors"
    curve = root / "reports" / "plots" / "pretrain_loss.json"

    first = dvc(root, "repro", "pretrain")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    first_weights, first_curve = file_md5(model), json.loads(curve.read_text())

    apply_to_params(root, None, ["synthesize.synthetic_share=0.3"])
    second = dvc(root, "repro", "pretrain")
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-6000:]
    assert "Running stage 'pretrain'" in log
    assert "not resuming from" in log and "resumed from" not in log
    second_curve = json.loads(curve.read_text())
    assert [r["step"] for r in second_curve] == list(range(8))
    assert second_curve[0]["loss"] != first_curve[0]["loss"]
    assert file_md5(model) != first_weights

    # The same weights as training from scratch with no checkpoints at all.
    second_weights = file_md5(model)
    shutil.rmtree(root / "models" / "checkpoints")
    third = dvc(root, "repro", "--force", "--single-item", "pretrain")
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert file_md5(model) == second_weights
