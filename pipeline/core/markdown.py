"""Markdown for reports: numbers formatted for people, and tables that free text cannot break.

Used by the model card (pipeline/serve/model_card.py) and the Prefect artifacts
(flows/artifacts.py).
Standard library only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

_SI_PREFIXES = ("", "k", "M", "G", "T", "P", "E", "Z")
_TABLE_ESCAPES = str.maketrans({c: "\\" + c for c in "\\|`*[]<>&"})


class Md(str):
    """Text that is already markdown, safe in a table cell: `table` leaves it unescaped."""

    __slots__ = ()


def number(value: Any) -> float | None:
    """A finite real number, or None (bools, strings, NaN and missing values are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def fmt(value: Any) -> str:
    """A value for the card: counts with thousands separators, reals to 4 significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    return str(value)


def si(value: Any, unit: str = "") -> str:
    """`4.831 GFLOP` (or `131.4k` without a unit): an SI prefix, 4 significant digits."""
    x = number(value)
    if x is None:
        return "n/a"
    power = 0
    while abs(x) >= 1000 and power < len(_SI_PREFIXES) - 1:
        x, power = x / 1000, power + 1
    return f"{x:.4g} {_SI_PREFIXES[power]}{unit}" if unit else f"{x:.4g}{_SI_PREFIXES[power]}"


def pct(value: Any) -> str:
    """A fraction as a percentage: 0.2003 -> `20.03 %`."""
    x = number(value)
    return "n/a" if x is None else f"{100 * x:.4g} %"


def duration(seconds: Any) -> str:
    """Seconds in the unit a person reads best: `42.5 s`, `12.3 min`, `2.5 h`."""
    s = number(seconds)
    if s is None:
        return "n/a"
    if s < 120:
        return f"{s:.4g} s"
    return f"{s / 60:.4g} min" if s < 7200 else f"{s / 3600:.4g} h"


def with_ci(value: Any, low: Any, high: Any) -> str:
    """`0.6781 (95% CI 0.6606 to 0.6956)`, or just the value when the interval is missing."""
    if number(low) is None or number(high) is None:
        return fmt(value)
    return f"{fmt(value)} (95% CI {fmt(low)} to {fmt(high)})"


def escape_cell(text: str) -> str:
    """Free text made safe for one markdown table cell: `|`, markup and newlines escaped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_TABLE_ESCAPES)
    return text.replace("\n", " ⏎ ").replace("\t", " ").strip()


def cell(value: Any) -> str:
    """One table cell: `Md` as is, other strings escaped, numbers through `fmt`."""
    if isinstance(value, Md):
        return str(value)
    return escape_cell(value if isinstance(value, str) else fmt(value)) or " "


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table; every cell goes through `cell`."""
    lines = [
        "| " + " | ".join(cell(h) for h in header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def code(text: Any) -> str:
    """An inline code span that survives backticks in `text` (not for table cells)."""
    s = str(text)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", s)), default=0) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def bullets(items: Iterable[tuple[str, Any]]) -> list[str]:
    """`- **label:** value` lines."""
    return [f"- **{label}:** {value}" for label, value in items]
