"""Stage `pretrain`: GPT pretraining on the token shards, one code path for every layout.

    dvc repro pretrain     # torchrun --standalone --nproc_per_node=<n> -m pipeline.stages.pretrain
    python -m pipeline.stages.pretrain --set pretrain.max_steps=50   # one process, no torchrun
    torchrun --standalone --nproc_per_node=2 -m pipeline.stages.pretrain \
        --set pretrain.strategy=fsdp

One process, DDP or FSDP2, on CPU or CUDA, chosen by `pretrain.*` and torchrun's
environment (see pipeline/distributed.py for multi-node flags). Next-token cross-entropy,
AdamW (fused on CUDA, decay on matrices only), linear warm-up then cosine decay, gradient
clipping, gradient accumulation to `pretrain.tokens_per_step`, bf16 autocast and TF32 on
CUDA, fp32 on CPU, optional torch.compile.

Outputs: `paths.pretrain/` (`model.safetensors`, `model_config.json`, `config.yaml`),
checkpoints in `paths.checkpoints/` (resume continues the same trajectory, bit-identical
on CPU), `reports/pretrain.json` and the loss curve `reports/plots/pretrain_loss.json`.
SIGTERM saves a checkpoint and exits with code 143; a NaN/inf loss stops with an error
naming the step and keeps the last good checkpoint.

The training core needs only torch, numpy, tokenizers, safetensors and pyyaml; MLflow
tracking is used when installed (rank 0 only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import checkpoint as ckpt
from pipeline import distributed as dist_utils
from pipeline.batches import BatchStream, eval_batches
from pipeline.config import Config
from pipeline.errors import LmforgeError
from pipeline.io_utils import atomic_dir, atomic_write_json
from pipeline.model import (
    GPT,
    GPTConfig,
    configure_optimizer,
    flops_per_token,
    mfu,
    peak_flops,
)
from pipeline.plots import loss_curve_png
from pipeline.progress import Progress
from pipeline.seeding import derive_seed
from pipeline.shards import read_meta, read_shard
from pipeline.stage_runner import stage_main

log = logging.getLogger(__name__)
STAGE = "pretrain"


class TrainingDiverged(LmforgeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(LmforgeError):
    """SIGTERM arrived; a checkpoint was saved."""

    exit_code = 143


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    p = cfg.pretrain
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    span = max(p.max_steps - p.warmup_steps, 1)
    progress = min((step - p.warmup_steps) / span, 1.0)
    return p.min_lr + 0.5 * (p.lr - p.min_lr) * (1 + math.cos(math.pi * progress))


def grad_accum_steps(cfg: Config, world: int) -> int:
    """Micro-steps per optimizer step so that one step sees `tokens_per_step` tokens."""
    p, per_micro = cfg.pretrain, cfg.pretrain.micro_batch_size * cfg.model.block_size * world
    if p.tokens_per_step % per_micro:
        raise ValueError(
            f"pretrain.tokens_per_step: {p.tokens_per_step} is not a multiple of "
            f"micro_batch_size x block_size x processes = {per_micro}"
        )
    return p.tokens_per_step // per_micro


def training_digest(cfg: Config) -> str:
    """Digest of everything that shapes the trajectory; a checkpoint resumes only if equal."""
    keys = {"seed": cfg.seed, "model": cfg.model, "pretrain": cfg.pretrain, "tok": cfg.tokenizer}
    blob = json.dumps({k: getattr(v, "__dict__", v) for k, v in keys.items()}, default=str)
    blob = blob.replace('"resume": true', "").replace('"resume": false', "")
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass
class Trainer:
    """The pieces of one training run; `fit` runs it."""

    cfg: Config
    info: dist_utils.DistInfo
    model: torch.nn.Module  # wrapped (DDP/FSDP) or plain
    raw: GPT  # the unwrapped module
    optimizer: torch.optim.Optimizer
    stream: BatchStream
    val_tokens: Any
    tokens_per_byte: float
    accum: int
    history: list[dict[str, float]]
    start_step: int = 0
    stop_requested: bool = False

    def autocast(self):
        use_bf16 = self.info.device.type == "cuda" and self.cfg.pretrain.dtype != "float32"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16)

    def train_step(self, micro: list, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `accum` micro-batches; returns (mean loss, grad norm)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.cfg)
        total = torch.zeros((), device=self.info.device)
        for i, (x, y) in enumerate(micro):
            sync = i == len(micro) - 1
            if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) and not sync:
                with self.model.no_sync(), self.autocast():  # all-reduce once per step
                    _, loss = self.model(x, y)
                    (loss / self.accum).backward()
            else:
                with self.autocast():
                    _, loss = self.model(x, y)
                (loss / self.accum).backward()
            total += loss.detach() / self.accum
        clip = self.cfg.pretrain.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), clip if clip > 0 else float("inf")
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
            norm = norm.full_tensor()
        return dist_utils.all_reduce_mean(total), norm

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean val loss (nats/token) and bits per byte over the fixed val batches."""
        self.model.eval()
        p, m = self.cfg.pretrain, self.cfg.model
        seed = derive_seed(self.cfg.seed, STAGE, "val")
        total = torch.zeros(2, device=self.info.device)  # (sum of losses, batches)
        for x, y in eval_batches(
            self.val_tokens,
            seed,
            p.eval_batches,
            p.micro_batch_size,
            m.block_size,
            self.info.rank,
            self.info.world_size,
        ):
            with self.autocast():
                _, loss = self.model(x.to(self.info.device), y.to(self.info.device))
            total += torch.stack([loss.float(), torch.ones((), device=self.info.device)])
        total = dist_utils.all_reduce_mean(total)
        self.model.train()
        val_loss = (total[0] / total[1]).item()
        return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) * self.tokens_per_byte}

    def checkpoint(self, step: int) -> Path:
        state = ckpt.TrainState(
            step=step,
            scheduler={"kind": "warmup_cosine", "last_step": step - 1},
            rng=ckpt.rng_state(),
            history=self.history,
            config_digest=training_digest(self.cfg),
        )
        return ckpt.save(
            self.cfg.path("checkpoints"),
            self.model,
            self.optimizer,
            state,
            self.cfg.to_yaml(),
            self.info.is_main,
            self.cfg.pretrain.keep_checkpoints,
        )


def build(cfg: Config, info: dist_utils.DistInfo) -> Trainer:
    """Model, optimizer, data and (when resuming) the restored state."""
    tok_dir = cfg.path("tokenizer")
    meta = read_meta(tok_dir)
    train = read_shard(tok_dir / meta["splits"]["train"]["file"], meta["splits"]["train"])
    val = read_shard(tok_dir / meta["splits"]["val"]["file"], meta["splits"]["val"])
    val_meta = meta["splits"]["val"]
    gcfg = GPTConfig.from_params(cfg.model, meta["vocab_size"])
    torch.manual_seed(derive_seed(cfg.seed, STAGE, "init") % 2**63)
    raw = GPT(gcfg).to(info.device)
    strategy = dist_utils.resolve_strategy(cfg.pretrain.strategy, info.world_size)
    model = dist_utils.wrap(raw, strategy, info)
    p = cfg.pretrain
    optimizer = configure_optimizer(
        model, p.weight_decay, p.lr, (p.beta1, p.beta2), info.device.type
    )
    accum = grad_accum_steps(cfg, info.world_size)
    stream = BatchStream(
        train,
        seed=derive_seed(cfg.seed, STAGE, "train"),
        batch=p.micro_batch_size,
        block=cfg.model.block_size,
        accum=accum,
        rank=info.rank,
        world=info.world_size,
        device=info.device,
    )
    trainer = Trainer(
        cfg,
        info,
        model,
        raw,
        optimizer,
        stream,
        val,
        tokens_per_byte=val_meta["tokens"] / max(val_meta["bytes"], 1),
        accum=accum,
        history=[],
    )
    torch.manual_seed(derive_seed(cfg.seed, STAGE, "dropout") % 2**63)
    resume_from(trainer)  # restores the RNG too, so dropout masks continue where they were
    if p.compile == "on" or (p.compile == "auto" and info.device.type == "cuda"):
        trainer.model = torch.compile(model)
    return trainer


def resume_from(trainer: Trainer) -> None:
    """Continue from the newest checkpoint whose config digest matches this run's."""
    cfg = trainer.cfg
    found = ckpt.list_checkpoints(cfg.path("checkpoints")) if cfg.pretrain.resume else []
    if not found:
        return
    latest = found[-1]
    digest = ckpt.read_state(latest).config_digest
    if digest != training_digest(cfg):
        log.warning("pretrain: %s was made with another config; starting fresh", latest)
        return
    state = ckpt.load(latest, trainer.model, trainer.optimizer)
    trainer.start_step, trainer.history = state.step, state.history
    log.info("pretrain: resumed from %s at step %d", latest, state.step)


def fit(t: Trainer, tracker) -> dict[str, Any]:
    """The training loop: steps, periodic eval/log/checkpoint, SIGTERM and NaN handling."""
    cfg, p = t.cfg, t.cfg.pretrain
    tokens_per_step = p.tokens_per_step
    n_params = t.raw.num_params()
    peak = peak_flops(t.info.device, torch.bfloat16)
    progress = Progress("pretrain", total=p.max_steps, unit=" steps", every=10.0)
    progress.done = t.start_step
    pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
    last_good = t.start_step
    t_start = t_last = time.perf_counter()
    for step, micro in enumerate(t.stream.steps(t.start_step, p.max_steps), start=t.start_step):
        loss, norm = t.train_step(micro, step)
        pending.append((step, loss, norm, lr_at(step, cfg)))
        done = step + 1
        boundary = done % p.log_interval == 0 or done == p.max_steps
        ckpt_due = done % p.checkpoint_interval == 0 or done == p.max_steps
        eval_due = done % p.eval_interval == 0 or done == p.max_steps
        # Ranks must agree on entering this block (it has collectives), so with several
        # processes a SIGTERM is acted on at the next boundary, where they all vote.
        local_stop = t.stop_requested and not t.info.distributed
        if not (boundary or ckpt_due or eval_due or local_stop):
            continue
        elapsed, t_last = time.perf_counter() - t_last, time.perf_counter()
        tok_s = tokens_per_step * len(pending) / elapsed
        rows = flush_steps(
            pending, tok_s, mfu(tok_s, t.raw.config, n_params, peak) if peak else 0.0
        )
        t.history.extend(rows)
        for row in rows:
            tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        pending = []
        progress.update(len(rows))
        if eval_due:
            ev = t.evaluate()
            t.history[-1].update(ev)
            tracker.log_metrics(ev, step=done)
            log.info(
                "pretrain: step %d val_loss %.4f val_bpb %.4f", done, ev["val_loss"], ev["val_bpb"]
            )
        stop = dist_utils.any_process(t.stop_requested, t.info.device)
        if ckpt_due or stop:
            t.checkpoint(done)
            last_good = done
        if stop:
            raise TrainingInterrupted(
                f"pretrain: SIGTERM at step {done}; checkpoint saved in "
                f"{cfg.path('checkpoints')}/step_{done:07d}. Run the stage again to resume."
            )
    progress.close()
    # Wall time is a property of this run, not of the outputs: MLflow gets it, the DVC
    # metrics file (which must be identical when the run is reproduced) does not.
    wall = time.perf_counter() - t_start
    timing = {
        "wall_seconds": wall,
        "mean_tokens_per_s": (p.max_steps - t.start_step) * tokens_per_step / max(wall, 1e-9),
    }
    tracker.log_metrics(timing)
    return {"last_checkpoint_step": last_good, **timing}


def flush_steps(pending, tok_s: float, mfu_value: float) -> list[dict[str, float]]:
    """Turn buffered per-step tensors into floats in one host sync; stop on NaN/inf."""
    values = torch.stack(
        [torch.stack([loss, norm.float()]) for _, loss, norm, _ in pending]
    ).tolist()
    rows = []
    for (step, _, _, lr), (loss, norm) in zip(pending, values, strict=True):
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"pretrain: loss is {loss} at step {step}; training stopped. The last good "
                "checkpoint is kept; lower pretrain.lr or raise pretrain.warmup_steps."
            )
        rows.append(
            {
                "step": step,
                "loss": loss,
                "grad_norm": norm,
                "lr": lr,
                "tokens_per_s": tok_s,
                "mfu": mfu_value,
            }
        )
    return rows


def write_outputs(t: Trainer, result: dict[str, Any]) -> dict[str, Any]:
    """Final weights, model config, report and loss curve (rank 0; all ranks gather)."""
    cfg = t.cfg
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(t.model, options=ckpt.FULL)
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
        "train_loss": t.history[-1]["loss"],
        **final_eval,
    }
    with atomic_dir(cfg.path("pretrain")) as out:
        ckpt.save_weights(out / "model.safetensors", sd)
        atomic_write_json(out / "model_config.json", dataclasses.asdict(t.raw.config))
        (out / "config.yaml").write_text(cfg.to_yaml())
    curve = [{"step": r["step"], "loss": r["loss"]} for r in t.history]
    atomic_write_json(cfg.path("reports") / "plots" / "pretrain_loss.json", curve)
    atomic_write_json(cfg.path("reports") / f"{STAGE}.json", report)
    return report


def run(cfg: Config) -> dict[str, Any]:
    """Train; rank 0 writes outputs. Raises TrainingDiverged / TrainingInterrupted."""
    from pipeline.tracking import start_run

    info = dist_utils.init(cfg.pretrain.device)
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    previous = signal.getsignal(signal.SIGTERM)
    try:
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
            if tracker.active:
                tracker.log_artifact(cfg.path("reports") / f"{STAGE}.json")
                with tempfile.TemporaryDirectory() as tmp:
                    png = loss_curve_png(trainer.history, Path(tmp) / "pretrain_loss.png")
                    if png:
                        tracker.log_artifact(png, "plots")
    finally:
        signal.signal(signal.SIGTERM, previous)
        dist_utils.shutdown()
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
