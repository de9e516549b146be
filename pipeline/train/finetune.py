"""Fine-tuning from the pretrained weights: the data of each mode and the per-method loop.

Methods (`finetune.method`, one in `train_method`, several in `train_methods`):
- `adamw`: the baseline;
- `sam`: sharpness-aware minimization (pipeline/train/sam.py): the gradient is taken at
  w + rho * g / ||g|| and the AdamW step applied at w (ASAM with `sam_adaptive`);
- `swa`: AdamW, then from `swa_start` of training `torch.optim.swa_utils.AveragedModel`
  averages the weights (EMA with `swa_ema`) while `SWALR` holds the learning rate;
- `sam+swa`: both.

Until `swa_start` an averaging method is its base (swa is adamw, sam+swa is sam), so the
comparison trains each base only from there on, from its averaging run's state.

Data (`finetune.data`): `task_data` trains on the answers of synthesize's fine-tuning set
(optionally mixed with pretraining batches, `replay_batches`) and scores held-out exact
match; `corpus_data` keeps training on the pretrain shards and scores validation loss.
Batches are a function of the step, so every method sees the same batches in the same order.

Fine-tuning runs as one process on `pretrain.device`, in the dtype pretraining resolves to
(`finetune_dtype`: bf16 autocast on CUDA and on native-bf16 CPUs); the measures (sharpness,
Hessian) run in fp32 and, with the comparison report of the methods, are in
pipeline/eval/comparison.py.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn

from pipeline.config import Config, FinetuneConfig
from pipeline.core.errors import LmforgeError
from pipeline.core.names import FINETUNE_TEST, FINETUNE_TRAIN, TOKENIZER_FILE
from pipeline.core.progress import Progress
from pipeline.core.seeding import derive_seed
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.model.load import read_model_files
from pipeline.text.shards import read_meta, read_shard
from pipeline.text.task_data import (
    TaskSet,
    batch_indices,
    collate,
    evaluate_task,
    read_examples,
    tokenize,
)
from pipeline.text.tokenizer import load_tokenizer
from pipeline.train.batches import sample_batch
from pipeline.train.distributed import pick_device
from pipeline.train.optim import configure_optimizer
from pipeline.train.precision import compute_dtype
from pipeline.train.sam import SAM, sam_step

METHODS = ("adamw", "sam", "swa", "sam+swa")
# The scope of every seed derived here. It is the stage's name, and it must stay the same
# string: the batches, replay batches and dropout masks (hence the weights) depend on it.
SEED_SCOPE = "finetune"

Batch = tuple[torch.Tensor, torch.Tensor]  # (x, y), each (B, T) token ids
CHECK_EVERY = 25  # steps between host-side checks that the loss is finite


@dataclasses.dataclass
class Data:
    """Where batches come from and how a model is scored, for task or corpus fine-tuning."""

    batch: Callable[[int], Batch]  # step -> (x, y)
    score: Callable[[torch.nn.Module], dict[str, float]]
    eval_batch: Batch  # a fixed batch for sharpness
    # step -> a pretraining-corpus batch, for `finetune.replay` (None: no replay)
    replay_batch: Callable[[int], Batch] | None = None


def finetune_device(cfg: Config) -> torch.device:
    """`pretrain.device` (auto: CUDA when available): fine-tuning runs where pretraining did."""
    return pick_device(cfg.pretrain.device, 0)


def finetune_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype pretraining's matmuls run in on `device` (`pretrain.dtype`): fine-tuning
    uses it too. On the 2-core VM's native-bf16 CPU, bf16 fine-tuned sam+swa 1.86x faster
    than fp32 to the same task accuracy and story validity (benchmarks/README.md)."""
    return compute_dtype(device, cfg.pretrain.dtype)


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """bf16 autocast when `dtype` is bf16 (`finetune_dtype`); a no-op in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def load_pretrained(cfg: Config) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The pretrain stage's model config and weights (a clear error when they are missing)."""
    return read_model_files(cfg.path("pretrain"), hint="run `dvc repro pretrain`")


def load_data(cfg: Config, gcfg: GPTConfig, device: torch.device) -> Data:
    """The data of `finetune.data`: the task set, or the pretraining corpus."""
    return (task_data if cfg.finetune.data == "task" else corpus_data)(cfg, gcfg, device)


def task_data(cfg: Config, gcfg: GPTConfig, device: torch.device) -> Data:
    """The fine-tuning set from synthesize: train on answers, score held-out exact match."""
    tok_dir, f = cfg.path("tokenizer"), cfg.finetune
    tok, eot = load_tokenizer(tok_dir / TOKENIZER_FILE), read_meta(tok_dir)["eot_id"]
    syn = cfg.path("synthetic")
    train = tokenize(tok, read_examples(syn / FINETUNE_TRAIN), eot, gcfg.block_size)
    test = tokenize(tok, read_examples(syn / FINETUNE_TEST), eot, gcfg.block_size)
    if f.eval_examples:
        test = TaskSet(
            *(getattr(test, k)[: f.eval_examples] for k in ("inputs", "labels", "answers"))
        )
    seed = derive_seed(cfg.seed, SEED_SCOPE, "batches")
    dtype = finetune_dtype(cfg, device)

    def batch(step: int) -> Batch:
        x, y = collate(train, batch_indices(len(train), f.micro_batch_size, seed, step), eot)
        return x.to(device), y.to(device)

    fixed = collate(test, list(range(min(len(test), f.micro_batch_size))), eot)
    return Data(
        batch,
        lambda m: _autocast_call(
            device, dtype, evaluate_task, m, test, eot, f.micro_batch_size, device
        ),
        (fixed[0].to(device), fixed[1].to(device)),
        replay_batches(cfg, gcfg, device) if f.replay > 0 else None,
    )


def _autocast_call(
    device: torch.device, dtype: torch.dtype, fn: Callable[..., dict], *args: object
) -> dict:
    with autocast(device, dtype):
        return fn(*args)


def replay_batches(cfg: Config, gcfg: GPTConfig, device: torch.device) -> Callable[[int], Batch]:
    """step -> a (x, y) batch of the pretraining train shard, seeded apart from the task's.

    Answer-only fine-tuning alone makes a small model forget how to continue text (on the
    4 x 128 default preset of 2026-11 test bits/byte went from 0.32 before fine-tuning to
    1.23 after); mixing in the pretraining objective ("replay") keeps it a language model.
    """
    tok_dir, f = cfg.path("tokenizer"), cfg.finetune
    meta = read_meta(tok_dir)
    train = read_shard(tok_dir / meta["splits"]["train"]["file"], meta["splits"]["train"])
    seed = derive_seed(cfg.seed, SEED_SCOPE, "replay")

    def batch(step: int) -> Batch:
        x, y = sample_batch(train, seed, step, 0, f.micro_batch_size, gcfg.block_size)
        return x.to(device), y.to(device)

    return batch


def corpus_data(cfg: Config, gcfg: GPTConfig, device: torch.device) -> Data:
    """Continued language-model training on the pretrain shards, scored by val loss."""
    tok_dir, f = cfg.path("tokenizer"), cfg.finetune
    meta = read_meta(tok_dir)
    train = read_shard(tok_dir / meta["splits"]["train"]["file"], meta["splits"]["train"])
    val = read_shard(tok_dir / meta["splits"]["val"]["file"], meta["splits"]["val"])
    seed, T = derive_seed(cfg.seed, SEED_SCOPE, "corpus"), gcfg.block_size
    fixed = [sample_batch(val, seed, 0, i, f.micro_batch_size, T) for i in range(4)]
    dtype = finetune_dtype(cfg, device)

    @torch.no_grad()
    def score(model: torch.nn.Module) -> dict[str, float]:
        model.eval()
        with autocast(device, dtype):
            losses = [model(x.to(device), y.to(device))[1].item() for x, y in fixed]
        model.train()
        return {"answer_loss": sum(losses) / len(losses), "task_accuracy": float("nan")}

    def batch(step: int) -> Batch:
        x, y = sample_batch(train, seed, step + 1, 0, f.micro_batch_size, T)
        return x.to(device), y.to(device)

    return Data(batch, score, (fixed[0][0].to(device), fixed[0][1].to(device)))


@dataclasses.dataclass
class _Optimizers:
    """What one method steps with: AdamW always, SAM around it, SWA's average and schedule."""

    adamw: torch.optim.Optimizer
    sam: SAM | None
    averaged: AveragedModel | None
    swa_sched: SWALR | None


def _optimizers(method: str, model: GPT, f: FinetuneConfig, device: torch.device) -> _Optimizers:
    adamw = configure_optimizer(model, f.weight_decay, f.lr, (0.9, 0.95), device.type)
    use_sam, use_swa = method in ("sam", "sam+swa"), method in ("swa", "sam+swa")
    sam = (
        SAM(model.parameters(), adamw, rho=f.sam_rho, adaptive=f.sam_adaptive) if use_sam else None
    )
    averaged = swa_sched = None
    if use_swa:
        avg_fn = get_ema_multi_avg_fn(f.swa_ema_decay) if f.swa_ema else None
        averaged = AveragedModel(model, multi_avg_fn=avg_fn)
        swa_sched = SWALR(adamw, swa_lr=f.swa_lr, anneal_epochs=f.swa_anneal_steps)
    return _Optimizers(adamw, sam, averaged, swa_sched)


def _step(
    model: GPT,
    opt: _Optimizers,
    f: FinetuneConfig,
    batch: Batch,
    replay: Batch | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """One optimizer step (SAM's two passes, or one AdamW pass); the loss at w."""

    def loss_fn() -> torch.Tensor:
        with autocast(batch[0].device, dtype):
            loss = model(*batch)[1]
            if replay is not None:  # task loss + replay weight x language-model loss
                loss = loss + f.replay * model(*replay)[1]
        return loss

    if opt.sam is not None:
        return sam_step(opt.sam, loss_fn, clip=f.grad_clip)
    loss = loss_fn()
    loss.backward()
    if f.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), f.grad_clip)
    opt.adamw.step()
    opt.adamw.zero_grad(set_to_none=True)
    return loss


def train_method(
    method: str,
    cfg: Config,
    gcfg: GPTConfig,
    weights: dict,
    data: Data,
    device: torch.device,
    history: list[dict[str, float]] | None = None,
) -> GPT:
    """Fine-tune a fresh copy of the pretrained model with one method; return the result.

    `history`, when given, gets one {"step", "loss"} row per step (the loss at w, with the
    replay term when there is one): the method's curve on the stage's loss chart.
    """
    return _train(method, cfg, gcfg, weights, data, device, history)[0]


# Each averaging method and the method it is until `swa_start`: the same optimizer, rate,
# batches and dropout masks there, so the same weights bit for bit.
AVERAGING_BASE = {"swa": "adamw", "sam+swa": "sam"}


def train_methods(
    methods: list[str],
    cfg: Config,
    gcfg: GPTConfig,
    weights: dict,
    data: Data,
    device: torch.device,
    histories: dict[str, list[dict[str, float]]],
) -> Iterator[tuple[str, GPT]]:
    """(method, fine-tuned model) for each of `methods`, trained one after the other.

    Where an averaging method and its base are both asked for (the comparison), the base
    is not trained again from step 0: it goes on from the averaging run's state at
    `swa_start`, where their runs part. On CPU that gives the bits `train_method` gives
    (tests/test_finetune.py), for `swa_start / 2` fewer of the comparison's steps (a
    quarter at the default 0.5). The order is each averaging method, then its base;
    `histories[m]` gets method m's loss rows. A loss that is not finite before
    `swa_start` is reported under the averaging method, whose run it was.
    """
    branches = {b: a for a, b in AVERAGING_BASE.items() if a in methods and b in methods}
    branch_at = int(cfg.finetune.swa_start * cfg.finetune.max_steps)
    for method in methods:
        if method in branches:
            continue  # goes on from its averaging method's run, below
        base = AVERAGING_BASE.get(method)
        if base not in branches:
            yield method, train_method(method, cfg, gcfg, weights, data, device, histories[method])
            continue
        args = (cfg, gcfg, weights, data, device)
        model, branch = _train(method, *args, histories[method], branch_at=branch_at)
        yield method, model
        del model
        model = _train(base, *args, histories[base], start=branch)[0]
        del branch  # weights and AdamW's moments: three copies of the model's size
        yield base, model
        del model


@dataclasses.dataclass
class _Branch:
    """A run's state before step `step`: what another method goes on from there with."""

    step: int
    model: dict[str, torch.Tensor]
    adamw: dict[str, Any]
    rng: torch.Tensor  # the CPU generator's state: dropout masks on CPU
    cuda_rng: torch.Tensor | None  # the current CUDA device's, for dropout there
    rows: list[dict[str, float]]  # the loss rows of the steps before `step`


def _keep(step: int, model: GPT, opt: _Optimizers, rows: list[dict[str, float]]) -> _Branch:
    """Copies (not views) of everything the next steps read, so the run can go on."""
    cuda = next(model.parameters()).is_cuda
    return _Branch(
        step=step,
        model={k: v.detach().clone() for k, v in model.state_dict().items()},
        adamw=copy.deepcopy(opt.adamw.state_dict()),
        rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state() if cuda else None,
        rows=list(rows),
    )


def _train(
    method: str,
    cfg: Config,
    gcfg: GPTConfig,
    weights: dict,
    data: Data,
    device: torch.device,
    history: list[dict[str, float]] | None = None,
    branch_at: int | None = None,
    start: _Branch | None = None,
) -> tuple[GPT, _Branch | None]:
    """Fine-tune with `method` from the pretrained weights, or from `start` on; the model,
    and the run's state before step `branch_at` when asked for."""
    f = cfg.finetune
    # The same dropout masks for every method, so only the method differs.
    torch.manual_seed(derive_seed(cfg.seed, SEED_SCOPE, "dropout") % 2**63)
    model = GPT(gcfg).to(device)
    model.load_state_dict(weights if start is None else start.model)
    model.train()
    opt = _optimizers(method, model, f, device)
    first, rows = 0, []  # the first step to train; {"step", "loss"} rows, checked finite
    if start is not None:
        opt.adamw.load_state_dict(start.adamw)
        torch.set_rng_state(start.rng)
        if start.cuda_rng is not None:
            torch.cuda.set_rng_state(start.cuda_rng)
        first, rows = start.step, list(start.rows)
    dtype = finetune_dtype(cfg, device)
    swa_begin = int(f.swa_start * f.max_steps)
    branch: _Branch | None = None
    progress = Progress(f"finetune[{method}]", total=f.max_steps - first, unit=" steps")
    pending: list[torch.Tensor] = []  # losses not yet checked, on the device
    for step in range(first, f.max_steps):
        if step == branch_at:
            branch = _keep(step, model, opt, rows)
        in_swa = opt.averaged is not None and step >= swa_begin
        if not in_swa:  # linear warm-up, then constant; SWALR owns the rate while averaging
            for group in opt.adamw.param_groups:
                group["lr"] = f.lr * min(1.0, (step + 1) / max(f.warmup_steps, 1))
        batch = data.batch(step)
        replay = data.replay_batch(step) if data.replay_batch else None
        pending.append(_step(model, opt, f, batch, replay, dtype).detach())
        # Check at the branch step too, so the branch holds every row before it.
        if len(pending) == CHECK_EVERY or step + 1 in (f.max_steps, branch_at):
            done = step + 1 - len(pending)
            values = check_finite(method, done, pending)  # one host sync
            rows.extend({"step": done + i, "loss": v} for i, v in enumerate(values))
            pending = []
        if in_swa:
            opt.averaged.update_parameters(model)
            opt.swa_sched.step()
        progress.update(1)
    progress.close()
    if opt.averaged is not None:  # LayerNorm only: no BatchNorm statistics to recompute
        model.load_state_dict(opt.averaged.module.state_dict())
    if history is not None:
        history.extend(rows)
    return model, branch


def check_finite(method: str, first_step: int, losses: list[torch.Tensor]) -> list[float]:
    """`losses` (of the steps from `first_step` on) as floats; raise at a NaN/inf one.

    The error names the first step whose loss is not finite. Checked every `CHECK_EVERY`
    steps rather than every step: reading a loss on the host waits for the GPU, which then
    idles while the next step is queued.
    """
    values = torch.stack(losses).tolist()
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise LmforgeError(f"finetune[{method}]: loss is {value} at step {first_step + i}")
    return values
