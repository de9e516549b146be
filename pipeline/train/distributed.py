"""Process-group set-up and model wrapping for one process, DDP or FSDP2, on CPU or CUDA.

torchrun is the engine: it starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK and
the rendezvous variables; this module only reads them. Without torchrun (plain
`python -m pipeline.stages.pretrain`) everything runs in one process with no process group.

Multi-node uses torchrun's own rendezvous, e.g. on each of 2 nodes:

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=$HEAD_NODE:29500 --rdzv_id=lmforge-run -m pipeline.stages.pretrain
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


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


def init(requested_device: str) -> DistInfo:
    """Join torchrun's process group if there is one (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
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


def wrap(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """Wrap for data parallelism: DDP replicates, FSDP2 shards each block and the root."""
    if strategy == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for block in model.blocks:  # shard block by block, so memory peaks per block
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


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
