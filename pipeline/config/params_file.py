"""Write a preset and `--set` overrides into params.yaml, keeping its comments and order.

This is what `dvc exp run -S key=value` does to the workspace: params.yaml is the record of
the params a run used, and DVC compares it with dvc.lock to decide which stages are stale.
Values are checked with the strict loader before anything is written; the file is replaced
atomically, so a bad override leaves it untouched.

    lmforge run --preset ci --set validate.max_chars=8000
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

from pipeline.config.loader import (
    PARAMS_FILE,
    apply_override,
    build_config,
    merge_into,
    parse_override,
    preset_overrides,
    resolve_data,
)
from pipeline.core.io import atomic_write_text


def apply_to_params(root: Path, preset: str | None, overrides: list[str]) -> list[str]:
    """Apply a preset and overrides to `root/params.yaml`; return the dotted keys that changed."""
    if not preset and not overrides:
        return []
    resolved = resolve_data(root, preset, overrides)
    build_config(resolved, root)  # raises ConfigError naming the key; nothing written yet
    delta: dict[str, Any] = preset_overrides(root, preset) if preset else {}
    for item in overrides:
        apply_override(delta, *parse_override(item))
    # ruamel keeps params.yaml's comments; imported here because the GPU machine, which
    # loads this package's config, has pyyaml but not ruamel (only the flow writes params).
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    path = root / PARAMS_FILE
    doc = yaml.load(path.read_text(encoding="utf-8"))
    before = copy.deepcopy(doc)  # a snapshot: merge_into edits `doc` in place
    merge_into(doc, delta)  # the loader's merge: the file says what resolve_data resolved
    buf = io.StringIO()
    yaml.dump(doc, buf)
    changed = _diff_keys(before, doc)
    if changed:
        atomic_write_text(path, buf.getvalue())
    return changed


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b), key=str)
        return [k for key in keys for k in _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if a != b else []
