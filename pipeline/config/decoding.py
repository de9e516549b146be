"""The one check of the decoding settings, shared by params.yaml and the served model's requests.

`pipeline.config.schema.DecodingConfig` is the one dataclass of the decoding settings
(`register.decoding` in params.yaml, the served model's request params through
`pipeline.serve.textgen.GenerationParams`, its subclass, and `pipeline.model.generate`). Its
`__post_init__` calls `check_fields`, which reads each field's type hint and its `spec`
bounds (`min`, `max`, `above`): the same bounds the strict loader checks in params.yaml, so a
key of params.yaml and a field of a request obey one rule. An error names the field.

    DecodingConfig("sample", max_new_tokens=20, temperature=0.8, top_k=0, top_p=0.9,
                   num_beams=1, seed=3, no_repeat_ngram_size=3, repetition_penalty=1.2)

Standard library only (the GPU machine has nothing else, and served models ship config/).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterable
from typing import Any, Literal

Strategy = Literal["greedy", "sample", "beam"]
MAX_SEED = 2**63 - 1  # a torch.Generator seed; MLflow's `long`


class DecodingError(ValueError):
    """A decoding setting with a bad value; `field` names it, `message` says what was expected."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def shown(value: Any) -> str:
    """The value as a request or params.yaml spelled it: JSON-like, and short."""
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _bounds(meta: typing.Mapping[str, Any]) -> str:
    """' in (0, 10]', ' >= 1', ...: the allowed range of a field, from its spec metadata."""
    lo, above, hi = meta.get("min"), meta.get("above"), meta.get("max")
    low = f"[{_num(lo)}" if lo is not None else f"({_num(above)}" if above is not None else ""
    if low and hi is not None:
        return f" in {low}, {_num(hi)}]"
    if lo is not None:
        return f" >= {_num(lo)}"
    if above is not None:
        return f" > {_num(above)}"
    return f" <= {_num(hi)}" if hi is not None else ""


def in_bounds(value: float, meta: typing.Mapping[str, Any]) -> bool:
    """Whether `value` lies in the spec bounds `min <= value`, `above < value`, `value <= max`."""
    lo, above, hi = meta.get("min"), meta.get("above"), meta.get("max")
    return (
        (lo is None or value >= lo)
        and (above is None or value > above)
        and (hi is None or value <= hi)
    )


def field_problem(value: Any, tp: Any, meta: typing.Mapping[str, Any]) -> str | None:
    """What is wrong with `value` for a field of type `tp` and spec `meta`; None when nothing."""
    doc = f" ({meta['doc']})" if meta.get("doc") else ""
    if typing.get_origin(tp) is Literal:
        choices = list(typing.get_args(tp))
        return None if value in choices else f"expected one of {choices}{doc}, got {shown(value)}"
    if tp is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {shown(value)}"
    is_num = isinstance(value, int | float) and not isinstance(value, bool)  # True is no count
    if tp is int and not (isinstance(value, int) and is_num and in_bounds(value, meta)):
        return f"expected an integer{_bounds(meta)}{doc}, got {shown(value)}"
    if tp is float and not (is_num and math.isfinite(value) and in_bounds(value, meta)):
        return f"expected a finite number{_bounds(meta)}{doc}, got {shown(value)}"
    return None


def check_fields(obj: Any, names: Iterable[str]) -> None:
    """Check the fields `names` of dataclass instance `obj`; DecodingError on the first bad one."""
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name in names:
        problem = field_problem(getattr(obj, name), hints[name], fields[name].metadata)
        if problem is not None:
            raise DecodingError(name, problem)
