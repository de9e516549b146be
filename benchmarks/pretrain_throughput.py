"""Pretraining throughput, side by side in one process on one device, after warm-up.

    .venv/bin/python benchmarks/pretrain_throughput.py                   # CPU, the tiny preset
    python benchmarks/pretrain_throughput.py --device cuda --preset gpt2-124m --batch 16 32 \
        --out gpu/throughput.json

Three loops train the same architecture at the same micro-batch size and context:

- **nanogpt**: the nanoGPT-equivalent baseline (benchmarks/nanogpt_baseline.py: its model
  and its training step, bf16 autocast, torch.compile, fused AdamW) on batches already on
  the device;
- **bare**: lmforge's GPT (pipeline/model) with lmforge's optimizer in the same bare step
  on the same batches, so the difference from nanogpt is the model's cost;
- **stage**: the pretrain stage's loop (`pipeline.train.loop.build` + `fit`) on a
  random-token shard: data loading from the memory-mapped shard, the LR schedule,
  clipping, logging with host syncs at log boundaries, progress output. Its clock reads
  at the log boundaries; the final evaluation and checkpoint come after the last one, so
  checkpoints are outside the timed window.

Each figure is total tokens / total time over the steps after `--warmup` steps (compile
and allocator warm-up excluded). MFU is per device: 6N + 12·L·H·Q·T FLOPs per token
(pipeline.train.mfu) over the peak of the device's type for the dtype the matmuls run in
(bf16 on CUDA, fp32 on CPU: no peak, so no MFU). Needs only torch, numpy, tokenizers,
safetensors and pyyaml (runs on the GPU machine). Writes one JSON object to `--out`.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(REPO / "benchmarks"))

from nanogpt_baseline import NanoConfig, NanoGPT, train_steps  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.core.io import atomic_write_json, file_md5  # noqa: E402
from pipeline.core.names import META_FILE, TOKENIZER_FILE, shard_file  # noqa: E402
from pipeline.model.gpt import GPT, PRESETS, GPTConfig  # noqa: E402
from pipeline.text.shards import ShardWriter, text_bytes, token_dtype, write_meta  # noqa: E402
from pipeline.text.tokenizer import token_byte_lengths  # noqa: E402
from pipeline.train import distributed as dist_utils  # noqa: E402
from pipeline.train import loop  # noqa: E402
from pipeline.train.mfu import flops_per_token, mfu, peak_flops  # noqa: E402
from pipeline.train.optim import configure_optimizer  # noqa: E402
from pipeline.train.precision import compute_dtype  # noqa: E402

EOT = "<|endoftext|>"


def byte_level_tokenizer(vocab: int):
    """A byte-level BPE tokenizer.json of exactly `vocab` ids: EOT (id 0), 256 bytes, pairs.

    No merges: nothing is ever encoded with it. It gives the pretrain stage a real byte
    table (`token_byte_lengths`) for random-token shards of any vocabulary size, without
    training a BPE (GPT-2's 50,304 ids in a second).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 one-byte symbols
    pieces = [EOT, *alphabet]
    pieces += [a + b for a in alphabet for b in alphabet][: max(vocab - len(pieces), 0)]
    if len(pieces) != vocab:
        raise ValueError(f"vocab must be in [{1 + len(alphabet)}, {len(pieces)}], got {vocab}")
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])  # already id 0: marks it special (0 bytes of text)
    return tok


def make_token_dir(folder: Path, vocab: int, tokens: int, seed: int = 0) -> Path:
    """The tokenizer stage's outputs for random tokens: tokenizer.json, shards, meta.json.

    The pretrain stage reads this like the real thing (checked byte counts and md5s), so a
    GPU machine without pandas/GX can run it. Returns `folder`.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tok = byte_level_tokenizer(vocab)
    (folder / TOKENIZER_FILE).write_text(tok.to_str())
    table = token_byte_lengths(tok)  # (V,)
    splits = {}
    for split, n in (("train", tokens), ("val", max(tokens // 20, 50_000)), ("test", 50_000)):
        ids = rng.integers(1, vocab, size=n)  # never the separator
        path = folder / shard_file(split)
        with ShardWriter(path, token_dtype(vocab)) as w:
            w.write(ids)
        n_bytes = text_bytes(ids, table)
        splits[split] = {"file": path.name, "md5": file_md5(path), "tokens": n,
                         "bytes": n_bytes, "docs": 1, "bytes_per_token": n_bytes / n}  # fmt: skip
    meta = {"format_version": 1, "dtype": token_dtype(vocab).name, "vocab_size": vocab,
            "eot_id": 0, "special_tokens": [EOT], "splits": splits}  # fmt: skip
    write_meta(folder, meta)
    assert (folder / META_FILE).is_file()
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_batches(V: int, B: int, T: int, device: torch.device, n: int = 8) -> list:
    """`n` random (x, y) batches, each (B, T), already on the device (no loader cost)."""
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, V, (B, T), generator=g).to(device),
         torch.randint(0, V, (B, T), generator=g).to(device))
        for _ in range(n)
    ]  # fmt: skip


def timed(step_fn, steps: int, warmup: int, tokens_per_step: int, device) -> float:
    """Tokens/s over `steps` calls of step_fn after `warmup` calls: total tokens / time."""
    for _ in range(warmup):
        step_fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    sync(device)
    return steps * tokens_per_step / (time.perf_counter() - t0)


def nanogpt_loop(g: GPTConfig, B: int, args, device: torch.device) -> float:
    """nanoGPT's model and step (benchmarks/nanogpt_baseline.py)."""
    torch.manual_seed(0)
    nc = NanoConfig(g.block_size, g.vocab_size, g.n_layer, g.n_head, g.n_embd, 0.0, g.bias)
    model = NanoGPT(nc).to(device)
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)
    run = torch.compile(model) if args.compile else model
    batches = device_batches(g.vocab_size, B, g.block_size, device)
    bf16 = device.type == "cuda"
    params = list(model.parameters())
    return timed(
        lambda: train_steps(run, params, opt, batches, 1, 1, device.type, bf16),
        args.steps, args.warmup, B * g.block_size, device,
    )  # fmt: skip


def bare_loop(g: GPTConfig, B: int, args, device: torch.device) -> float:
    """lmforge's GPT and optimizer in the same bare step as nanogpt_loop."""
    torch.manual_seed(0)
    model = GPT(g).to(device)
    opt = configure_optimizer(model, 0.1, 6e-4, (0.9, 0.95), device.type)
    run = torch.compile(model) if args.compile else model
    batches = device_batches(g.vocab_size, B, g.block_size, device)
    bf16, params = device.type == "cuda", list(model.parameters())

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return run(x, y)[1]

    return timed(
        lambda: train_steps(loss_fn, params, opt, batches, 1, 1, device.type, bf16),
        args.steps, args.warmup, B * g.block_size, device,
    )  # fmt: skip


class BoundaryClock:
    """A tracker for `loop.fit` that notes when each log boundary's rows arrive.

    fit flushes the step rows (one host sync) at every `log_interval`, then evaluates and
    checkpoints; so the clock at the rows of step s-1 is the end of step s, before any
    evaluation or checkpoint of that boundary.
    """

    def __init__(self) -> None:
        self.at: dict[int, float] = {}  # steps done -> perf_counter

    def log_metrics(self, metrics, step: int = 0) -> None:
        if "loss" in metrics:
            self.at[step + 1] = time.perf_counter()


def stage_loop(g: GPTConfig, B: int, args, root: Path) -> float:
    """The pretrain stage's loop on random-token shards; tokens/s after the warm-up."""
    warmup, steps = args.warmup, args.steps - args.steps % args.warmup or args.warmup
    tok_dir = make_token_dir(
        root / "tok", g.vocab_size, tokens=max(2_000_000, 20 * B * g.block_size)
    )
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["paths"] |= {
        "tokenizer": str(tok_dir),
        "pretrain": str(root / "model"),
        "checkpoints": str(root / "ckpt"),
        "reports": str(root / "reports"),
    }
    params["tracking"]["enabled"] = False
    keys = ("n_layer", "n_head", "n_embd", "block_size", "pos_encoding", "activation", "bias")
    params["model"] |= {k: getattr(g, k) for k in keys} | {"dropout": 0.0}
    params["pretrain"] |= {
        "device": args.device, "strategy": "single", "max_steps": warmup + steps,
        "micro_batch_size": B, "tokens_per_step": B * g.block_size, "log_interval": warmup,
        "eval_interval": 10**9, "eval_batches": 2, "checkpoint_interval": 10**9,
        "resume": False, "compile": "on" if args.compile else "off", "deterministic": False,
    }  # fmt: skip
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config(root)
    trainer = loop.build(cfg, dist_utils.init(args.device, "single"))
    clock = BoundaryClock()
    loop.fit(trainer, clock)  # the final eval + checkpoint come after the last boundary
    return steps * B * g.block_size / (clock.at[warmup + steps] - clock.at[warmup])


def measure(g: GPTConfig, B: int, args, device: torch.device, root: Path) -> dict:
    """The three loops at micro-batch B: tokens/s and MFU each, and their ratios."""
    n = GPT(g).num_params()
    peak = peak_flops(device, compute_dtype(device, "auto"))
    out: dict = {"batch": B}
    for name, fn in (("nanogpt", nanogpt_loop), ("bare", bare_loop)):
        out[name] = {"tokens_per_s": fn(g, B, args, device)}
        release(device)
    out["stage"] = {"tokens_per_s": stage_loop(g, B, args, root / f"stage_b{B}")}
    release(device)
    for name in ("nanogpt", "bare", "stage"):
        tok_s = out[name]["tokens_per_s"]
        out[name]["mfu"] = mfu(tok_s, g, n, peak, world_size=1) if peak else None
        print(f"B={B:3d} {name:8s} {tok_s:12,.0f} tokens/s  MFU {fmt_pct(out[name]['mfu'])}")
    out["bare_over_nanogpt"] = out["bare"]["tokens_per_s"] / out["nanogpt"]["tokens_per_s"]
    out["stage_over_bare"] = out["stage"]["tokens_per_s"] / out["bare"]["tokens_per_s"]
    return out


def fmt_pct(x: float | None) -> str:
    return "n/a (no peak for this device)" if x is None else f"{100 * x:.1f}%"


def release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, nargs="+", default=[16])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if device.type == "cuda":  # as the stage does
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    g = PRESETS[args.preset]
    n = GPT(g).num_params()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.preset}: {n / 1e6:.2f}M params, T={g.block_size}, {name}, compile={args.compile}")
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(g, B, args, device, Path(tmp)) for B in args.batch]
    report = {
        "device": name, "torch": torch.__version__, "preset": args.preset,
        "block_size": g.block_size, "params": n, "flops_per_token": flops_per_token(g, n),
        "compile": args.compile, "steps": args.steps, "warmup": args.warmup, "results": results,
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.out:
        atomic_write_json(args.out, report)


if __name__ == "__main__":
    main()
