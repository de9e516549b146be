"""Training checkpoints: written atomically, loaded without unpickling arbitrary objects.

A checkpoint is a folder `step_<N>/` holding

- `model.safetensors`: the full (unsharded) weights; tied tensors are stored once and
  their aliases listed in the file's metadata (`pipeline.model.load.save_weights`, the
  format of every model folder);
- `optimizer.pt`: the optimizer state (tensors, numbers and names only), read back with
  `torch.load(weights_only=True)`, which refuses arbitrary pickled objects;
- `state.json`: step (the data position and the LR: both are functions of the step), RNG
  states, the loss history so far, and the training digest with the inputs it was
  computed from (data digests, config, world size, device). Keys that this version does
  not know are ignored on reading (older versions wrote a `scheduler` entry);
- `config.yaml`: the resolved config.

A folder of checkpoints belongs to one trajectory at a time: `save` keeps the newest
`keep` checkpoints of its own digest and deletes those of any other digest (they can
never be resumed by this config, and a stale high step must not outlive the new run).

State dicts go through `torch.distributed.checkpoint.state_dict`, which gathers FSDP2
shards into full tensors and works the same for DDP and a plain module, so one code path
serves every strategy. Every rank takes part in gathering; only rank 0 writes.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pipeline.core.io import atomic_dir, atomic_write_json
from pipeline.core.names import OPTIMIZER_FILE, RESOLVED_CONFIG, STATE_FILE, WEIGHTS_FILE
from pipeline.model.load import CheckpointError, load_weights, save_weights

_STEP_DIR = re.compile(r"^step_(\d{7})$")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class TrainState:
    """Everything besides weights and optimizer needed to continue the same trajectory."""

    step: int  # the LR is a function of it (pipeline.train.loop.lr_at): no scheduler state
    rng: dict[str, str]
    history: list[dict[str, float]]
    config_digest: str  # the training digest: a run resumes only a checkpoint of its own
    # What the digest was computed from, so a refused resume can say what changed
    # (empty in checkpoints written before it was recorded).
    digest_inputs: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, str]:
    """Torch RNG states (CPU, and CUDA when present) as base64 strings for JSON."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in states.items()}


def set_rng_state(state: dict[str, str]) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["cpu"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


def save(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    config_yaml: str,
    is_main: bool,
    keep: int,
) -> Path:
    """Write `folder/step_<N>` atomically (all ranks call this), then prune the folder.

    Pruning keeps the newest `keep` checkpoints with `state.config_digest` and removes
    every other one: older ones of this digest, and all of other digests (unreadable ones
    included), which this trajectory has replaced.
    """
    model_sd = get_model_state_dict(model, options=FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=FULL)
    target = folder / f"step_{state.step:07d}"
    if is_main:
        with atomic_dir(target) as tmp:
            save_weights(tmp / WEIGHTS_FILE, model_sd)
            torch.save(optim_sd, tmp / OPTIMIZER_FILE)
            atomic_write_json(tmp / STATE_FILE, state.__dict__)
            (tmp / RESOLVED_CONFIG).write_text(config_yaml)
        mine, others = [], []
        for path in list_checkpoints(folder):
            (mine if _digest_of(path) == state.config_digest else others).append(path)
        for old in others + mine[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _digest_of(ckpt: Path) -> str | None:
    """The training digest a checkpoint was made under; None when its state is unreadable."""
    try:
        return read_state(ckpt).config_digest
    except CheckpointError:
        return None


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def read_state(ckpt: Path) -> TrainState:
    """The `state.json` of a checkpoint; keys TrainState does not have are ignored.

    Older versions wrote a `scheduler` entry that nothing read (the LR is a function of
    the step), so their checkpoints still resume. A missing field is an error naming it.
    """
    path = ckpt / STATE_FILE
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise TypeError(f"expected a JSON object, got {type(raw).__name__}")
        known = {f.name for f in fields(TrainState)}
        return TrainState(**{k: v for k, v in raw.items() if k in known})
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable training state ({e})") from None


def load(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore weights, optimizer and RNG from `ckpt` into (possibly wrapped) objects."""
    state = read_state(ckpt)
    model_sd = load_weights(ckpt / WEIGHTS_FILE)
    optim_path = ckpt / OPTIMIZER_FILE
    try:
        optim_sd = torch.load(optim_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{optim_path}: optimizer state not found") from None
    except Exception as e:  # corrupt zip, or a pickle that weights_only refuses
        raise CheckpointError(f"{optim_path}: unreadable optimizer state ({e})") from None
    try:
        set_model_state_dict(model, model_sd, options=FULL)
        set_optimizer_state_dict(model, optimizer, optim_sd, options=FULL)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: does not match the model or optimizer ({e})") from None
    set_rng_state(state.rng)
    return state
