"""CPU throughput levers of pretraining, each against a baseline measured in the same run.

    .venv/bin/python benchmarks/cpu_levers.py                     # the default preset's shape
    .venv/bin/python benchmarks/cpu_levers.py --steps 30 --out /tmp/cpu_levers.json
    .venv/bin/python benchmarks/cpu_levers.py --shape 4x128       # the shape of the first table
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \
        .venv/bin/python benchmarks/cpu_levers.py --only precision   # an AVX2-only CPU

Issue 15 asks which CPU settings make the `default` preset train faster: torch.compile
(gcc is present), the thread count, bf16 autocast on CPU (the stage runs fp32 on CPU), the
micro-batch shape, and what a longer context (`block_size` 256, whole stories) costs.
Each lever changes one setting of the baseline (lmforge's GPT at the default preset's
shape, eager fp32, micro-batch 32 x 128, all cores) and runs the same bare training step
as `pretrain_throughput.py` (forward, backward, clip, AdamW) on random batches in memory.
`--only precision` runs the four rows of fp32/bf16 x eager/compile that `pretrain.dtype: auto`
and `pretrain.compile: auto` choose between (`pipeline/train/precision.py`); the environment
variables above make oneDNN, MKL, ATen and inductor use only the instructions of an older
CPU (no AVX-512, no bf16), to measure what `auto` would meet there.
Every figure is total tokens / total time over `--steps` steps after `--warmup` untimed
ones (compile and allocator warm-up excluded); the ratio is against the baseline, which
runs first and again last, so drift of a shared machine shows as two baseline figures.
Not a test: it prints figures for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from nanogpt_baseline import train_steps  # noqa: E402
from pretrain_throughput import device_batches, timed  # noqa: E402

from pipeline.core.io import atomic_write_json  # noqa: E402
from pipeline.model.gpt import GPT, GPTConfig  # noqa: E402
from pipeline.train.optim import configure_optimizer  # noqa: E402

# Environment variables that cap the instruction sets torch's CPU libraries use.
ISA_VARS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


@dataclass(frozen=True)
class Setting:
    """One point of the grid: what the bare step runs with."""

    name: str
    threads: int
    compile: bool = False
    bf16: bool = False
    batch: int = 32
    block_size: int = 128


def model_shape(vocab: int, block_size: int, shape: str) -> GPTConfig:
    """`shape` "LxW": L layers of width W, 4 heads (the default preset's is 1x256; the first
    table in benchmarks/README.md was measured at its earlier 4x128)."""
    n_layer, n_embd = (int(n) for n in shape.lower().split("x"))
    return GPTConfig(
        vocab_size=vocab,
        block_size=block_size,
        n_layer=n_layer,
        n_head=4,
        n_embd=n_embd,
        dropout=0.0,
    )


def tokens_per_s(s: Setting, vocab: int, steps: int, warmup: int, shape: str) -> float:
    """The bare step's tokens/s under setting `s` (torch's thread count set first)."""
    torch.set_num_threads(s.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = GPT(model_shape(vocab, s.block_size, shape))
    opt = configure_optimizer(model, 0.1, 3e-3, (0.9, 0.95), "cpu")
    run = torch.compile(model) if s.compile else model
    batches = device_batches(vocab, s.batch, s.block_size, device)
    params = list(model.parameters())

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return run(x, y)[1]

    return timed(
        lambda: train_steps(loss_fn, params, opt, batches, 1, 1, "cpu", s.bf16),
        steps, warmup, s.batch * s.block_size, device,
    )  # fmt: skip


def grid(cores: int, only: str | None) -> list[Setting]:
    """The baseline, then one lever at a time, the promising pair, and the baseline again;
    `only="precision"`: the baseline, compile, bf16 and both."""
    base = Setting("baseline: eager fp32, B=32, T=128", cores)
    if only == "precision":
        return [
            base,
            replace(base, name="torch.compile", compile=True),
            replace(base, name="bf16 autocast", bf16=True),
            replace(base, name="torch.compile + bf16", compile=True, bf16=True),
        ]
    return [
        base,
        replace(base, name="threads=1", threads=1),
        replace(base, name="torch.compile", compile=True),
        replace(base, name="bf16 autocast", bf16=True),
        replace(base, name="torch.compile + bf16", compile=True, bf16=True),
        replace(base, name="micro-batch 16", batch=16),
        replace(base, name="micro-batch 64", batch=64),
        replace(base, name="block_size 256 (B=16: same tokens/step)", batch=16, block_size=256),
        replace(base, name="baseline again"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=2048, help="the default preset's")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--shape", default="1x256", help="layers x width (4 heads)")
    parser.add_argument("--only", choices=["precision"], default=None, help="a subset of rows")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    cores = torch.get_num_threads()
    isa = {k: os.environ[k] for k in ISA_VARS if k in os.environ}
    print(f"torch {torch.__version__}, {cores} threads by default, shape {args.shape}, {isa}")
    rows, base = [], None
    for s in grid(cores, args.only):
        tok_s = tokens_per_s(s, args.vocab, args.steps, args.warmup, args.shape)
        base = base or tok_s
        rows.append({**s.__dict__, "tokens_per_s": tok_s, "vs_baseline": tok_s / base})
        print(f"{s.name:45s} {tok_s:10,.0f} tokens/s  x{tok_s / base:.2f}", flush=True)
    report = {
        "torch": torch.__version__,
        "threads_default": cores,
        "shape": args.shape,
        "isa_limits": isa,
        "rows": rows,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        atomic_write_json(args.out, report)


if __name__ == "__main__":
    main()
