"""Stage `finetune`: SWA and/or SAM fine-tuning from the pretrained weights.

    dvc repro finetune
    python -m pipeline.stages.finetune --set finetune.method=sam --set finetune.compare=false

Methods (`finetune.method`):
- `adamw`: the baseline;
- `sam`: sharpness-aware minimization (pipeline/train/sam.py): the gradient is taken at
  w + rho * g / ||g|| and the AdamW step applied at w (ASAM with `sam_adaptive`);
- `swa`: AdamW, then from `swa_start` of training `torch.optim.swa_utils.AveragedModel`
  averages the weights (EMA with `swa_ema`) while `SWALR` holds the learning rate;
- `sam+swa`: both.

With `finetune.compare: true` every method starts from the same checkpoint and sees the
same batches in the same order (batches are a function of the step); `reports/finetune.json`,
`reports/finetune.md` and a plot compare held-out answer loss, task accuracy (greedy exact
match) and flatness: epsilon-sharpness and the largest and smallest Hessian eigenvalues
(Lanczos, with residuals; a negative smallest one means the weights are not at a minimum),
followed by sentences generated from those numbers that say whether each method is flatter
than adamw, or NOT, by each measure (`flatness` in the JSON). The model of
`finetune.method` moves on, in `paths.finetune/model.safetensors`; with compare, every
method's weights are kept in `paths.finetune/methods/<method>/` for evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn

from pipeline.config import Config, save_resolved
from pipeline.core.errors import LmforgeError
from pipeline.core.io import atomic_dir, atomic_write_json, atomic_write_text
from pipeline.core.progress import Progress
from pipeline.core.seeding import derive_seed
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.model.load import read_model_files
from pipeline.ops.stage_runner import stage_main
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
from pipeline.train import checkpoint as ckpt
from pipeline.train.batches import sample_batch
from pipeline.train.optim import configure_optimizer
from pipeline.train.sam import SAM, sam_step

log = logging.getLogger(__name__)
STAGE = "finetune"
METHODS = ("adamw", "sam", "swa", "sam+swa")


@dataclasses.dataclass
class Data:
    """Where batches come from and how a model is scored, for task or corpus fine-tuning."""

    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # step -> (x, y)
    score: Callable[[torch.nn.Module], dict[str, float]]
    eval_batch: tuple[torch.Tensor, torch.Tensor]  # a fixed batch for sharpness
    # step -> a pretraining-corpus batch, for `finetune.replay` (None: no replay)
    replay_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None


def load_pretrained(cfg: Config) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    return read_model_files(cfg.path("pretrain"), hint="run `dvc repro pretrain`")


def task_data(cfg: Config, gcfg: GPTConfig, device: torch.device) -> Data:
    """The fine-tuning set from synthesize: train on answers, score held-out exact match."""
    tok_dir, f = cfg.path("tokenizer"), cfg.finetune
    tok, eot = load_tokenizer(tok_dir / "tokenizer.json"), read_meta(tok_dir)["eot_id"]
    syn = cfg.path("synthetic")
    train = tokenize(tok, read_examples(syn / "finetune_train.jsonl"), eot, gcfg.block_size)
    test = tokenize(tok, read_examples(syn / "finetune_test.jsonl"), eot, gcfg.block_size)
    if f.eval_examples:
        test = TaskSet(
            *(getattr(test, k)[: f.eval_examples] for k in ("inputs", "labels", "answers"))
        )
    seed = derive_seed(cfg.seed, STAGE, "batches")

    def batch(step: int):
        x, y = collate(train, batch_indices(len(train), f.micro_batch_size, seed, step), eot)
        return x.to(device), y.to(device)

    fixed = collate(test, list(range(min(len(test), f.micro_batch_size))), eot)
    return Data(
        batch,
        lambda m: evaluate_task(m, test, eot, f.micro_batch_size, device),
        (fixed[0].to(device), fixed[1].to(device)),
        replay_batches(cfg, gcfg, device) if f.replay > 0 else None,
    )


def replay_batches(cfg: Config, gcfg: GPTConfig, device: torch.device):
    """step -> a (x, y) batch of the pretraining train shard, seeded apart from the task's.

    Answer-only fine-tuning alone makes a small model forget how to continue text (on the
    default preset test bits/byte went from 0.32 before fine-tuning to 1.23 after); mixing
    in the pretraining objective ("replay") keeps it a language model.
    """
    tok_dir, f = cfg.path("tokenizer"), cfg.finetune
    meta = read_meta(tok_dir)
    train = read_shard(tok_dir / meta["splits"]["train"]["file"], meta["splits"]["train"])
    seed = derive_seed(cfg.seed, STAGE, "replay")

    def batch(step: int):
        x, y = sample_batch(train, seed, step, 0, f.micro_batch_size, gcfg.block_size)
        return x.to(device), y.to(device)

    return batch


def corpus_data(cfg: Config, gcfg: GPTConfig, device: torch.device) -> Data:
    """Continued language-model training on the pretrain shards, scored by val loss."""
    tok_dir, f = cfg.path("tokenizer"), cfg.finetune
    meta = read_meta(tok_dir)
    train = read_shard(tok_dir / meta["splits"]["train"]["file"], meta["splits"]["train"])
    val = read_shard(tok_dir / meta["splits"]["val"]["file"], meta["splits"]["val"])
    seed, T = derive_seed(cfg.seed, STAGE, "corpus"), gcfg.block_size
    fixed = [sample_batch(val, seed, 0, i, f.micro_batch_size, T) for i in range(4)]

    @torch.no_grad()
    def score(model):
        model.eval()
        losses = [model(x.to(device), y.to(device))[1].item() for x, y in fixed]
        model.train()
        return {"answer_loss": sum(losses) / len(losses), "task_accuracy": float("nan")}

    def batch(step: int):
        x, y = sample_batch(train, seed, step + 1, 0, f.micro_batch_size, T)
        return x.to(device), y.to(device)

    return Data(batch, score, (fixed[0][0].to(device), fixed[0][1].to(device)))


def train_method(
    method: str, cfg: Config, gcfg: GPTConfig, weights: dict, data: Data, device: torch.device
) -> GPT:
    """Fine-tune a fresh copy of the pretrained model with one method; return the result."""
    f = cfg.finetune
    torch.manual_seed(derive_seed(cfg.seed, STAGE, "dropout") % 2**63)  # same for all methods
    model = GPT(gcfg).to(device)
    model.load_state_dict(weights)
    model.train()
    adamw = configure_optimizer(model, f.weight_decay, f.lr, (0.9, 0.95), device.type)
    use_sam, use_swa = method in ("sam", "sam+swa"), method in ("swa", "sam+swa")
    sam = (
        SAM(model.parameters(), adamw, rho=f.sam_rho, adaptive=f.sam_adaptive) if use_sam else None
    )
    swa_begin = int(f.swa_start * f.max_steps)
    averaged = swa_sched = None
    if use_swa:
        avg_fn = get_ema_multi_avg_fn(f.swa_ema_decay) if f.swa_ema else None
        averaged = AveragedModel(model, multi_avg_fn=avg_fn)
        swa_sched = SWALR(adamw, swa_lr=f.swa_lr, anneal_epochs=f.swa_anneal_steps)
    progress = Progress(f"finetune[{method}]", total=f.max_steps, unit=" steps")
    for step in range(f.max_steps):
        in_swa = use_swa and step >= swa_begin
        if not in_swa:
            for group in adamw.param_groups:
                group["lr"] = f.lr * min(1.0, (step + 1) / max(f.warmup_steps, 1))
        x, y = data.batch(step)
        replay = data.replay_batch(step) if data.replay_batch else None

        def loss_fn(x=x, y=y, replay=replay) -> torch.Tensor:
            loss = model(x, y)[1]
            if replay is not None:  # task loss + replay weight x language-model loss
                loss = loss + f.replay * model(*replay)[1]
            return loss

        if sam is not None:
            loss = sam_step(model, sam, loss_fn, clip=f.grad_clip)
        else:
            loss = loss_fn()
            loss.backward()
            if f.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), f.grad_clip)
            adamw.step()
            adamw.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            raise LmforgeError(f"finetune[{method}]: loss is {loss.item()} at step {step}")
        if in_swa:
            averaged.update_parameters(model)
            swa_sched.step()
        progress.update(1)
    progress.close()
    if averaged is not None:  # LayerNorm only: no BatchNorm statistics to recompute
        model.load_state_dict(averaged.module.state_dict())
    return model


# The per-method numbers of the comparison that the bar chart shows (residuals and the
# convergence flag are in the JSON and the table, not worth a panel each).
PLOTTED = ("answer_loss", "task_accuracy", "sharpness", "hessian_max_eig", "hessian_min_eig")


def measure(model: GPT, data: Data, cfg: Config) -> dict[str, Any]:
    """Held-out answer loss, task accuracy, and the flatness of the final weights.

    Flatness on the fixed held-out batch: epsilon-sharpness, and the largest and smallest
    Hessian eigenvalues by Lanczos (`finetune.hessian_iters` Hessian-vector products for
    each), with their residuals ||Hv - lambda v|| / ||v|| and whether both converged.
    """
    from pipeline.eval.flatness import flatness_measures

    x, y = data.eval_batch

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        return m(x, y)[1]

    measures, _ = flatness_measures(model, loss_fn, cfg.finetune)
    return {**data.score(model), **measures}


def comparison_markdown(results: dict[str, dict[str, Any]], chosen: str) -> str:
    """The comparison table, then what its numbers show (`flatness_verdict`), as bullets."""
    from pipeline.eval.sharpness import flatness_verdict

    lines = [
        "| method | held-out answer loss | task accuracy | epsilon-sharpness "
        "| largest Hessian eig. | smallest Hessian eig. | Lanczos residuals (largest, smallest) "
        "| converged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, r in results.items():
        mark = " (moves on)" if m == chosen else ""
        lines.append(
            f"| {m}{mark} | {r['answer_loss']:.4f} | {r['task_accuracy']:.3f} | "
            f"{r['sharpness']:.4g} | {r['hessian_max_eig']:.4g} | {r['hessian_min_eig']:.4g} | "
            f"{r['hessian_max_residual']:.2g}, {r['hessian_min_residual']:.2g} | "
            f"{'yes' if r['hessian_converged'] else 'no'} |"
        )
    lines += ["", "What the numbers show (lower is flatter):", ""]
    lines += [f"- {sentence}" for sentence in flatness_verdict(results)]
    return "\n".join(lines) + "\n"


def run(cfg: Config) -> dict[str, Any]:
    """Fine-tune with the configured method (and the others when comparing)."""
    from pipeline.core.plots import bar_chart_png
    from pipeline.eval.sharpness import flatness_verdict
    from pipeline.ops.tracking import start_run

    f, device = cfg.finetune, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gcfg, weights = load_pretrained(cfg)
    data = (task_data if f.data == "task" else corpus_data)(cfg, gcfg, device)
    methods = list(METHODS) if f.compare else [f.method]
    results: dict[str, dict[str, float]] = {}
    with start_run(cfg, STAGE) as tracker:
        tracker.log_params({"seed": cfg.seed, STAGE: dataclasses.asdict(f)})
        with atomic_dir(cfg.path("finetune")) as out:
            for method in methods:
                model = train_method(method, cfg, gcfg, weights, data, device)
                results[method] = measure(model, data, cfg)
                log.info("finetune[%s]: %s", method, results[method])
                if method == f.method:
                    ckpt.save_weights(out / "model.safetensors", model.state_dict())
                if f.compare:  # every method's weights, for evaluate's sharpness table
                    (out / "methods" / method).mkdir(parents=True)
                    ckpt.save_weights(
                        out / "methods" / method / "model.safetensors", model.state_dict()
                    )
            atomic_write_json(out / "model_config.json", dataclasses.asdict(gcfg))
            save_resolved(cfg, out)
        # Reports last, once the weights they describe are in place.
        report = {"method": f.method, "compare": f.compare, "methods": results}
        report["flatness"] = flatness_verdict(results)  # the sentences finetune.md ends with
        table = comparison_markdown(results, f.method)
        atomic_write_text(cfg.path("reports") / f"{STAGE}.md", table)
        atomic_write_json(cfg.path("reports") / f"{STAGE}.json", report)
        for method, r in results.items():
            tracker.log_metrics({f"{method}.{k}": v for k, v in r.items()})
        tracker.log_artifact(cfg.path("reports") / f"{STAGE}.md")
        plotted = {m: {k: r[k] for k in PLOTTED} for m, r in results.items()}
        png = bar_chart_png(plotted, cfg.path("reports") / "plots" / "finetune_compare.png")
        if png:
            tracker.log_artifact(png, "plots")
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
