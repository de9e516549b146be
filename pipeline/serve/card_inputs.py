"""What the model card is built from: the register stage's hand-over and the stages' files.

`CardInputs` carries what only the register stage knows (the model config and parameter
count, decoding samples, gate verdict, lineage, pretrain timing from MLflow) and reads the
rest from `cfg`'s paths: `reports/<stage>.json` and `.md`, and the tokenizer's `meta.json`.
A report is a `Report`: a missing key is an error naming the file and the key, and a missing
file (the stage did not run) is None, which the card shows with `not_run`. Standard library
only (plus stdlib-only pipeline modules), like pipeline/serve/model_card.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.core.errors import LmforgeError
from pipeline.core.names import report_json, report_md
from pipeline.text.shards import META_FILE


class Report(Mapping[str, Any]):
    """A stage's JSON (or a part of it): a missing key is an error naming the file and key."""

    def __init__(self, data: Mapping[str, Any], where: Path, keys: tuple[str, ...] = ()):
        self._data, self._where, self._keys = data, where, keys

    def __getitem__(self, key: str) -> Any:
        if key not in self._data:
            name = ".".join((*self._keys, key))
            raise LmforgeError(f"{self._where}: no key {name!r}; re-run the stage that writes it")
        return self._wrap(self._data[key], (*self._keys, key))

    def _wrap(self, value: Any, keys: tuple[str, ...]) -> Any:
        """Dicts (also inside lists) as Reports, so their missing keys are named too."""
        if isinstance(value, list):
            return [self._wrap(v, (*keys[:-1], f"{keys[-1]}[{i}]")) for i, v in enumerate(value)]
        return Report(value, self._where, keys) if isinstance(value, dict) else value

    # Mapping's own `in` and get() call __getitem__ and catch only KeyError, so the error
    # above would escape a plain membership test (a real-text run has no source_entropy).
    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self._data else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def read_report(path: Path) -> Report | None:
    """The JSON object at `path`, or None when the file does not exist (the stage did not run)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{path}: not a readable JSON report ({e}); re-run its stage") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return Report(data, path)


def not_run(stage: str) -> str:
    """The card's words for a part whose stage output is missing."""
    return f"not available (stage {stage} not run)"


@dataclass(frozen=True)
class CardInputs:
    """What the register stage hands over; the stage files are read from `cfg`'s paths."""

    cfg: Config
    model_config: dict[str, Any]  # model_config.json of the registered weights (GPTConfig)
    num_params: int  # parameter count (tied head once)
    samples: list[tuple[str, str]]  # (prompt, generated text) with the served defaults
    gate: dict[str, Any]  # pipeline.serve.gate.check_gate's result: {"passed", "checks": [...]}
    lineage: dict[str, str]  # git commit, DVC experiment, digests, run ids
    timing: dict[str, float] = field(default_factory=dict)  # pretrain MLflow: wall_seconds,
    # tokens_per_s (pretrain's DVC metrics hold no timings: they would differ on every run)

    def report(self, stage: str) -> Report | None:
        return read_report(self.cfg.path("reports") / report_json(stage))

    def markdown(self, stage: str) -> str | None:
        path = self.cfg.path("reports") / report_md(stage)
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def tokenizer_meta(self) -> Report | None:
        return read_report(self.cfg.path("tokenizer") / META_FILE)
