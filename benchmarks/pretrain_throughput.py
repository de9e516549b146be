"""Pretraining throughput: the stage's training loop against a bare PyTorch loop.

    .venv/bin/python benchmarks/pretrain_throughput.py                 # CPU, the default model
    python benchmarks/pretrain_throughput.py --device cuda --preset gpt2-124m --batch 16

Both loops train the same model shape on the same batch size in this process:

- **bare**: random token batches already in memory, forward, backward, AdamW step, nothing
  else (the nanoGPT bench.py loop);
- **stage**: `pipeline.stages.pretrain.run` on a random-token shard, so data loading from a
  memory-mapped shard, the LR schedule, gradient clipping, logging (with host syncs at log
  boundaries only), checkpointing every `--ckpt-every` steps and progress output all count.

It prints tokens/s for both and their ratio (CPU target: the stage costs <= 5%), and on
CUDA the MFU (6N + 12·L·H·Q·T flops per token over the device's bf16 peak).
Needs only torch, numpy, tokenizers, safetensors and pyyaml (runs on the GPU machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.model.gpt import GPT, PRESETS, GPTConfig  # noqa: E402
from pipeline.stages import pretrain  # noqa: E402
from pipeline.text.shards import ShardWriter, token_dtype, write_meta  # noqa: E402
from pipeline.train.mfu import mfu, peak_flops  # noqa: E402
from pipeline.train.optim import configure_optimizer  # noqa: E402


def make_shards(folder: Path, vocab: int, tokens: int, seed: int = 0) -> None:
    """Random-token train/val shards and their meta.json, as the tokenizer stage writes them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", tokens), ("val", max(tokens // 20, 100_000))):
        with ShardWriter(folder / f"{split}.bin", token_dtype(vocab)) as w:
            w.write(rng.integers(0, vocab - 1, size=n))
        splits[split] = {"file": f"{split}.bin", "tokens": n, "bytes": 4 * n, "docs": 1}
    write_meta(
        folder,
        {
            "format_version": 1,
            "dtype": token_dtype(vocab).name,
            "vocab_size": vocab,
            "eot_id": vocab - 1,
            "special_tokens": ["<|endoftext|>"],
            "splits": splits,
        },
    )


def bare_loop(gcfg: GPTConfig, batch: int, steps: int, device: torch.device, dtype) -> float:
    """Tokens/s of forward + backward + AdamW on in-memory batches, nothing else."""
    torch.manual_seed(0)
    model = GPT(gcfg).to(device)
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), device.type)
    x = torch.randint(0, gcfg.vocab_size, (batch, gcfg.block_size), device=device)
    y = torch.randint(0, gcfg.vocab_size, (batch, gcfg.block_size), device=device)
    auto = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    compiled = torch.compile(model) if device.type == "cuda" else model
    warmup = max(steps // 5, 3)
    for i in range(steps + warmup):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        with auto:
            _, loss = compiled(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return batch * gcfg.block_size * steps / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def stage_loop(args, gcfg: GPTConfig, root: Path) -> float:
    """Tokens/s of the stage's loop, from its per-window measurements after the first."""
    tok_dir = root / "tok"
    make_shards(tok_dir, gcfg.vocab_size, tokens=5_000_000)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["paths"] |= {
        "tokenizer": str(tok_dir),
        "pretrain": str(root / "model"),
        "checkpoints": str(root / "ckpt"),
        "reports": str(root / "reports"),
    }
    params["tracking"]["enabled"] = False
    params["model"] |= {
        k: getattr(gcfg, k)
        for k in ("n_layer", "n_head", "n_embd", "block_size", "pos_encoding", "activation", "bias")
    }
    params["model"]["dropout"] = 0.0
    tokens_per_step = args.batch * gcfg.block_size
    warmup = max(args.steps // 5, 3)
    params["pretrain"] |= {
        "device": args.device,
        "max_steps": args.steps + warmup,
        "micro_batch_size": args.batch,
        "tokens_per_step": tokens_per_step,
        "log_interval": warmup,
        "eval_interval": 10**9,
        "checkpoint_interval": args.ckpt_every,
        "resume": False,
        "compile": "auto",
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config(root)
    pretrain.run(cfg)
    history = json.loads((root / "reports" / "plots" / "pretrain_loss.json").read_text())
    assert len(history) == args.steps + warmup
    rows = pretrain_rows(root)
    return float(np.mean([r["tokens_per_s"] for r in rows[warmup:]]))


def pretrain_rows(root: Path) -> list[dict]:
    """Per-step rows (with tokens/s) from the newest checkpoint's history."""
    from pipeline.train.checkpoint import list_checkpoints, read_state

    return read_state(list_checkpoints(root / "ckpt")[-1]).history


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default=None, help="model preset (default: params.yaml)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ckpt-every", type=int, default=50)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.preset:
        gcfg = PRESETS[args.preset]
    else:
        gcfg = GPTConfig.from_params(
            load_config(REPO).model, load_config(REPO).tokenizer.vocab_size
        )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = GPT(gcfg).num_params()
    print(f"model: {n / 1e6:.2f}M params, T={gcfg.block_size}, batch {args.batch}, {device}")
    # Bare runs before and after the stage, averaged, so machine load drifts cancel out.
    bare_runs = [bare_loop(gcfg, args.batch, args.steps, device, dtype)]
    with tempfile.TemporaryDirectory() as tmp:
        stage = stage_loop(args, gcfg, Path(tmp))
    bare_runs.append(bare_loop(gcfg, args.batch, args.steps, device, dtype))
    bare = float(np.mean(bare_runs))
    print(f"bare loop : {bare:,.0f} tokens/s")
    print(
        f"stage loop: {stage:,.0f} tokens/s  (stage/bare = {stage / bare:.3f}, "
        f"overhead {100 * (1 - stage / bare):.1f}%)"
    )
    peak = peak_flops(device, dtype)
    if peak:
        bare_mfu, stage_mfu = mfu(bare, gcfg, n, peak), mfu(stage, gcfg, n, peak)
        print(f"MFU: bare {100 * bare_mfu:.1f}%, stage {100 * stage_mfu:.1f}%")
    print(
        json.dumps(
            {
                "bare_tokens_per_s": bare,
                "stage_tokens_per_s": stage,
                "ratio": stage / bare,
                "params": n,
                **dataclasses.asdict(gcfg),
            }
        )
    )


if __name__ == "__main__":
    main()
