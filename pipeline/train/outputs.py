"""What a finished pretraining run leaves on disk: final weights, report and loss curve.

    report = write_outputs(trainer, fit(trainer, tracker))   # pipeline/train/loop.py

`reports/pretrain.json` holds only what a re-run reproduces (no wall time, no tokens/s), so
DVC sees the same metrics file when the run is reproduced.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.state_dict import get_model_state_dict

from pipeline.config import Config
from pipeline.core.io import atomic_dir, atomic_write_json
from pipeline.core.names import (
    MODEL_CONFIG_FILE,
    PLOTS_DIR,
    PRETRAIN_LOSS,
    RESOLVED_CONFIG,
    WEIGHTS_FILE,
    report_json,
)
from pipeline.train import checkpoint as ckpt
from pipeline.train.loop import STAGE, Trainer
from pipeline.train.mfu import flops_per_token
from pipeline.train.precision import dtype_name


def report_path(cfg: Config) -> Path:
    """`reports/pretrain.json`, the stage's DVC metrics file."""
    return cfg.path("reports") / report_json(STAGE)


def write_outputs(t: Trainer, result: dict[str, Any]) -> dict[str, Any]:
    """Final weights, model config, report and loss curve (rank 0; all ranks gather).

    Returns the report ({} on other ranks). `result` (fit's) is not written: its wall time
    and tokens/s differ between runs, and the report must be identical on a re-run.
    """
    cfg = t.cfg
    sd = get_model_state_dict(t.unwrapped(), options=ckpt.FULL)
    if not t.info.is_main:
        return {}
    final_eval = {k: v for k, v in t.history[-1].items() if k.startswith("val_")}
    tokens = cfg.pretrain.max_steps * cfg.pretrain.tokens_per_step
    report = {
        "steps": cfg.pretrain.max_steps,
        "params": t.raw.num_params(),
        "tokens_seen": tokens,
        "flops": flops_per_token(t.raw.config, t.raw.num_params()) * tokens,  # 6N + attention
        "device": t.info.device.type,
        "world_size": t.info.world_size,
        # `auto` resolves per machine (pipeline.train.precision): what this run trained in.
        "compute_dtype": dtype_name(t.compute_dtype()),
        "compiled": t.compiled(),
        "deterministic": t.deterministic(),  # asked, or compiled on CPU (train.precision)
        "train_loss": t.history[-1]["loss"],
        **final_eval,
    }
    with atomic_dir(cfg.path("pretrain")) as out:
        ckpt.save_weights(out / WEIGHTS_FILE, sd)
        atomic_write_json(out / MODEL_CONFIG_FILE, dataclasses.asdict(t.raw.config))
        (out / RESOLVED_CONFIG).write_text(cfg.to_yaml())
    curve = [{"step": r["step"], "loss": r["loss"]} for r in t.history]
    atomic_write_json(cfg.path("reports") / PLOTS_DIR / PRETRAIN_LOSS, curve)
    atomic_write_json(report_path(cfg), report)
    return report
