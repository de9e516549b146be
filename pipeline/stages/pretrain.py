"""Stage `pretrain`: GPT pretraining on the token shards, one code path for every layout.

    dvc repro pretrain     # pipeline.ops.launch (torchrun) ... -m pipeline.stages.pretrain
    python -m pipeline.stages.pretrain --set pretrain.max_steps=50   # one process, no torchrun
    torchrun --standalone --nproc_per_node=2 -m pipeline.stages.pretrain \
        --set pretrain.strategy=fsdp

One process, DDP or FSDP2, on CPU or CUDA, chosen by `pretrain.*` and torchrun's
environment (see pipeline/train/distributed.py for multi-node flags). Next-token cross-entropy,
AdamW (fused on CUDA, decay on matrices only), linear warm-up then cosine decay, gradient
clipping, gradient accumulation to `pretrain.tokens_per_step`, bf16 autocast and TF32 on
CUDA, fp32 on CPU, optional torch.compile.

Outputs: `paths.pretrain/` (`model.safetensors`, `model_config.json`, `config.yaml`),
checkpoints in `paths.checkpoints/` (resume continues the same trajectory, bit-identical
on CPU), `reports/pretrain.json` and the loss curve `reports/plots/pretrain_loss.json`.
A checkpoint is resumed only by a run with the same training digest: the train/val
shards, the tokenizer, the seed, model and trajectory-shaping pretrain params, the world
size and the device (`digest_inputs`); any other run trains from step 0. `val_bpb` is the
val loss over the exact UTF-8 bytes of the scored tokens (the tokenizer's byte table).
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

from pipeline.config import Config
from pipeline.core.errors import LmforgeError
from pipeline.core.io import atomic_dir, atomic_write_json, file_md5
from pipeline.core.plots import loss_curve_png
from pipeline.core.progress import Progress
from pipeline.core.seeding import derive_seed
from pipeline.eval import lm as M
from pipeline.model.gpt import (
    GPT,
    GPTConfig,
    configure_optimizer,
    flops_per_token,
    mfu,
    peak_flops,
)
from pipeline.ops.stage_runner import stage_main
from pipeline.text.shards import check_text_bytes, read_meta, read_shard
from pipeline.text.tokenizer import load_tokenizer, token_byte_lengths
from pipeline.train import checkpoint as ckpt
from pipeline.train import distributed as dist_utils
from pipeline.train.batches import BatchStream, check_shard, eval_batches

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


# Pretrain params that do not change the trajectory (weights, optimizer state, losses):
# how often to log, evaluate or checkpoint, how many checkpoints to keep, whether to
# resume, and the process count asked of torchrun (the real world size is hashed
# instead). Evaluation does not touch the trajectory: it runs without dropout and draws
# its batches from a numpy generator of its own, never from torch's RNG. A checkpoint made
# under other values of these resumes fine, and the final evaluation is always redone with
# this run's `eval_batches` (see `fit`). `device` is replaced by the device actually used.
NOT_TRAJECTORY = frozenset(
    {
        "resume",
        "log_interval",
        "eval_interval",
        "eval_batches",
        "checkpoint_interval",
        "keep_checkpoints",
        "nproc_per_node",
        "device",
    }
)


def data_digests(tok_dir: Path, meta: dict[str, Any]) -> dict[str, str]:
    """md5 of the train and val shards (as meta.json records them) and of tokenizer.json."""
    return {
        "train_shard_md5": meta["splits"]["train"]["md5"],
        "val_shard_md5": meta["splits"]["val"]["md5"],
        "tokenizer_md5": file_md5(tok_dir / "tokenizer.json"),
    }


def digest_inputs(
    cfg: Config, data: dict[str, str], world_size: int, device: str
) -> dict[str, Any]:
    """Everything that shapes the trajectory, flat (`pretrain.lr`, `data.train_shard_md5`).

    The seed, every model param, the pretrain params but `NOT_TRAJECTORY` (max_steps is in:
    the cosine schedule depends on it), the data (`data_digests`: a change of
    `synthesize.synthetic_share` changes the train shard), the world size and the device.
    """
    pretrain = {
        k: v for k, v in dataclasses.asdict(cfg.pretrain).items() if k not in NOT_TRAJECTORY
    }
    groups = {"model": dataclasses.asdict(cfg.model), "pretrain": pretrain, "data": data}
    flat: dict[str, Any] = {f"{g}.{k}": v for g, d in groups.items() for k, v in d.items()}
    return {"seed": cfg.seed, **flat, "world_size": world_size, "device": device}


def training_digest(inputs: dict[str, Any]) -> str:
    """Digest of `digest_inputs`; a checkpoint is loaded only by a run with the same one."""
    blob = json.dumps(inputs, sort_keys=True, default=str)
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
    token_bytes: torch.Tensor  # (V,) int64 UTF-8 bytes per token id, on the device
    accum: int
    history: list[dict[str, float]]
    digest_inputs: dict[str, Any]
    digest: str  # training_digest(digest_inputs)
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
        """Val loss (nats/token) and bits per byte over the fixed val batches.

        Bits per byte is the summed loss over ln 2 and over the exact bytes of the target
        tokens (`token_bytes`; separators count 0), summed over every batch and process.
        """
        self.model.eval()
        p, m = self.cfg.pretrain, self.cfg.model
        seed = derive_seed(self.cfg.seed, STAGE, "val")
        dev = self.info.device
        # (sum of token losses in nats, tokens, bytes of the targets): float64 sums are
        # exact for the byte and token counts and keep the loss sum stable.
        total = torch.zeros(3, dtype=torch.float64, device=dev)
        for x, y in eval_batches(
            self.val_tokens,
            seed,
            p.eval_batches,
            p.micro_batch_size,
            m.block_size,
            self.info.rank,
            self.info.world_size,
        ):
            x, y = x.to(dev), y.to(dev)  # (B, T) each
            with self.autocast():
                logits, _ = self.model(x)  # (B, T, V) float32
            nll = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), y, reduction="none"
            )  # (B, T)
            total += torch.stack(
                [
                    nll.double().sum(),
                    torch.tensor(float(y.numel()), dtype=torch.float64, device=dev),
                    M.target_bytes(y, self.token_bytes).double(),
                ]
            )
        total = dist_utils.all_reduce_mean(total)  # the ratios are what matter
        self.model.train()
        nats, tokens, n_bytes = total.tolist()
        if n_bytes <= 0:
            raise LmforgeError(
                "pretrain: the val batches hold only separator tokens (0 bytes of text); "
                "raise pretrain.eval_batches or check the val split"
            )
        return {"val_loss": nats / tokens, "val_bpb": nats / math.log(2) / n_bytes}

    def checkpoint(self, step: int) -> Path:
        state = ckpt.TrainState(
            step=step,
            scheduler={"kind": "warmup_cosine", "last_step": step - 1},
            rng=ckpt.rng_state(),
            history=self.history,
            config_digest=self.digest,
            digest_inputs=self.digest_inputs,
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
    token_bytes = token_byte_lengths(load_tokenizer(tok_dir / "tokenizer.json"))  # (V,)
    check_text_bytes(tok_dir / val_meta["file"], val, token_bytes, val_meta["bytes"])
    check_shard(val, cfg.model.block_size, str(tok_dir / val_meta["file"]))  # fail before training
    inputs = digest_inputs(cfg, data_digests(tok_dir, meta), info.world_size, info.device.type)
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
        name=str(tok_dir / meta["splits"]["train"]["file"]),
    )
    trainer = Trainer(
        cfg,
        info,
        model,
        raw,
        optimizer,
        stream,
        val,
        token_bytes=torch.from_numpy(token_bytes).to(info.device),
        accum=accum,
        history=[],
        digest_inputs=inputs,
        digest=training_digest(inputs),
    )
    torch.manual_seed(derive_seed(cfg.seed, STAGE, "dropout") % 2**63)
    resume_from(trainer)  # restores the RNG too, so dropout masks continue where they were
    if p.compile == "on" or (p.compile == "auto" and info.device.type == "cuda"):
        trainer.model = torch.compile(model)
    return trainer


def resume_from(trainer: Trainer) -> None:
    """Continue from the newest checkpoint made under this run's training digest.

    A checkpoint made under another digest (other data, tokenizer, config, world size or
    device) is never loaded, whatever its step: it belongs to another trajectory. Each one
    skipped is logged with both digests and the inputs that differ.
    """
    cfg = trainer.cfg
    found = ckpt.list_checkpoints(cfg.path("checkpoints")) if cfg.pretrain.resume else []
    for path in reversed(found):  # newest first
        state = ckpt.read_state(path)
        if state.config_digest == trainer.digest:
            state = ckpt.load(path, trainer.model, trainer.optimizer)
            trainer.start_step, trainer.history = state.step, state.history
            log.info(
                "pretrain: resumed from %s at step %d (training digest %s)",
                path,
                state.step,
                trainer.digest,
            )
            return
        log.warning(
            "pretrain: not resuming from %s: it was made under training digest %s, this "
            "run's is %s (%s)",
            path,
            state.config_digest,
            trainer.digest,
            _differences(state.digest_inputs, trainer.digest_inputs),
        )
    if found:
        log.warning(
            "pretrain: no checkpoint has training digest %s; training from step 0", trainer.digest
        )


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """`key: old -> new` for the digest inputs that differ (old checkpoints lack them)."""
    if not old:
        return "the checkpoint does not record its digest inputs"
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return "differs in " + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


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
    if t.start_step >= p.max_steps:
        # Resumed a finished trajectory: the weights are final, but the evaluation in the
        # history may have used other `eval_batches` (not part of the digest): redo it.
        ev = t.evaluate()
        t.history[-1].update(ev)
        tracker.log_metrics(ev, step=p.max_steps)
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
    from pipeline.ops.tracking import start_run

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
