"""Nested mappings (JSON reports, YAML params) as flat dotted keys, and one value by its path.

The one walker of the pipeline: MLflow param and metric names, the reproduction's metric
comparison, the sweep's data-config drift check and the flow's summary table all read
nested dicts through `flatten` or `dig`, so a key is spelled the same way everywhere:

    flatten({"t": {"ppl": 3.0, "ok": True}})                    -> {"t.ppl": 3.0, "t.ok": True}
    flatten({"t": {"ppl": 3.0, "ok": True}}, numbers_only=True) -> {"t.ppl": 3.0}
    dig({"t": {"ppl": 3.0}}, "t.ppl")                           -> 3.0

Keys are written with `f"{key}"`, so a non-string key (an int from YAML) becomes its text.
Standard library only: it sits in `pipeline.core`, below every other package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

ListPolicy = Literal["keep", "index", "drop"]


def _is_table(value: Any) -> bool:
    """A non-empty list whose items are all mappings (e.g. rows of a report)."""
    return isinstance(value, list) and bool(value) and all(isinstance(x, Mapping) for x in value)


def flatten(
    d: Mapping[Any, Any],
    sep: str = ".",
    numbers_only: bool = False,
    lists: ListPolicy = "keep",
    prefix: str = "",
) -> dict[str, Any]:
    """Leaves of nested mappings by their joined key: {'a': {'b': 1}} -> {'a.b': 1}.

    An empty mapping has no leaves, so it leaves no key. Lists, by `lists`:
    - "keep": a list is a leaf value, as it is;
    - "index": a non-empty list of mappings is walked as 'a.0.b', 'a.1.b'; any other list
      (empty, or of scalars) is a leaf value;
    - "drop": a list leaves no key (tables compared by other means).
    `numbers_only` keeps only finite ints and floats, as floats: bools (an int subclass),
    strings, None and an infinite or NaN value are left out (MLflow metrics are finite
    floats). `prefix` goes before every key as it is (no separator is added after it).
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, sep, numbers_only, lists, key + sep))
        elif lists == "index" and _is_table(v):
            for i, row in enumerate(v):
                out.update(flatten(row, sep, numbers_only, lists, f"{key}{sep}{i}{sep}"))
        elif lists == "drop" and isinstance(v, list):
            continue
        elif not numbers_only:
            out[key] = v
        elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


def dig(d: Any, path: str | Sequence[Any], default: Any = None, sep: str = ".") -> Any:
    """The value at `path` ("a.b.c", or a tuple of keys when a key holds `sep` or is no
    string) in nested mappings; `default` when a key is missing or a step is no mapping.

    The value is returned as it is, a mapping included: a caller that wants a leaf checks.
    """
    keys = path.split(sep) if isinstance(path, str) else path
    node = d
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node
