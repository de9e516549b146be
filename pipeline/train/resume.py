"""Which checkpoint a pretraining run may resume: the training digest and the resume itself.

A checkpoint continues a trajectory only if everything that shapes the trajectory is the
same: the train/val shards and the tokenizer (`data_digests`), the seed, the model params,
the pretrain params but those in `NOT_TRAJECTORY`, the world size, the device, and the
compute dtype and compilation `auto` resolved to (`digest_inputs`). `training_digest` hashes
them; `resume_from` loads the newest checkpoint made under this run's digest and logs, for
each one it skips, what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import Config
from pipeline.core.io import file_md5
from pipeline.core.names import TOKENIZER_FILE
from pipeline.core.seeding import derive_seed
from pipeline.train import checkpoint as ckpt
from pipeline.train.precision import compile_enabled, compute_dtype, dtype_name

log = logging.getLogger(__name__)

# Pretrain params that do not change the trajectory (weights, optimizer state, losses):
# how often to log, evaluate or checkpoint, how many checkpoints to keep, whether to
# resume, and the process count asked of torchrun (the real world size is hashed
# instead). Evaluation does not touch the trajectory: it runs without dropout and draws
# its batches from a numpy generator of its own, never from torch's RNG. A checkpoint made
# under other values of these resumes fine, and the final evaluation is always redone with
# this run's `eval_batches` (see `pipeline.train.loop.fit`). `device` is replaced by the
# device actually used.
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
        "tokenizer_md5": file_md5(tok_dir / TOKENIZER_FILE),
    }


def digest_inputs(
    cfg: Config, data: dict[str, str], world_size: int, device: str
) -> dict[str, Any]:
    """Everything that shapes the trajectory, flat (`pretrain.lr`, `data.train_shard_md5`).

    The seed, every model param, the pretrain params but `NOT_TRAJECTORY` (max_steps is in:
    the cosine schedule depends on it), the data (`data_digests`: a change of
    `synthesize.synthetic_share` changes the train shard), the world size, the device, and
    what `pretrain.dtype` and `pretrain.compile` resolve to on it.
    """
    pretrain = {
        k: v for k, v in dataclasses.asdict(cfg.pretrain).items() if k not in NOT_TRAJECTORY
    }
    groups = {"model": dataclasses.asdict(cfg.model), "pretrain": pretrain, "data": data}
    flat: dict[str, Any] = {f"{g}.{k}": v for g, d in groups.items() for k, v in d.items()}
    # `auto` is bf16 and compiled on one CPU, fp32 and eager on another: hash what it
    # resolves to, as the report records it (a compiled run is its own trajectory).
    dev = torch.device(device)
    dtype = compute_dtype(dev, cfg.pretrain.dtype)
    return {
        "seed": cfg.seed,
        **flat,
        "world_size": world_size,
        "device": device,
        "compute_dtype": dtype_name(dtype),
        "compiled": compile_enabled(dev, cfg.pretrain.compile, dtype),
    }


def training_digest(inputs: dict[str, Any]) -> str:
    """Digest of `digest_inputs`; a checkpoint is loaded only by a run with the same one."""
    blob = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resume_from(
    folder: Path,
    digest: str,
    inputs: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> ckpt.TrainState | None:
    """Load the newest checkpoint in `folder` made under `digest` into model and optimizer.

    Returns its state (step, history; the RNG is restored too), or None: train from step 0.
    A checkpoint made under another digest (other data, tokenizer, config, world size or
    device) is never loaded, whatever its step: it belongs to another trajectory. Each one
    skipped is logged with both digests and the `inputs` that differ.
    """
    found = ckpt.list_checkpoints(folder)
    for path in reversed(found):  # newest first
        state = ckpt.read_state(path)
        if state.config_digest == digest:
            state = ckpt.load(path, model, optimizer)
            msg = "pretrain: resumed from %s at step %d (training digest %s)"
            log.info(msg, path, state.step, digest)
            return state
        log.warning(
            "pretrain: not resuming from %s: it was made under training digest %s, this "
            "run's is %s (%s)",
            path,
            state.config_digest,
            digest,
            _differences(state.digest_inputs, inputs),
        )
    if found:
        log.warning("pretrain: no checkpoint has training digest %s; training from step 0", digest)
    return None


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """`key: old -> new` for the digest inputs that differ (old checkpoints lack them)."""
    if not old:
        return "the checkpoint does not record its digest inputs"
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return "differs in " + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def dropout_seed(master: int, stage: str, rank: int) -> int:
    """The torch seed of process `rank`'s dropout masks (weights and data are seeded apart).

    Each rank draws its own masks: with one shared seed, every rank would drop the same
    units of its own sequences, a correlation one process with the global batch never
    has. Rank 0 keeps the seed one process uses, so single-process runs are unchanged.
    """
    labels = (stage, "dropout") if rank == 0 else (stage, "dropout", f"rank{rank}")
    return derive_seed(master, *labels) % 2**63


def all_ranks_rng() -> dict[str, str]:
    """This process's RNG state (`ckpt.rng_state`), plus every other rank's as `rank<r>/<k>`.

    A checkpoint is written by rank 0; the other ranks' dropout streams travel in it so a
    resumed run continues each rank's masks where they were. Every rank must call this
    (it gathers).
    """
    mine = ckpt.rng_state()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    states: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    others = {f"rank{r}/{k}": v for r, s in enumerate(states) if r > 0 for k, v in s.items()}
    return {**mine, **others}


def restore_rank_rng(rng: dict[str, str], rank: int) -> None:
    """After `ckpt.load` (which restores rank 0's state): rank `rank` takes back its own."""
    prefix = f"rank{rank}/"
    own = {k[len(prefix) :]: v for k, v in rng.items() if k.startswith(prefix)}
    if rank > 0 and own:
        ckpt.set_rng_state(own)
