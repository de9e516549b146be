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
- `config.yaml`: the resolved config;
- `checksums.json`: the md5 of each of the four files above, written last. A checkpoint
  whose files do not match it (bytes flipped, a truncated file) is refused before anything
  in it is used, with a message naming the file, the checkpoint and how to go on: resume
  refuses rather than silently falling back to an older checkpoint, so damaged storage
  never goes unnoticed. (A checkpoint without the file, from before it existed, is read
  with the checks of each format only.) The checksums find damage, they are no defence:
  nothing is ever unpickled, whatever the files hold (safetensors, `weights_only=True`).

A killed writer leaves a temporary folder `.step_<N>.<pid>.<random>.tmp`; it is never
listed as a checkpoint, and `save` removes those whose writer is gone.

A folder of checkpoints belongs to one trajectory at a time: `save` keeps the newest
`keep` checkpoints of its own digest and deletes those of any other digest (they can
never be resumed by this config, and a stale high step must not outlive the new run).

State dicts go through `torch.distributed.checkpoint.state_dict`, which gathers FSDP2
shards into full tensors and works the same for DDP and a plain module, so one code path
serves every strategy. Every rank takes part in gathering; only rank 0 writes.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
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

from pipeline.core.io import atomic_dir, atomic_write_json, file_md5, remove_stale_temporaries
from pipeline.core.names import (
    CHECKSUMS_FILE,
    OPTIMIZER_FILE,
    RESOLVED_CONFIG,
    STATE_FILE,
    WEIGHTS_FILE,
)
from pipeline.model.load import CheckpointError, load_weights, save_weights

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{7})$")
_STEP_TEMP = re.compile(r"^\.(step_\d{7})\..*\.tmp$")  # atomic_dir's temporary of a step
# What each file of a checkpoint is, for the message when it is damaged.
_WHAT = {
    STATE_FILE: "unreadable training state",
    WEIGHTS_FILE: "not a readable safetensors file",
    OPTIMIZER_FILE: "unreadable optimizer state",
    RESOLVED_CONFIG: "unreadable resolved config",
}
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
        return torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["cpu"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


def refused(ckpt: Path, name: str, detail: str) -> CheckpointError:
    """The error for a damaged file `name` of checkpoint `ckpt`: what, where, how to go on."""
    return CheckpointError(
        f"{ckpt / name}: {_WHAT.get(name, 'unreadable')} ({detail}); checkpoint {ckpt} "
        f"is refused and nothing in it was used. Delete that folder to resume from the "
        f"previous checkpoint, or set pretrain.resume=false to train from step 0"
    )


def write_checksums(folder: Path) -> None:
    """`checksums.json`: the md5 of every file of a checkpoint folder, written last."""
    names = (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE, RESOLVED_CONFIG)
    atomic_write_json(folder / CHECKSUMS_FILE, {n: file_md5(folder / n) for n in names})


def verify(ckpt: Path, *names: str) -> None:
    """Check files `names` of `ckpt` against its checksums.json; CheckpointError if not.

    A checkpoint written before checksums existed has no checksums.json: nothing to check.
    """
    path = ckpt / CHECKSUMS_FILE
    if not path.exists():
        return
    try:
        sums = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(sums, dict):
            raise TypeError(f"expected a JSON object, got {type(sums).__name__}")
    except (OSError, ValueError, TypeError) as e:
        raise refused(ckpt, CHECKSUMS_FILE, str(e)) from None
    for name in names:
        want = sums.get(name)
        if want is None:
            raise refused(ckpt, CHECKSUMS_FILE, f"no checksum for {name}")
        try:
            got = file_md5(ckpt / name)
        except OSError as e:
            raise refused(ckpt, name, str(e)) from None
        if got != want:
            size = (ckpt / name).stat().st_size
            detail = f"md5 {got} of its {size} bytes does not match {CHECKSUMS_FILE} ({want})"
            raise refused(ckpt, name, detail)


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
        remove_dead_temporaries(folder)
        with atomic_dir(target) as tmp:
            save_weights(tmp / WEIGHTS_FILE, model_sd)
            # Through a Python file, so a full disk surfaces as OSError(ENOSPC) (torch's own
            # writer only says "unexpected pos") and becomes a clear OutputWriteError.
            with open(tmp / OPTIMIZER_FILE, "wb") as f:
                torch.save(optim_sd, f)
            atomic_write_json(tmp / STATE_FILE, state.__dict__)
            (tmp / RESOLVED_CONFIG).write_text(config_yaml)
            write_checksums(tmp)
        mine, others = [], []
        for path in list_checkpoints(folder):
            (mine if _digest_of(path) == state.config_digest else others).append(path)
        for old in others + mine[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def remove_dead_temporaries(folder: Path) -> None:
    """Remove the temporary folders of checkpoint writers that were killed (their pid is gone).

    `atomic_dir` clears those of the step it writes; a killed writer's may be of another
    step (a run resumed with other settings), and they must not pile up.
    """
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if m := _STEP_TEMP.match(entry.name):
            for removed in remove_stale_temporaries(folder / m.group(1)):
                log.info("pretrain: removed %s, left by a killed checkpoint writer", removed)


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
    the step), so their checkpoints still resume. A missing field is an error naming it,
    and so is a file that does not match the checkpoint's checksums.json.
    """
    verify(ckpt, STATE_FILE)
    try:
        raw = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise TypeError(f"expected a JSON object, got {type(raw).__name__}")
        known = {f.name for f in fields(TrainState)}
        return TrainState(**{k: v for k, v in raw.items() if k in known})
    except (OSError, ValueError, TypeError) as e:  # ValueError: bad JSON or UTF-8
        raise refused(ckpt, STATE_FILE, str(e)) from None


def load(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore weights, optimizer and RNG from `ckpt` into (possibly wrapped) objects.

    Every file is checked against checksums.json before any is read; a damaged one raises
    CheckpointError naming it and the checkpoint (see `refused`).
    """
    state = read_state(ckpt)
    verify(ckpt, WEIGHTS_FILE, OPTIMIZER_FILE)
    try:
        model_sd = load_weights(ckpt / WEIGHTS_FILE)  # safetensors: never unpickles
    except CheckpointError as e:
        raise refused(ckpt, WEIGHTS_FILE, str(e).removeprefix(f"{ckpt / WEIGHTS_FILE}: ")) from None
    optim_path = ckpt / OPTIMIZER_FILE
    try:
        optim_sd = torch.load(optim_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise refused(ckpt, OPTIMIZER_FILE, "file not found") from None
    except Exception as e:  # corrupt zip, or a pickle that weights_only refuses
        raise refused(ckpt, OPTIMIZER_FILE, str(e).splitlines()[0]) from None
    try:
        set_model_state_dict(model, model_sd, options=FULL)
        set_optimizer_state_dict(model, optimizer, optim_sd, options=FULL)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: does not match the model or optimizer ({e})") from None
    try:
        set_rng_state(state.rng)
    except (KeyError, TypeError, ValueError, binascii.Error, RuntimeError) as e:
        raise refused(ckpt, STATE_FILE, f"bad RNG state: {e!r}") from None
    return state
