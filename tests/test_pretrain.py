"""Stage pretrain: schedule, outputs, bit-identical resume, SIGTERM, NaN, bad checkpoints,
and DDP/FSDP2 with 2 processes matching 1 process on the same global batch."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, cfg_for, prepared_project

from pipeline.core.io import tree_md5
from pipeline.core.seeding import derive_seed
from pipeline.model.gpt import GPT
from pipeline.model.load import CheckpointError, load_weights, read_model_files
from pipeline.stages import pretrain, synthesize, tokenizer, validate
from pipeline.text.shards import load_split, read_meta
from pipeline.text.tokenizer import load_tokenizer
from pipeline.train import checkpoint as ckpt
from pipeline.train import loop
from pipeline.train.batches import eval_batches
from pipeline.train.outputs import report_path as loop_report
from pipeline.train.precision import cpp_compiler

TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "pretrain.micro_batch_size=4",
    "pretrain.tokens_per_step=256",  # 2 micro-steps in one process
    "pretrain.max_steps=12",
    "pretrain.warmup_steps=3",
    "pretrain.log_interval=2",
    "pretrain.eval_interval=4",
    "pretrain.eval_batches=2",
    "pretrain.checkpoint_interval=4",
    "pretrain.keep_checkpoints=2",
    "model.dropout=0.1",  # exercises the RNG state in resume
]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    """A project with validated, synthesized and tokenized story-world data."""
    return prepared_project(
        tmp_path_factory.mktemp("pre"),
        ["synthesize.finetune_docs=20"],
        [validate, synthesize, tokenizer],
    )


def run_cfg(root: Path, name: str, *extra: str):
    """Config with outputs in folders of their own, so tests do not share checkpoints."""
    paths = [f"paths.pretrain=out/{name}/model", f"paths.checkpoints=out/{name}/ckpt"]
    return cfg_for(root, *TINY, *paths, f"paths.reports=out/{name}/reports", *extra)


def losses(cfg) -> list[float]:
    return [
        r["loss"]
        for r in json.loads((cfg.path("reports") / "plots" / "pretrain_loss.json").read_text())
    ]


def test_lr_schedule_warms_up_then_decays(tokenized):
    cfg = run_cfg(tokenized, "lr", "pretrain.max_steps=100", "pretrain.warmup_steps=10")
    p = cfg.pretrain
    assert loop.lr_at(0, cfg) == pytest.approx(p.lr / 10)
    assert loop.lr_at(9, cfg) == pytest.approx(p.lr)
    assert loop.lr_at(55, cfg) == pytest.approx((p.lr + p.min_lr) / 2)
    assert loop.lr_at(100, cfg) == pytest.approx(p.min_lr)


def test_tokens_per_step_must_divide(tokenized):
    cfg = run_cfg(tokenized, "acc", "pretrain.tokens_per_step=300")
    with pytest.raises(ValueError, match=r"pretrain\.tokens_per_step: 300 is not a multiple of"):
        loop.grad_accum_steps(cfg, 1)


def test_training_writes_model_report_and_curve(tokenized):
    cfg = run_cfg(tokenized, "full")
    report = pretrain.run(cfg)
    assert report["steps"] == 12 and math.isfinite(report["val_bpb"])
    curve = losses(cfg)
    assert len(curve) == 12 and curve[-1] < curve[0]
    weights = load_weights(cfg.path("pretrain") / "model.safetensors")
    model_cfg = json.loads((cfg.path("pretrain") / "model_config.json").read_text())
    assert model_cfg["vocab_size"] % 64 == 0
    from pipeline.model.gpt import GPTConfig

    model = GPT(GPTConfig(**model_cfg))
    model.load_state_dict(weights)
    assert model.lm_head.weight is model.wte.weight
    assert [p.name for p in ckpt.list_checkpoints(cfg.path("checkpoints"))] == [
        "step_0000008",
        "step_0000012",
    ]


def test_val_bits_per_byte_use_the_exact_bytes_of_the_scored_tokens(tokenized):
    """val_bpb = summed nll / ln 2 / bytes of the val batches' targets, recomputed here."""
    cfg = run_cfg(tokenized, "bpb", "pretrain.max_steps=4")
    report = pretrain.run(cfg)
    tok_dir = cfg.path("tokenizer")
    eot, tok = read_meta(tok_dir)["eot_id"], load_tokenizer(tok_dir / "tokenizer.json")
    gcfg, weights = read_model_files(cfg.path("pretrain"))
    model = GPT(gcfg)
    model.load_state_dict(weights)
    model.eval()
    p = cfg.pretrain
    seed = derive_seed(cfg.seed, "pretrain", "val")
    batches = eval_batches(
        load_split(tok_dir, "val"), seed, p.eval_batches, p.micro_batch_size, gcfg.block_size, 0, 1
    )
    nats, n_tokens, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            logp = torch.log_softmax(model(x)[0].double(), -1)  # (B, T, V)
            nats -= logp.gather(2, y[..., None]).sum().item()
            n_tokens += y.numel()
            for i in y.reshape(-1).tolist():
                if i != eot:  # the separator stands for no text
                    piece = tok.decode([i])
                    assert "\ufffd" not in piece  # story-world text is ASCII: exact bytes
                    n_bytes += len(piece.encode("utf-8"))
    assert report["val_loss"] == pytest.approx(nats / n_tokens, rel=1e-6)
    assert report["val_bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)


# fp32 eager, and bf16 autocast under torch.compile (`auto` on a native-bf16 CPU).
PRECISIONS = {
    "fp32": ["pretrain.dtype=float32", "pretrain.compile=off"],
    "bf16-compiled": ["pretrain.dtype=bfloat16", "pretrain.compile=on"],
}
# Inductor builds CPU kernels with $CXX or g++ (pipeline.train.precision.cpp_compiler).
needs_cxx = pytest.mark.skipif(cpp_compiler() is None, reason="no C++ compiler for inductor")


@pytest.mark.parametrize(
    "precision",
    [pytest.param(name, marks=[needs_cxx] if "compiled" in name else []) for name in PRECISIONS],
)
def test_resume_after_a_crash_is_bit_identical(tokenized, monkeypatch, precision):
    straight = run_cfg(tokenized, f"straight-{precision}", *PRECISIONS[precision])
    pretrain.run(straight)

    crashed = run_cfg(tokenized, f"crashed-{precision}", *PRECISIONS[precision])
    real_step = loop.Trainer.train_step

    def crash_at_7(self, micro, step):
        if step == 7:
            raise KeyboardInterrupt  # like kill -9: no checkpoint is written at the crash
        return real_step(self, micro, step)

    monkeypatch.setattr(loop.Trainer, "train_step", crash_at_7)
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(crashed)
    assert ckpt.list_checkpoints(crashed.path("checkpoints"))[-1].name == "step_0000004"
    monkeypatch.setattr(loop.Trainer, "train_step", real_step)
    pretrain.run(crashed)  # resumes at step 4

    assert losses(crashed) == losses(straight)  # exact float equality
    assert tree_md5(crashed.path("pretrain") / "model.safetensors") == tree_md5(
        straight.path("pretrain") / "model.safetensors"
    )


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tokenized, monkeypatch):
    cfg = run_cfg(tokenized, "nan")
    real_forward = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 2 * 5:  # 2 micro-batches a step: steps 0-4 are fine
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(loop.TrainingDiverged, match="loss is nan at step 5"):
        pretrain.run(cfg)
    (good,) = ckpt.list_checkpoints(cfg.path("checkpoints"))
    assert good.name == "step_0000004"
    assert ckpt.read_state(good).step == 4
    assert not cfg.path("pretrain").exists()


def test_corrupted_checkpoint_gives_a_clear_error(tokenized):
    cfg = run_cfg(tokenized, "corrupt", "pretrain.max_steps=8")
    pretrain.run(cfg)
    latest = ckpt.list_checkpoints(cfg.path("checkpoints"))[-1]
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    longer = run_cfg(tokenized, "corrupt", "pretrain.max_steps=8")
    with pytest.raises(CheckpointError, match=r"step_0000008/model\.safetensors: not a readable"):
        pretrain.run(longer)


def test_optimizer_state_is_never_unpickled(tokenized, tmp_path):
    cfg = run_cfg(tokenized, "pickle", "pretrain.max_steps=4")
    pretrain.run(cfg)
    latest = ckpt.list_checkpoints(cfg.path("checkpoints"))[-1]

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"state": Evil()}, latest / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: unreadable optimizer state"):
        pretrain.run(cfg)
    assert not (tmp_path / "pwned").exists()


def test_older_checkpoints_with_a_scheduler_entry_still_resume(tokenized):
    """state.json no longer holds the write-only `scheduler` (the LR is `lr_at(step)`); a
    checkpoint of an older version, which has it, resumes all the same, and a state.json
    that lacks a field is still refused naming the file and the field."""
    from pipeline.train import distributed

    cfg = run_cfg(tokenized, "oldstate", "pretrain.max_steps=8")
    info = distributed.init("cpu")
    saved = loop.build(cfg, info).checkpoint(4)
    state_path = saved / "state.json"
    state = json.loads(state_path.read_text())
    assert "scheduler" not in state
    state["scheduler"] = {"kind": "warmup_cosine", "last_step": 3}  # as older versions wrote
    state["history"] = [{"step": 3, "loss": 5.0}]
    state_path.write_text(json.dumps(state))
    (saved / "checksums.json").unlink()  # older versions wrote no checksums either

    resumed = loop.build(cfg, info)
    assert resumed.start_step == 4 and resumed.history == state["history"]

    del state["rng"]
    state_path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"step_0000004/state\.json: unreadable .*'rng'"):
        ckpt.read_state(saved)


def stage_cmd(root: Path, *sets: str, nproc: int = 0) -> list[str]:
    args = [a for s in sets for a in ("--set", s)]
    if nproc:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "pipeline.stages.pretrain",
            *args,
        ]
    return [sys.executable, "-m", "pipeline.stages.pretrain", *args]


def stage_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tokenized):
    sets = [
        *TINY,
        "pretrain.max_steps=100000",
        "pretrain.checkpoint_interval=100000",
        "paths.checkpoints=out/term/ckpt",
        "paths.pretrain=out/term/model",
    ]
    proc = subprocess.Popen(
        stage_cmd(tokenized, *sets),
        cwd=tokenized,
        env=stage_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    # Wait for the first evaluation's log line (step 4): training is under way, so the
    # SIGTERM handler is installed, however slow the machine is (no fixed sleep).
    head = []
    for line in proc.stderr:
        head.append(line)
        if "val_loss" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, tail = proc.communicate(timeout=300)
    err = "".join(head) + tail
    assert proc.returncode == 143, err
    assert "SIGTERM at step" in err and "Traceback" not in err
    step = int(err.split("SIGTERM at step ")[1].split(";")[0])
    cfg = cfg_for(tokenized, *sets)
    (saved,) = ckpt.list_checkpoints(cfg.path("checkpoints"))
    assert saved.name == f"step_{step:07d}"
    from pipeline.train import distributed

    trainer = loop.build(cfg, distributed.init("cpu"))
    assert trainer.start_step == step  # a re-run resumes there


SHORT = ["pretrain.max_steps=3", "pretrain.eval_interval=100", "pretrain.checkpoint_interval=100"]


def test_ddp_with_one_process_under_torchrun_matches_single(tokenized, procs):
    """`torchrun --nproc_per_node=1` with strategy=ddp (it crashed: no process group)."""
    single = run_cfg(tokenized, "one_single", *SHORT)
    pretrain.run(single)
    sets = [
        *TINY,
        *SHORT,
        "pretrain.strategy=ddp",
        "paths.reports=out/one_ddp/reports",
        "paths.pretrain=out/one_ddp/m",
        "paths.checkpoints=out/one_ddp/c",
    ]
    launcher = [sys.executable, "-m", "pipeline.ops.launch", "--standalone", "--nproc_per_node=1"]
    args = [a for s in sets for a in ("--set", s)]
    proc = procs.start(
        [*launcher, "-m", "pipeline.stages.pretrain", *args],
        cwd=tokenized,
        env=stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    ddp = cfg_for(tokenized, *sets)
    report = json.loads(loop_report(ddp).read_text())
    assert report["world_size"] == 1 and report["steps"] == 3
    assert losses(ddp) == losses(single)  # one replica: DDP changes no bit


def test_fsdp_with_one_process_without_torchrun(tokenized):
    """strategy=fsdp in a plain process: a one-member group on an in-memory store."""
    import torch.distributed as dist

    cfg = run_cfg(tokenized, "one_fsdp", *SHORT, "pretrain.strategy=fsdp")
    report = pretrain.run(cfg)
    assert report["world_size"] == 1 and len(losses(cfg)) == 3
    assert not dist.is_initialized()  # the stage tears its group down


def test_deterministic_mode_is_recorded_restored_and_changes_no_cpu_bit(tokenized):
    off = run_cfg(tokenized, "det_off", *SHORT)
    on = run_cfg(tokenized, "det_on", *SHORT, "pretrain.deterministic=true")
    assert pretrain.run(off)["deterministic"] is False
    assert pretrain.run(on)["deterministic"] is True
    assert losses(on) == losses(off)  # CPU training is deterministic either way
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the stage
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    from pipeline.train import distributed
    from pipeline.train.resume import digest_inputs, training_digest

    with distributed.deterministic_mode(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
        assert torch._inductor.config.deterministic
    assert torch.backends.cuda.flash_sdp_enabled()
    assert not torch._inductor.config.deterministic
    # It shapes a GPU trajectory, so a checkpoint of one mode never resumes the other.
    digests = {training_digest(digest_inputs(c, {}, 1, "cuda")) for c in (on, off)}
    assert len(digests) == 2


@needs_cxx
def test_bf16_compiled_cpu_training_matches_fp32_and_is_its_own_trajectory(tokenized):
    """The default path on a native-bf16 CPU (`auto`, here asked for by name): bf16
    autocast under torch.compile (inductor, a real C++ build) trains the same model as
    fp32 eager to bf16's precision, saves fp32 weights, and says what it ran in."""
    # No dropout: inductor draws its masks from its own generator, not eager's.
    same = ["model.dropout=0.0"]
    fp32 = run_cfg(tokenized, "fp32", *same, "pretrain.dtype=float32", "pretrain.compile=off")
    bf16 = run_cfg(tokenized, "bf16", *same, "pretrain.dtype=bfloat16", "pretrain.compile=on")
    want, got = pretrain.run(fp32), pretrain.run(bf16)
    assert (want["compute_dtype"], want["compiled"]) == ("float32", False)
    assert (got["compute_dtype"], got["compiled"]) == ("bfloat16", True)
    curve, reference = losses(bf16), losses(fp32)
    assert curve[-1] < curve[0] - 0.1  # it learns
    # bf16 keeps 8 bits of mantissa: per-step losses agree to ~1%, not bit for bit.
    assert curve == pytest.approx(reference, rel=0.02) and curve != reference
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=0.02)
    weights = load_weights(bf16.path("pretrain") / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}  # autocast: fp32 masters


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_on_the_same_global_batch(tokenized, strategy):
    common = [
        *TINY,
        "pretrain.max_steps=4",
        "pretrain.checkpoint_interval=100",
        "pretrain.eval_interval=100",
        "model.dropout=0.0",
    ]
    single = [
        *common,
        "paths.reports=out/one/reports",
        "paths.pretrain=out/one/m",
        "paths.checkpoints=out/one/c",
    ]
    # 2 processes x 4 sequences x 1 micro-step == 1 process x 4 sequences x 2 micro-steps
    double = [
        *common,
        f"pretrain.strategy={strategy}",
        f"paths.reports=out/{strategy}/reports",
        f"paths.pretrain=out/{strategy}/m",
        f"paths.checkpoints=out/{strategy}/c",
    ]
    for sets, nproc in ((single, 0), (double, 2)):
        proc = subprocess.run(
            stage_cmd(tokenized, *sets, nproc=nproc),
            cwd=tokenized,
            env=stage_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = losses(cfg_for(tokenized, *single))
    two = losses(cfg_for(tokenized, *double))
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-5
