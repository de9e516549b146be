"""Training checkpoints: written atomically, loaded without unpickling arbitrary objects.

A checkpoint is a folder `step_<N>/` holding

- `model.safetensors`: the full (unsharded) weights; tied tensors are stored once and
  their aliases listed in the file's metadata;
- `optimizer.pt`: the optimizer state (tensors, numbers and names only), read back with
  `torch.load(weights_only=True)`, which refuses arbitrary pickled objects;
- `state.json`: step (the data position: batches are a function of the step), the
  scheduler's state, RNG states, the loss history so far, and the training digest with
  the inputs it was computed from (data digests, config, world size, device);
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pipeline.core.errors import LmforgeError
from pipeline.core.io import atomic_dir, atomic_write_json

_STEP_DIR = re.compile(r"^step_(\d{7})$")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class CheckpointError(LmforgeError):
    """A checkpoint is missing, truncated or corrupt; the message names the file."""


@dataclass
class TrainState:
    """Everything besides weights and optimizer needed to continue the same trajectory."""

    step: int
    scheduler: dict[str, Any]
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


def _dedupe_tied(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier key; return {alias: kept key}."""
    seen: dict[tuple[int, int], str] = {}
    kept, aliases = {}, {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            kept[k] = v.contiguous()
    return kept, aliases


def save_weights(path: Path, sd: dict[str, torch.Tensor]) -> None:
    """Write a state dict as safetensors, storing tied tensors once."""
    kept, aliases = _dedupe_tied(sd)
    save_file(kept, str(path), metadata={"aliases": json.dumps(aliases)})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read weights written by `save_weights`, restoring tied aliases; clear errors."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        sd = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    for alias, key in aliases.items():
        sd[alias] = sd[key]
    return sd


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
            save_weights(tmp / "model.safetensors", model_sd)
            torch.save(optim_sd, tmp / "optimizer.pt")
            atomic_write_json(tmp / "state.json", state.__dict__)
            (tmp / "config.yaml").write_text(config_yaml)
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
    path = ckpt / "state.json"
    try:
        return TrainState(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable training state ({e})") from None


def load(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore weights, optimizer and RNG from `ckpt` into (possibly wrapped) objects."""
    state = read_state(ckpt)
    model_sd = load_weights(ckpt / "model.safetensors")
    optim_path = ckpt / "optimizer.pt"
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


def read_model_files(folder: Path, weights: Path | None = None, hint: str = "") -> tuple[Any, dict]:
    """(GPTConfig, state dict) of a model folder: `model_config.json` + safetensors weights.

    `hint` names the stage that writes the folder, for the error when it is missing.
    """
    from pipeline.model.gpt import GPTConfig

    config_path = folder / "model_config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: model not found{'; ' + hint if hint else ''}")
    try:
        gcfg = GPTConfig(**json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: not a model config ({e})") from None
    return gcfg, load_weights(weights or folder / "model.safetensors")
