"""What the sweep reads from the data stages: the token shards and the source entropy.

The sweep trains on the tokenizer stage's shards as they are; it warns (and its report
records) where their data config differs from the sweep's, and compares the fitted E with
the story world's exact entropy rate from `reports/synthesize.json` when that is a floor.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from pipeline.config import Config
from pipeline.core.names import RESOLVED_CONFIG, report_json
from pipeline.core.nested import flatten
from pipeline.sweep.fit import SweepError

# The config sections that shape the token shards (compared with the shards' config.yaml).
DATA_SECTIONS = ("seed", "storyworld", "validate", "synthesize", "tokenizer")


def require_tokenizer(cfg: Config) -> dict[str, Any]:
    """The shards' meta.json; a clear error saying how to build them when they are missing."""
    from pipeline.text.shards import META_FILE, ShardError, read_meta

    folder = cfg.path("tokenizer")
    try:
        return read_meta(folder)
    except ShardError as e:
        raise SweepError(
            f"{folder / META_FILE}: the sweep trains on the tokenizer's shards ({e}).\n"
            "Build them first: `dvc repro tokenizer` (it follows params.yaml; for a preset's "
            "data run `lmforge run --preset P` or `python -m pipeline.stages.<stage> "
            "--preset P` for validate, synthesize and tokenizer)."
        ) from None


def data_config_mismatch(cfg: Config) -> list[str]:
    """Keys of the data-shaping sections where the shards' config.yaml differs from `cfg`.

    Empty when they agree or when the shards carry no config.yaml. The sweep still trains
    on the shards as they are; the flow warns and the report records the keys.
    """
    path = cfg.path("tokenizer") / RESOLVED_CONFIG
    if not path.is_file():
        return []
    built = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    wanted = cfg.to_dict()
    diffs = []
    for section in DATA_SECTIONS:
        # a section missing from one side is the single key `section` with value None
        a = flatten({section: built.get(section)})
        b = flatten({section: wanted.get(section)})
        diffs += [
            f"{k}: shards {a.get(k)!r}, sweep {b.get(k)!r}"
            for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)
        ]
    return diffs


def source_entropy(cfg: Config) -> tuple[dict[str, Any] | None, str]:
    """(the story world's entropy-rate estimate from reports/synthesize.json, or None; why).

    Only meaningful as a floor for the validation loss when every corpus source is the
    story world: then the val split holds story-world documents only.
    """
    path = cfg.path("reports") / report_json("synthesize")
    if not path.is_file():
        return None, f"{path} not found: run `dvc repro synthesize` for the source entropy"
    est = json.loads(path.read_text(encoding="utf-8")).get("source_entropy")
    if not est:
        return None, "no source entropy in synthesize.json (the corpus is not the story world)"
    kinds = sorted({s.kind for s in cfg.validate.sources})
    if kinds != ["storyworld"]:
        return None, f"the corpus mixes sources {kinds}: the story world's entropy is no floor"
    return est, "story-world entropy rate (Monte Carlo over exact document log-probabilities)"
