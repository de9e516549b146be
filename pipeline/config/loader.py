"""The one strict loader for `params.yaml`: presets, `--set` overrides, every key checked.

`params.yaml` is the single source of truth for configuration: DVC reads it to decide what
is stale, the stages read it through this module, and the flows turn overrides into
experiment params. Loading checks every key against `pipeline.config.schema`:

- unknown keys, missing keys, wrong types and out-of-range values are errors that name the
  full key path (`validate.max_duplicate_fraction`) and what was expected;
- presets (`presets/<name>.yaml`) and `--set a.b=value` overrides are applied on top of the
  file and checked the same way.

Standard library and pyyaml only, because the GPU benchmark machine has nothing else.

Print the resolved config:  `lmforge config show --preset ci --set seed=7`
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config.decoding import DecodingError, in_bounds
from pipeline.config.schema import PARAMS_FILE, PRESETS_DIR, Config, ConfigError
from pipeline.core.names import RESOLVED_CONFIG

# --------------------------------------------------------------------------------------
# Building typed config from plain data
# --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp)
    )


def _convert(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Check `value` against type `tp`, recording errors under `key`; return the typed value."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, errors)
    if origin is Literal:
        if value not in typing.get_args(tp):
            errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
            return []
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin in (types.UnionType, typing.Union):
        raise TypeError(f"unions are not supported in the schema ({key})")
    # bool is a subclass of int: reject `true` for an int field and `1` for a bool field.
    ok = (
        isinstance(value, bool)
        if tp is bool
        else (isinstance(value, int | float) and not isinstance(value, bool))
        if tp is float
        else (isinstance(value, tp) and not isinstance(value, bool))
    )
    if not ok:
        errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    return float(value) if tp is float else value


def _check_range(f: dataclasses.Field, value: Any, key: str, errors: list[str]) -> None:
    lo, hi, above = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("above")
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    if not in_bounds(value, f.metadata):
        low = f"({above}" if above is not None else f"[{lo if lo is not None else '-inf'}"
        errors.append(
            f"{key}: expected a value in {low}, {hi if hi is not None else 'inf'}], got {value!r}"
        )


def _build(cls: type, data: Any, prefix: str, errors: list[str]) -> Any:
    """Build dataclass `cls` from mapping `data`, collecting every problem in `errors`."""
    where = prefix or "params"
    if not isinstance(data, dict):
        errors.append(f"{where}: expected a mapping, got {data!r}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{_join(prefix, close[0])}'?)" if close else ""
            known = ", ".join(fields)
            errors.append(f"{_join(prefix, key)}: unknown key{hint}; known keys: {known}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name not in data:
            has_default = f.default is not dataclasses.MISSING
            if not has_default:
                errors.append(f"{key}: missing; expected {_type_name(hints[name])}")
            continue
        value = _convert(data[name], hints[name], key, errors)
        _check_range(f, value, key, errors)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError:
        return None  # a missing field, already reported
    except DecodingError as e:  # the class's own check (DecodingConfig): NaN, or reported
        if not any(err.startswith(_join(prefix, e.field) + ":") for err in errors):
            errors.append(f"{_join(prefix, e.field)}: {e.message}")
        return None


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _cross_checks(cfg: Config) -> list[str]:
    """Constraints that involve more than one key."""
    errors = []
    v, sw = cfg.validate, cfg.storyworld
    if v.min_chars > v.max_chars:
        errors.append(f"validate.min_chars: {v.min_chars} exceeds validate.max_chars {v.max_chars}")
    if v.min_rows > v.max_rows:
        errors.append(f"validate.min_rows: {v.min_rows} exceeds validate.max_rows {v.max_rows}")
    if v.val_fraction + v.test_fraction >= 1:
        errors.append("validate.val_fraction + validate.test_fraction: expected a sum below 1")
    if sw.min_sentences > sw.max_sentences:
        errors.append("storyworld.min_sentences: expected at most storyworld.max_sentences")
    if cfg.model.n_embd % cfg.model.n_head:
        errors.append(
            f"model.n_embd: {cfg.model.n_embd} is not divisible by model.n_head {cfg.model.n_head}"
        )
    if cfg.model.pos_encoding == "rotary" and (cfg.model.n_embd // cfg.model.n_head) % 2:
        errors.append("model.n_head: rotary encoding needs an even head size n_embd / n_head")
    if not cfg.tokenizer.special_tokens:
        errors.append("tokenizer.special_tokens: expected at least the end-of-text token")
    if cfg.pretrain.min_lr > cfg.pretrain.lr:
        errors.append("pretrain.min_lr: expected at most pretrain.lr")
    if not v.sources:
        errors.append("validate.sources: expected at least one source")
    for i, s in enumerate(v.sources):
        key = f"validate.sources[{i}]"
        if s.kind == "storyworld" and s.num_docs < 1:
            errors.append(f"{key}.num_docs: expected at least 1 for a storyworld source")
        if s.kind in ("txt", "jsonl", "parquet", "csv") and not s.path:
            errors.append(f"{key}.path: expected a file, folder or glob for kind {s.kind!r}")
        if s.kind == "hub" and not s.dataset:
            errors.append(f"{key}.dataset: expected a Hub dataset name for kind 'hub'")
    return errors


def build_config(data: dict[str, Any], root: Path) -> Config:
    """Typed config from a plain mapping; raises ConfigError listing every problem."""
    errors: list[str] = []
    cfg = _build(Config, data, "", errors)
    if cfg is not None and not errors:
        errors += _cross_checks(cfg)
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return dataclasses.replace(cfg, root=root.resolve())


# --------------------------------------------------------------------------------------
# Files, presets and overrides
# --------------------------------------------------------------------------------------


def read_yaml(path: Path) -> Any:
    """Parse a YAML file, turning syntax errors into ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], value); the value is parsed as YAML (1e-3, true, [..])."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. validate.min_chars=10")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
    return parts, value


def apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set a dotted key in nested dicts. The schema check afterwards rejects unknown keys."""
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            if nxt is not None:
                key = ".".join(parts[: i + 1])
                raise ConfigError(f"override {'.'.join(parts)}: {key} is not a mapping")
            nxt = node[part] = {}
        node = nxt
    node[parts[-1]] = value


def merge_into(target: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge `over` into `target` in place (and return it): the one preset merge.

    Mappings merge key by key; every other value (lists too) replaces, and a key `target`
    lacks is added (the schema check afterwards rejects unknown keys). A value equal to the
    one already there is left alone, so a ruamel document (`params_file`) keeps the comments
    and layout of what did not change.
    """
    for key, value in over.items():
        old = target.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            merge_into(old, value)
        elif key not in target or old != value:
            target[key] = copy.deepcopy(value)
    return target


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into a copy of `base` (`merge_into`); neither input changes."""
    return merge_into(copy.deepcopy(base), over)


def find_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) that holds params.yaml."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / PARAMS_FILE).is_file():
            return d
    raise ConfigError(f"{PARAMS_FILE}: not found in {here} or any parent folder")


def list_presets(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / PRESETS_DIR).glob("*.yaml"))


def preset_overrides(root: Path, preset: str) -> dict[str, Any]:
    """The override mapping of `presets/<preset>.yaml`."""
    path = root / PRESETS_DIR / f"{preset}.yaml"
    if not path.is_file():
        known = ", ".join(list_presets(root)) or "none"
        raise ConfigError(f"preset {preset!r}: {path} not found; known presets: {known}")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of overrides")
    return data


def resolve_data(
    root: Path, preset: str | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """params.yaml with a preset and `--set` overrides applied, as plain (unchecked) data."""
    data = read_yaml(root / PARAMS_FILE)
    if not isinstance(data, dict):
        raise ConfigError(f"{root / PARAMS_FILE}: expected a mapping at the top level")
    if preset:
        data = deep_merge(data, preset_overrides(root, preset))
    for item in overrides or []:
        apply_override(data, *parse_override(item))
    return data


def load_config(
    root: Path | None = None, preset: str | None = None, overrides: list[str] | None = None
) -> Config:
    """Load and check params.yaml (+ preset + overrides). Raises ConfigError naming keys."""
    root = find_root() if root is None else Path(root)
    return build_config(resolve_data(root, preset, overrides), root)


def save_resolved(cfg: Config, out_dir: Path, name: str = RESOLVED_CONFIG) -> Path:
    """Write the resolved config next to a stage's outputs, so every output says how it was made."""
    from pipeline.core.io import atomic_write_text

    return atomic_write_text(out_dir / name, cfg.to_yaml())


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, type, doc) for every key of the schema, for `lmforge config keys` and docs."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key, tp = _join(prefix, f.name), hints[f.name]
        rows.append((key, _type_name(tp), f.metadata.get("doc", "")))
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key)
    return rows
