"""The GPU path, checked on CPU where the behaviour exists there (issue 14).

- DDP + torch.compile all-reduces once per optimizer step, not once per micro-step (a comm
  hook counts the all-reduces, 2 gloo processes under torchrun);
- dropout masks differ by rank, weights stay identical;
- FSDP2 applies its MixedPrecisionPolicy and compiles each block before sharding;
- `strategy=ddp` runs with one process (torchrun --nproc_per_node=1, and without torchrun);
- MFU per device and per dtype against the closed form; `compile=on` accepted;
- `pretrain.deterministic` recorded, restored, and the same bits on CPU;
- bf16 logits under autocast, the same fp32 loss bits; one contiguous (B, T+1) batch buffer;
- fine-tuning honours `pretrain.device` and checks the loss without a per-step sync.

The multi-process checks run this file as a torchrun worker:
    torchrun --standalone --nproc_per_node=2 tests/test_gpu_path.py <check> <out_dir>
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # a torchrun worker: make the project importable
    sys.path.insert(0, str(REPO))

from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.model.gpt import GPT, PRESETS, GPTConfig  # noqa: E402
from pipeline.train import distributed as dist_utils  # noqa: E402
from pipeline.train.mfu import flops_per_token, mfu, peak_flops_for_name  # noqa: E402
from pipeline.train.resume import dropout_seed  # noqa: E402

TINY_GPT = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)


# --------------------------------------------------------------------------------------
# torchrun workers (run in their own processes; each rank writes <out>/<check>_<rank>.json)
# --------------------------------------------------------------------------------------


def _micro_batches(step: int, rank: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    V, T = TINY_GPT.vocab_size, TINY_GPT.block_size
    return [
        (torch.randint(0, V, (2, T), generator=g), torch.randint(0, V, (2, T), generator=g))
        for _ in range(n)
    ]


def _shutdown_when_idle() -> None:
    """Destroy the process group once gloo's threads have nothing left to free.

    A gloo thread frees a finished all_gather's tensors, which takes the GIL. Destroying
    the group joins that thread while holding the GIL, and if the free is still pending
    then both wait forever. That hung one worker run in three on a 2-core VM (py-spy:
    ~ProcessGroupGloo in join, the gloo thread in ~AsyncAllgatherWork waiting for the
    GIL). The barrier runs after every earlier collective, and gc frees what still
    refers to the group.
    """
    import torch.distributed as dist

    dist.barrier()
    gc.collect()
    dist_utils.shutdown()


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    import torch.distributed as dist

    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def worker_ddp_compile(out: Path) -> dict:
    """3 optimizer steps x 2 micro-steps of the real Trainer.train_step on torch.compile(DDP)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from pipeline.train.loop import Trainer
    from pipeline.train.optim import configure_optimizer

    info = dist_utils.init("cpu", "ddp")
    cfg = load_config(REPO, "ci")
    torch.manual_seed(0)  # the same init on both ranks (DDP broadcasts rank 0's anyway)
    raw = GPT(TINY_GPT)
    # aot_eager: dynamo's graphs and DDP's bucket splitting as with inductor, without its
    # C++ build (inductor took ~5 min here on 2 shared cores).
    model, ddp = dist_utils.wrap(raw, "ddp", info, compile=True, backend="aot_eager")
    buckets: list[int] = []

    def counting_hook(state, bucket):  # no annotations: DDP rejects string ones
        buckets.append(bucket.index())  # one call per bucket all-reduce
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, counting_hook)
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    trainer = Trainer(cfg, info, model, raw, opt, None, None, None, 2, [], {}, "")
    per_step = []
    torch.manual_seed(dropout_seed(cfg.seed, "pretrain", info.rank))
    for step in range(3):
        before = len(buckets)
        trainer.train_step(_micro_batches(step, info.rank, 2), step)
        per_step.append(buckets[before:])
    flat = torch.cat([p.detach().flatten() for p in raw.parameters()])  # (N,)
    same_weights = all(torch.equal(flat, other) for other in _gather(flat))
    # Dropout masks: seeded per rank as pipeline.train.loop.build does.
    torch.manual_seed(dropout_seed(cfg.seed, "pretrain", info.rank))
    mask = (torch.nn.functional.dropout(torch.ones(512), 0.5, training=True) != 0).float()
    masks = _gather(mask)
    result = {
        "compiled": type(model).__name__,
        "per_step": per_step,
        "same_weights": same_weights,
        "masks_differ": not torch.equal(masks[0], masks[1]),
    }
    del trainer, opt, model, ddp  # DDP's reducer holds the process group: free it first
    _shutdown_when_idle()
    return result


def worker_fsdp(out: Path) -> dict:
    """FSDP2 with the bf16/fp32 policy: compute dtype seen by a block, gradient dtype."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

    info = dist_utils.init("cpu", "fsdp")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    torch.manual_seed(0)
    compiled_raw = GPT(TINY_GPT)
    # compile=True: compilation is lazy, so this only checks the wrapping order cheaply.
    compiled, _ = dist_utils.wrap(
        compiled_raw, "fsdp", info, compile=True, mp_policy=policy, backend="aot_eager"
    )
    blocks_compiled = [b._compiled_call_impl is not None for b in compiled.blocks]
    blocks_sharded = [isinstance(b, FSDPModule) for b in compiled.blocks]
    torch.manual_seed(0)
    raw = GPT(TINY_GPT)
    model, _ = dist_utils.wrap(raw, "fsdp", info, compile=False, mp_policy=policy)
    seen: list[str] = []
    model.blocks[0].attn.c_attn.register_forward_pre_hook(
        lambda mod, args: seen.append(str(mod.weight.dtype))
    )
    x, y = _micro_batches(0, info.rank, 1)[0]
    _, loss = model(x, y)
    loss.backward()
    grad_dtypes = sorted({str(p.grad.dtype) for p in model.parameters()})
    # The dtype gradients are reduced in (FSDP2's per-parameter record of the policy).
    group = model.blocks[0]._get_fsdp_state()._fsdp_param_group
    reduce_dtypes = sorted({str(fp.reduce_dtype) for fp in group.fsdp_params})
    param_dtypes = sorted({str(p.dtype) for p in model.parameters()})
    result = {
        "blocks_compiled": blocks_compiled,
        "blocks_sharded": blocks_sharded,
        "root_sharded": isinstance(compiled, FSDPModule),
        "root_compiled": hasattr(compiled, "_orig_mod"),
        "compute_dtype": seen,
        "grad_dtypes": grad_dtypes,
        "reduce_dtypes": reduce_dtypes,
        "param_dtypes": param_dtypes,
    }
    del model, compiled, group
    _shutdown_when_idle()
    return result


WORKERS = {"ddp_compile": worker_ddp_compile, "fsdp": worker_fsdp}


def run_workers(procs, tmp_path: Path, check: str, nproc: int = 2) -> list[dict]:
    """Run WORKERS[check] under torchrun; each rank's result dict, rank order."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(Path(__file__)),
        check,
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = procs.start(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output.decode()[-4000:]
    return [json.loads((tmp_path / f"{check}_{r}.json").read_text()) for r in range(nproc)]


# --------------------------------------------------------------------------------------
# 1, 5. DDP + compile: one all-reduce per bucket per optimizer step; dropout per rank
# --------------------------------------------------------------------------------------


def test_ddp_compile_all_reduces_once_per_step_and_dropout_differs_by_rank(procs, tmp_path):
    results = run_workers(procs, tmp_path, "ddp_compile")
    for r in results:
        assert r["compiled"] == "OptimizedModule"  # the product path: torch.compile(ddp)
        for buckets in r["per_step"]:
            # Every bucket once per step (2 micro-steps: once per micro-step was the bug).
            assert buckets and sorted(buckets) == sorted(set(buckets)), r["per_step"]
        assert r["same_weights"]  # the one all-reduce per step kept the replicas equal
    assert results[0]["masks_differ"] and results[1]["masks_differ"]


def test_dropout_seed_differs_by_rank_and_keeps_rank_0():
    from pipeline.core.seeding import derive_seed

    seeds = {dropout_seed(7, "pretrain", r) for r in range(8)}
    assert len(seeds) == 8
    # One process keeps the seed it always had: CPU results stay bit-identical.
    assert dropout_seed(7, "pretrain", 0) == derive_seed(7, "pretrain", "dropout") % 2**63


# --------------------------------------------------------------------------------------
# 9. FSDP2: bf16 params / fp32 reduce, blocks compiled before fully_shard
# --------------------------------------------------------------------------------------


def test_fsdp_mixed_precision_policy_and_wrapping_order(procs, tmp_path):
    for r in run_workers(procs, tmp_path, "fsdp"):
        assert r["blocks_compiled"] == [True, True] and r["blocks_sharded"] == [True, True]
        assert r["root_sharded"] and not r["root_compiled"]
        assert r["compute_dtype"] == ["torch.bfloat16"]  # params cast for the forward
        assert r["reduce_dtypes"] == ["torch.float32"]  # gradients reduced in fp32
        assert r["grad_dtypes"] == r["param_dtypes"] == ["torch.float32"]  # fp32 master


def test_fsdp_policy_only_where_bf16_is_the_compute_dtype():
    policy = dist_utils.fsdp_mixed_precision(torch.device("cuda", 0), "auto")
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert dist_utils.fsdp_mixed_precision(torch.device("cuda", 0), "float32") is None
    assert dist_utils.fsdp_mixed_precision(torch.device("cpu"), "auto") is None


# --------------------------------------------------------------------------------------
# 3. MFU per device and per dtype
# --------------------------------------------------------------------------------------


def test_mfu_is_per_device_and_per_dtype():
    cfg = PRESETS["gpt2-124m"]
    L, H, Q, T = 12, 12, 64, 1024
    per_token = 6 * 123_587_328 + 12 * L * H * Q * T  # N without position embeddings
    assert flops_per_token(cfg) == per_token
    # 8 devices at 400k tokens/s each: the global rate over 8 devices' peak.
    value = mfu(8 * 400e3, cfg, None, 989e12, world_size=8)
    assert value == pytest.approx(400e3 * per_token / 989e12, rel=1e-12)
    assert 0.3 < value < 0.4
    with pytest.raises(ValueError, match="world_size"):
        mfu(1.0, cfg, None, 989e12, world_size=0)
    bf16 = torch.bfloat16
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", bf16) == 989e12
    assert peak_flops_for_name("NVIDIA H200", bf16) == 989e12
    assert peak_flops_for_name("NVIDIA H200 NVL", bf16) == 835e12
    assert peak_flops_for_name("NVIDIA H200 NVL", torch.float32, tf32=False) == 60e12
    assert peak_flops_for_name("NVIDIA H200", torch.float32, tf32=False) == 66.9e12
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", torch.float32, tf32=True) == 494.5e12


# --------------------------------------------------------------------------------------
# 4. compile=on/off
# --------------------------------------------------------------------------------------


def test_compile_accepts_on_off_true_false(project):
    for given, read in (("on", "on"), ("off", "off"), ("true", "on"), ("false", "off")):
        cfg = load_config(project, overrides=[f"pretrain.compile={given}"])
        assert cfg.pretrain.compile == read
    text = re.sub(r"(?m)^  compile: \S+", "  compile: on", (project / "params.yaml").read_text())
    (project / "params.yaml").write_text(text)  # a bare YAML `on` in the file
    assert load_config(project).pretrain.compile == "on"
    with pytest.raises(ConfigError, match=r"pretrain\.compile"):
        load_config(project, overrides=["pretrain.compile=1"])
    with pytest.raises(ConfigError, match=r"pretrain\.compile"):
        load_config(project, overrides=["pretrain.compile=maybe"])


# --------------------------------------------------------------------------------------
# 7. bf16 logits with targets, fp32 loss; CPU fp32 bits unchanged
# --------------------------------------------------------------------------------------


def test_loss_upcasts_inside_cross_entropy_and_keeps_fp32_bits():
    torch.manual_seed(0)
    model = GPT(TINY_GPT).eval()
    x, y = _micro_batches(0, 0, 1)[0]
    V = TINY_GPT.vocab_size
    # fp32: the loss is bit-identical to cross-entropy on the fp32 logits (today's path).
    logits, loss = model(x, y)
    reference = torch.nn.functional.cross_entropy(model(x)[0].view(-1, V), y.view(-1))
    assert logits.dtype == torch.float32 and torch.equal(loss, reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits16, loss16 = model(x, y)
        scoring_logits, _ = model(x)
    assert logits16.dtype == torch.bfloat16  # no fp32 (B, T, V) copy handed back
    assert scoring_logits.dtype == torch.float32  # scoring/sampling still get fp32
    assert loss16.dtype == torch.float32
    fp32_logits_loss = torch.nn.functional.cross_entropy(scoring_logits.view(-1, V), y.view(-1))
    assert loss16.item() == pytest.approx(fp32_logits_loss.item(), rel=1e-6)
    assert loss16.item() == pytest.approx(reference.item(), rel=2e-2)  # bf16 vs fp32 model


# --------------------------------------------------------------------------------------
# 8. one contiguous (B, T+1) window per micro-batch, sliced on the device
# --------------------------------------------------------------------------------------


def test_batches_travel_as_one_contiguous_window():
    import queue
    import threading

    import numpy as np

    from pipeline.train.batches import BatchStream, sample_batch

    tokens = np.arange(5000, dtype=np.uint16) % 300
    kw = dict(seed=3, batch=4, block=16, accum=2, rank=0, world=1, device=torch.device("cpu"))
    stream = BatchStream(tokens, **kw, pin=False)
    out: queue.Queue = queue.Queue()
    stream._produce(0, 2, out, threading.Event())
    items = [out.get_nowait() for _ in range(4)]
    for w in items:
        assert isinstance(w, torch.Tensor) and w.shape == (4, 17) and w.is_contiguous()
    assert not BatchStream(tokens, **kw).pin  # on CPU: nothing to pin
    steps = list(BatchStream(tokens, **kw).steps(0, 2))
    for step, micro in enumerate(steps):
        for m, (x, y) in enumerate(micro):
            ex, ey = sample_batch(tokens, 3, step, m, 4, 16)
            assert torch.equal(x, ex) and torch.equal(y, ey)
            assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    if torch.cuda.is_available():  # the pinned path, where there is a GPU
        stream = BatchStream(tokens, **{**kw, "device": torch.device("cuda")})
        stream._produce(0, 1, out, threading.Event())
        assert out.get_nowait().is_pinned()


# --------------------------------------------------------------------------------------
# 11. fine-tuning: pretrain.device, loss checked in batches
# --------------------------------------------------------------------------------------


def test_finetune_honours_pretrain_device_and_names_the_bad_step(project):
    from pipeline.core.errors import LmforgeError
    from pipeline.train.finetune import check_finite, finetune_device

    cfg = load_config(project, overrides=["pretrain.device=cpu"])
    assert finetune_device(cfg) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"pretrain\.device"):
            finetune_device(load_config(project, overrides=["pretrain.device=cuda"]))
    losses = [torch.tensor(1.0), torch.tensor(0.5), torch.tensor(float("nan"))]
    with pytest.raises(LmforgeError, match=r"finetune\[sam\]: loss is nan at step 42"):
        check_finite("sam", 40, losses)
    check_finite("sam", 0, losses[:2])


if __name__ == "__main__":
    check, out_dir = sys.argv[1], Path(sys.argv[2])
    result = WORKERS[check](out_dir)
    rank = int(os.environ.get("RANK", "0"))
    (out_dir / f"{check}_{rank}.json").write_text(json.dumps(result))
