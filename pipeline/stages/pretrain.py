"""Stage `pretrain`: GPT pretraining on the token shards, one code path for every layout.

    dvc repro pretrain     # pipeline.ops.launch (torchrun) ... -m pipeline.stages.pretrain
    python -m pipeline.stages.pretrain --set pretrain.max_steps=50   # one process, no torchrun
    torchrun --standalone --nproc_per_node=2 -m pipeline.stages.pretrain \
        --set pretrain.strategy=fsdp

One process, DDP or FSDP2, on CPU or CUDA, chosen by `pretrain.*` and torchrun's
environment (see pipeline/train/distributed.py for multi-node flags). Next-token cross-entropy,
AdamW (fused on CUDA, decay on matrices only), linear warm-up then cosine decay, gradient
clipping, gradient accumulation to `pretrain.tokens_per_step`, bf16 autocast (TF32 too on
CUDA) and torch.compile on CUDA and on CPUs with native bf16, fp32 eager on other CPUs
(`pipeline.train.precision`; `pretrain.dtype` / `pretrain.compile` choose by hand).
The loop is pipeline/train/loop.py; this module only tracks the run (rank 0), turns SIGTERM
into a checkpoint and calls the library.

Outputs: `paths.pretrain/` (`model.safetensors`, `model_config.json`, `config.yaml`),
checkpoints in `paths.checkpoints/` (resume continues the same trajectory, bit-identical
on CPU), `reports/pretrain.json` and the loss curve `reports/plots/pretrain_loss.json`.
A checkpoint is resumed only by a run with the same training digest: the train/val
shards, the tokenizer, the seed, model and trajectory-shaping pretrain params, the world
size and the device (`pipeline.train.resume.digest_inputs`); any other run trains from
step 0. `val_bpb` is the val loss over the exact UTF-8 bytes of the scored tokens (the
tokenizer's byte table).
SIGTERM saves a checkpoint and exits with code 143; a NaN/inf loss stops with an error
naming the step and keeps the last good checkpoint.

The training core needs only torch, numpy, tokenizers, safetensors and pyyaml; MLflow
tracking is used when installed (rank 0 only).
"""

from __future__ import annotations

import dataclasses
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.core.names import shard_file
from pipeline.core.plots import loss_curve_png
from pipeline.ops.stage_runner import stage_entry
from pipeline.train import distributed as dist_utils
from pipeline.train.loop import STAGE, build, fit
from pipeline.train.outputs import report_path, write_outputs
from pipeline.train.precision import compile_enabled, compute_dtype, deterministic_wanted


def run(cfg: Config) -> dict[str, Any]:
    """Train; rank 0 writes outputs. Raises TrainingDiverged / TrainingInterrupted (loop.py)."""
    info = dist_utils.init(cfg.pretrain.device, cfg.pretrain.strategy)
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with dist_utils.deterministic_mode(_deterministic(cfg, info)):
            return _train(cfg, info)
    finally:
        signal.signal(signal.SIGTERM, previous)
        dist_utils.shutdown()


def _deterministic(cfg: Config, info: dist_utils.DistInfo) -> bool:
    """`pretrain.deterministic`, or a compiled CPU run (`precision.deterministic_wanted`)."""
    p = cfg.pretrain
    compiled = compile_enabled(info.device, p.compile, compute_dtype(info.device, p.dtype))
    return deterministic_wanted(info.device, p.deterministic, compiled)


def _train(cfg: Config, info: dist_utils.DistInfo) -> dict[str, Any]:
    """Build, fit and write the outputs under a tracker (MLflow when installed, rank 0)."""
    from pipeline.ops.tracking import SPLIT_CONTEXT, start_run

    trainer = build(cfg, info)
    signal.signal(signal.SIGTERM, lambda *_: setattr(trainer, "stop_requested", True))
    with start_run(cfg, STAGE, rank=info.rank) as tracker:
        tracker.log_params(
            {
                "seed": cfg.seed,
                "model": dataclasses.asdict(cfg.model),
                "pretrain": dataclasses.asdict(cfg.pretrain),
                "world_size": info.world_size,
                "accum": trainer.accum,
                "params": trainer.raw.num_params(),
            }
        )
        result = fit(trainer, tracker)
        report = write_outputs(trainer, result)
        tracker.describe(STAGE, report)
        for split in ("train", "val"):  # the token shards it trained and validated on
            shard = cfg.path("tokenizer") / shard_file(split)
            tracker.log_dataset(shard, f"tokens-{split}", SPLIT_CONTEXT[split])
        if tracker.active:
            tracker.log_artifact(report_path(cfg))
            with tempfile.TemporaryDirectory() as tmp:
                png = loss_curve_png(trainer.history, Path(tmp) / "pretrain_loss.png")
                if png:
                    tracker.log_artifact(png, "plots")
    return report


# `dvc repro pretrain` (torchrun); one process: `python -m pipeline.stages.pretrain`
main = stage_entry(STAGE, run)

if __name__ == "__main__":
    raise SystemExit(main())
