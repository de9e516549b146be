"""The pretraining loop: build a run from the config, fit it, write its outputs.

    trainer = build(cfg, dist_utils.init(p.device, p.strategy))   # resumes when it may
    result = fit(trainer, tracker)        # steps, eval, logging, checkpoints, SIGTERM, NaN
    report = write_outputs(trainer, result)   # pipeline.train.outputs

Next-token cross-entropy, AdamW (`pipeline.train.optim`), linear warm-up then cosine decay
(`lr_at`), gradient clipping, gradient accumulation to `pretrain.tokens_per_step`
(`grad_accum_steps`; DDP syncs on the last micro-step only), bf16 autocast on CUDA and on
CPUs with native bf16, fp32 elsewhere, torch.compile where it pays (`pipeline.train.precision`;
DDP compiled whole, FSDP2 per block: `distributed.wrap`).
Which checkpoint may be resumed is decided by `pipeline.train.resume` (the training digest).

The tracker is any object with `log_metrics` (`MetricsLogger`): the stage passes MLflow's,
so this package needs no tracking code. Setting `Trainer.stop_requested` (the stage's
SIGTERM handler does) makes `fit` save a checkpoint and raise `TrainingInterrupted`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import Config
from pipeline.core.errors import LmforgeError
from pipeline.core.names import (
    TOKENIZER_FILE,
)
from pipeline.core.progress import Progress
from pipeline.core.seeding import derive_seed
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.text.shards import check_text_bytes, read_meta, read_shard
from pipeline.text.tokenizer import load_tokenizer, target_bytes, token_byte_lengths
from pipeline.train import checkpoint as ckpt
from pipeline.train import distributed as dist_utils
from pipeline.train.batches import BatchStream, check_shard, eval_batches
from pipeline.train.mfu import mfu, peak_flops
from pipeline.train.optim import configure_optimizer
from pipeline.train.precision import compile_enabled, compute_dtype, deterministic_wanted
from pipeline.train.resume import (
    all_ranks_rng,
    data_digests,
    digest_inputs,
    dropout_seed,
    restore_rank_rng,
    resume_from,
    training_digest,
)

log = logging.getLogger(__name__)
# The stage this loop serves: every seed is derived under this name (changing it changes
# every trajectory), and the report is `reports/pretrain.json`.
STAGE = "pretrain"


class TrainingDiverged(LmforgeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(LmforgeError):
    """SIGTERM arrived; a checkpoint was saved."""

    exit_code = 143


class MetricsLogger(Protocol):
    """What `fit` logs to (pipeline.ops.tracking.Tracker is one; rank 0 only logs there)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None: ...


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


@dataclasses.dataclass
class Trainer:
    """The pieces of one training run; `fit` runs it."""

    cfg: Config
    info: dist_utils.DistInfo
    model: torch.nn.Module  # what is called: wrapped (DDP/FSDP) or plain, maybe compiled
    raw: GPT  # the unwrapped module
    optimizer: torch.optim.Optimizer
    stream: BatchStream
    val_tokens: np.ndarray  # the val shard, memory-mapped
    token_bytes: torch.Tensor  # (V,) int64 UTF-8 bytes per token id, on the device
    accum: int
    history: list[dict[str, float]]
    digest_inputs: dict[str, Any]
    digest: str  # training_digest(digest_inputs)
    start_step: int = 0
    stop_requested: bool = False

    def compute_dtype(self) -> torch.dtype:
        """`pretrain.dtype`; "auto" is bf16 (autocast) on CUDA and native-bf16 CPUs."""
        return compute_dtype(self.info.device, self.cfg.pretrain.dtype)

    def compiled(self) -> bool:
        """`pretrain.compile` resolved for this device and dtype (`_model` compiled it so)."""
        return compile_enabled(self.info.device, self.cfg.pretrain.compile, self.compute_dtype())

    def deterministic(self) -> bool:
        """Whether the run is under deterministic algorithms (`pipeline.stages.pretrain.run`)."""
        p = self.cfg.pretrain
        return deterministic_wanted(self.info.device, p.deterministic, self.compiled())

    def autocast(self) -> torch.autocast:
        use_bf16 = self.compute_dtype() == torch.bfloat16
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def unwrapped(self) -> torch.nn.Module:
        """The module under torch.compile (DDP, FSDP or plain): state dicts and no_sync."""
        return getattr(self.model, "_orig_mod", self.model)

    def ddp_module(self) -> DistributedDataParallel | None:
        """The DDP wrapper, also when compiled: `torch.compile(ddp)` is not a DDP instance."""
        inner = self.unwrapped()
        return inner if isinstance(inner, DistributedDataParallel) else None

    def train_step(self, micro: list, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `accum` micro-batches; returns (mean loss, grad norm)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.cfg)
        total = torch.zeros((), device=self.info.device)
        ddp = self.ddp_module()
        for i, (x, y) in enumerate(micro):
            # DDP all-reduces on the last micro-step only; the others accumulate locally.
            skip_sync = ddp is not None and i < len(micro) - 1
            with ddp.no_sync() if skip_sync else contextlib.nullcontext(), self.autocast():
                _, loss = self.model(x, y)  # (B, T) -> scalar mean loss
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
        batches = eval_batches(
            self.val_tokens,
            seed,
            p.eval_batches,
            p.micro_batch_size,
            m.block_size,
            self.info.rank,
            self.info.world_size,
        )
        for x, y in batches:
            x, y = x.to(dev), y.to(dev)  # (B, T) each
            with self.autocast():
                logits, _ = self.model(x)  # (B, T, V) float32
            nll = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), y, reduction="none"
            )  # (B, T)
            n_bytes = target_bytes(y, self.token_bytes)  # exact bytes of the scored tokens
            n_tokens = torch.tensor(float(y.numel()), dtype=torch.float64, device=dev)
            total += torch.stack([nll.double().sum(), n_tokens, n_bytes.double()])
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
            rng=all_ranks_rng(),
            history=self.history,
            config_digest=self.digest,
            digest_inputs=self.digest_inputs,
        )
        return ckpt.save(
            self.cfg.path("checkpoints"),
            self.unwrapped(),
            self.optimizer,
            state,
            self.cfg.to_yaml(),
            self.info.is_main,
            self.cfg.pretrain.keep_checkpoints,
        )


def _model(
    cfg: Config, info: dist_utils.DistInfo, vocab_size: int
) -> tuple[GPT, torch.nn.Module, torch.nn.Module]:
    """(the GPT, what to call: wrapped and maybe compiled, the module whose state is saved).

    The init is seeded apart from the rank, so every rank starts from the same weights.
    """
    p = cfg.pretrain
    torch.manual_seed(derive_seed(cfg.seed, STAGE, "init") % 2**63)
    raw = GPT(GPTConfig.from_params(cfg.model, vocab_size)).to(info.device)
    strategy = dist_utils.resolve_strategy(p.strategy, info.world_size)
    use_compile = compile_enabled(info.device, p.compile, compute_dtype(info.device, p.dtype))
    mp = dist_utils.fsdp_mixed_precision(info.device, p.dtype)
    model, ddp = dist_utils.wrap(raw, strategy, info, compile=use_compile, mp_policy=mp)
    return raw, model, ddp if ddp is not None else getattr(model, "_orig_mod", model)


def build(cfg: Config, info: dist_utils.DistInfo) -> Trainer:
    """Model, optimizer, data and (when resuming) the restored state."""
    tok_dir = cfg.path("tokenizer")
    meta = read_meta(tok_dir)
    train_meta, val_meta = meta["splits"]["train"], meta["splits"]["val"]
    # verify=True: the md5 of every shard byte against meta.json before step 0, so a shard
    # damaged or edited after the tokenizer stage is refused, naming it (faults row 8).
    train = read_shard(tok_dir / train_meta["file"], train_meta, verify=True)
    val = read_shard(tok_dir / val_meta["file"], val_meta, verify=True)
    token_bytes = token_byte_lengths(load_tokenizer(tok_dir / TOKENIZER_FILE))  # (V,)
    check_text_bytes(tok_dir / val_meta["file"], val, token_bytes, val_meta["bytes"])
    check_shard(val, cfg.model.block_size, str(tok_dir / val_meta["file"]))  # fail before training
    inputs = digest_inputs(cfg, data_digests(tok_dir, meta), info.world_size, info.device.type)
    raw, model, state_module = _model(cfg, info, meta["vocab_size"])
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
        name=str(tok_dir / train_meta["file"]),
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
    torch.manual_seed(dropout_seed(cfg.seed, STAGE, info.rank))  # masks differ by rank
    # Resuming restores the RNG too (each rank's), so dropout masks continue where they were.
    state = (
        resume_from(cfg.path("checkpoints"), trainer.digest, inputs, state_module, optimizer)
        if p.resume
        else None
    )
    if state is not None:
        restore_rank_rng(state.rng, info.rank)
        trainer.start_step, trainer.history = state.step, state.history
    return trainer


def fit(t: Trainer, tracker: MetricsLogger) -> dict[str, Any]:
    """The training loop: steps, periodic eval/log/checkpoint, SIGTERM and NaN handling."""
    cfg, p = t.cfg, t.cfg.pretrain
    tokens_per_step = p.tokens_per_step
    n_params = t.raw.num_params()
    peak = peak_flops(t.info.device, t.compute_dtype())  # one device's, in its dtype
    if t.info.is_main:  # `auto` resolves per machine: say what this run trains in
        how = "torch.compile" if t.compiled() else "eager"
        log.info("pretrain: %s, %s, %s", t.info.device.type, t.compute_dtype(), how)
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
        world = t.info.world_size
        mfu_now = mfu(tok_s, t.raw.config, n_params, peak, world_size=world) if peak else 0.0
        rows = flush_steps(pending, tok_s, mfu_now)
        t.history.extend(rows)
        for row in rows:
            tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        pending = []
        progress.update(len(rows))
        if eval_due:
            _evaluate_and_log(t, tracker, done)
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
    # Wall time is a property of this run, not of the outputs: the tracker gets it, the DVC
    # metrics file (which must be identical when the run is reproduced) does not.
    wall = time.perf_counter() - t_start
    timing = {
        "wall_seconds": wall,
        "mean_tokens_per_s": (p.max_steps - t.start_step) * tokens_per_step / max(wall, 1e-9),
    }
    tracker.log_metrics(timing)
    return {"last_checkpoint_step": last_good, **timing}


def _evaluate_and_log(t: Trainer, tracker: MetricsLogger, done: int) -> None:
    """Evaluate after `done` steps; the scores join the last history row and the tracker."""
    ev = t.evaluate()
    t.history[-1].update(ev)
    tracker.log_metrics(ev, step=done)
    log.info("pretrain: step %d val_loss %.4f val_bpb %.4f", done, ev["val_loss"], ev["val_bpb"])


def flush_steps(
    pending: list[tuple[int, torch.Tensor, torch.Tensor, float]], tok_s: float, mfu_value: float
) -> list[dict[str, float]]:
    """Turn buffered (step, loss, grad norm, lr) into float rows in one host sync.

    Raises TrainingDiverged at the first NaN/inf loss, naming its step.
    """
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
