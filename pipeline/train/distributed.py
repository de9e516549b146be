"""Process-group set-up and model wrapping for one process, DDP or FSDP2, on CPU or CUDA.

torchrun is the engine: it starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK and
the rendezvous variables; this module only reads them. Without torchrun (plain
`python -m pipeline.stages.pretrain`) everything runs in one process with no process group.

Multi-node uses torchrun's own rendezvous, e.g. on each of 2 nodes:

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=$HEAD_NODE:29500 --rdzv_id=lmforge-run -m pipeline.stages.pretrain
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank among `world_size` and the device it computes on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    """`auto` picks CUDA when available; `cuda` without a GPU is an error naming the key."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("pretrain.device: 'cuda' requested but torch sees no CUDA device")
    return torch.device("cuda", local_rank)


def init(requested_device: str, strategy: str = "auto") -> DistInfo:
    """Join torchrun's process group if there is one (gloo on CPU, NCCL on CUDA).

    DDP and FSDP2 need a process group even for one process (`torchrun --nproc_per_node=1`
    with `pretrain.strategy=ddp`, a one-GPU check of the multi-GPU path): it is created
    from torchrun's environment, or, without torchrun, as a one-member group on an
    in-memory store.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local)
    needs_group = world > 1 or strategy in ("ddp", "fsdp")
    if needs_group and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:  # torchrun's rendezvous
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    exit_with_launcher()  # a torchrun worker must not outlive a SIGKILLed agent
    return DistInfo(rank, local, world, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_strategy(strategy: str, world_size: int) -> str:
    """`auto` is single for one process and DDP for more."""
    if strategy == "auto":
        return "ddp" if world_size > 1 else "single"
    if strategy == "single" and world_size > 1:
        raise ValueError(
            f"pretrain.strategy: 'single' cannot run with {world_size} processes; "
            "use ddp, fsdp or auto"
        )
    return strategy


def fsdp_mixed_precision(device: torch.device, dtype: str) -> MixedPrecisionPolicy | None:
    """FSDP2's policy: bf16 parameters for compute, fp32 gradient reduction (torchtitan's).

    Only where bf16 is the compute dtype (CUDA, `pretrain.dtype` not float32): on CPU, or
    in fp32, there is no policy and FSDP2 computes exactly what one process does.
    """
    if device.type != "cuda" or dtype == "float32":
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def wrap(
    model: nn.Module,
    strategy: str,
    info: DistInfo,
    *,
    compile: bool = False,
    mp_policy: MixedPrecisionPolicy | None = None,
    backend: str = "inductor",
) -> tuple[nn.Module, nn.parallel.DistributedDataParallel | None]:
    """Wrap for data parallelism and compile: (the module to call, the DDP wrapper or None).

    - single: `torch.compile(model)` when `compile`;
    - ddp: DDP replicates, then the DDP module is compiled as a whole (dynamo splits the
      graph at bucket boundaries so all-reduce overlaps backward). The compiled module is
      not a DDP instance, so the DDP wrapper is returned too: `no_sync()` lives there;
    - fsdp: each block is compiled in place, then sharded with `mp_policy`, then the root
      is sharded (torchtitan's order: compile per block before `fully_shard`, so FSDP2's
      hooks stay outside the compiled graphs); the root itself is not compiled.

    `backend` is torch.compile's (tests use "aot_eager": the same graphs, no C++ build).
    """
    if strategy == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return (torch.compile(ddp, backend=backend) if compile else ddp), ddp
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        mp = {"mp_policy": mp_policy} if mp_policy is not None else {}
        for block in model.blocks:  # shard block by block, so memory peaks per block
            if compile:
                block.compile(backend=backend)  # in place: the module stays a Block for fully_shard
            fully_shard(block, mesh=mesh, **mp)
        fully_shard(model, mesh=mesh, **mp)
        return model, None
    return (torch.compile(model, backend=backend) if compile else model), None


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over processes (identity in one process)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def any_process(flag: bool, device: torch.device) -> bool:
    """True if `flag` is set on any process, so all ranks take the same branch."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """`pretrain.deterministic`: the same bits on every re-run on a GPU, at some speed cost.

    - `torch.use_deterministic_algorithms(True)`: ops with only a nondeterministic CUDA
      kernel raise instead of running, the others pick their deterministic kernel;
    - `CUBLAS_WORKSPACE_CONFIG=:4096:8`, which cuBLAS needs for reproducible matmuls (set
      before the first CUDA matmul: the stage enters this before building the model);
    - cuDNN deterministic, no autotuning (`benchmark` off);
    - scaled-dot-product attention on the math backend only: the flash and
      memory-efficient backward passes accumulate with atomics in a varying order;
    - inductor's own deterministic mode (no on-device autotuning that changes numerics),
      where this torch has it; inductor already falls back to deterministic kernels for
      scatter-adds when deterministic algorithms are on.

    Eager CPU training is deterministic already; there the mode changes no result. Compiled
    CPU training is not (inductor's scatter-adds use atomics), so the stage enters this
    mode for it too (`pipeline.train.precision.deterministic_wanted`). The attention flags
    are global, so a compiled CPU run attends on the math backend as well; the stage times
    in benchmarks/README.md were measured so. Everything is restored on exit (tests run
    several stages in one process).
    """
    if not enabled:
        yield
        return
    cuda = torch.backends.cuda
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        cuda.flash_sdp_enabled(),
        cuda.mem_efficient_sdp_enabled(),
        cuda.cudnn_sdp_enabled(),
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    cuda.enable_flash_sdp(False)
    cuda.enable_mem_efficient_sdp(False)
    cuda.enable_cudnn_sdp(False)
    from torch._inductor import config as inductor

    inductor_before = getattr(inductor, "deterministic", None)
    if inductor_before is not None:
        inductor.deterministic = True
    try:
        yield
    finally:
        if inductor_before is not None:
            inductor.deterministic = inductor_before
        algorithms, cudnn_det, cudnn_bench, flash, mem, cudnn_sdp, workspace = before
        torch.use_deterministic_algorithms(algorithms)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_det, cudnn_bench
        cuda.enable_flash_sdp(flash)
        cuda.enable_mem_efficient_sdp(mem)
        cuda.enable_cudnn_sdp(cudnn_sdp)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


# --- Dying with the launcher (faults suite, row 1) ------------------------------------
# torchrun starts each worker in a session of its own, so a SIGKILL to the launcher's
# process group (`kill -9 -<pgid>`, a CI timeout) never reaches the workers, and a killed
# agent cannot forward it: the orphans would train on, writing checkpoints beside the
# re-run. `pipeline.ops.launch` puts its pid in LAUNCHER_PID_ENV for the workers.
LAUNCHER_PID_ENV = "LMFORGE_LAUNCHER_PID"
_watching: list[int] = []  # the parent pid watched, once per process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exit_with_launcher(poll_s: float = 0.5) -> None:
    """Under torchrun, SIGKILL this worker as soon as its parent (the agent) is gone.

    A daemon thread polls the parent pid (no prctl: portable, and immune to PDEATHSIG's
    firing when the forking *thread* exits). A launcher pid in the environment that is
    dead already (killed while this worker imported torch) kills the worker at once; one
    that is alive but not the parent belongs to an outer launcher and is ignored.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or _watching:
        return
    import signal
    import threading
    import time

    parent = os.getppid()
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if launcher.isdigit() and int(launcher) != parent and not _alive(int(launcher)):
        os.kill(os.getpid(), signal.SIGKILL)
    _watching.append(parent)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGKILL)  # as if the group's SIGKILL had reached us

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()
