"""Model folders on disk: `model_config.json` + `model.safetensors`, read and written here only.

A model folder (pretrain's and finetune's outputs, a model package, a checkpoint's weights)
holds the architecture as `model_config.json` (the fields of `GPTConfig`) and the weights as
safetensors. Tied tensors (the embedding and the LM head) share storage, which safetensors
refuses to write twice: `save_weights` stores them once and lists the aliases in the file's
metadata, `load_weights` restores them. Nothing is unpickled.

Every failure raises `CheckpointError` naming the file and what was expected. This module
imports only torch, safetensors and the model, so the serving and evaluation code can load a
model without the training package.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pipeline.core.errors import LmforgeError
from pipeline.core.names import MODEL_CONFIG_FILE, WEIGHTS_FILE
from pipeline.model.gpt import GPT, GPTConfig


class CheckpointError(LmforgeError):
    """A checkpoint or model folder is missing, truncated or corrupt; the message names the file."""


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
        with safe_open(str(path), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    for alias, key in aliases.items():
        sd[alias] = sd[key]
    return sd


def read_model_files(
    folder: Path, weights: Path | None = None, hint: str = ""
) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(GPTConfig, state dict) of a model folder: `model_config.json` + safetensors weights.

    `weights` replaces `folder/model.safetensors` (e.g. an SWA average beside the model);
    `hint` names the stage that writes the folder, for the error when it is missing.
    """
    config_path = folder / MODEL_CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: model not found{'; ' + hint if hint else ''}")
    try:
        gcfg = GPTConfig(**json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: not a model config ({e})") from None
    return gcfg, load_weights(weights or folder / WEIGHTS_FILE)


def load_model(
    folder: Path, weights: Path | None = None, hint: str = "run `dvc repro finetune`"
) -> GPT:
    """A GPT from `folder/model_config.json` and its safetensors weights, in eval mode.

    The default `hint` points at finetune, whose output folder is the one evaluated and served.
    """
    gcfg, state = read_model_files(folder, weights, hint=hint)
    model = GPT(gcfg)
    model.load_state_dict(state)
    return model.eval()
