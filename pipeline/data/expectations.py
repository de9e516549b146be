"""Great Expectations gate for the validate stage.

GX is slow on very large DataFrames, so the gate validates two small frames: a seeded
*sample* of documents against row-level expectations, and a one-row frame of *exact*
aggregates (computed by our own streaming pass over the whole corpus) against table-level
expectations. Both results are reported together.

Row-level quality checks (length, printable share, PII) have a tolerance (`validate.*_mostly`):
cleaning drops the documents that fail them, and the gate fails only when the dropped share,
counted exactly over the whole corpus (the aggregates), exceeds `1 - mostly`. Their per-row
counterparts on the sample are reported (with example doc_ids) but do not decide, so the
sampling noise of a share near its tolerance cannot fail a corpus that is within it. Every
other expectation decides. A failure names the `validate.*` params that set its bound.

GX is imported lazily (it takes seconds), so importing this module stays cheap; the regexes
and the printable-character helpers are plain Python so the streaming pass can share them.
This module says what is checked (thresholds, suites) and how a failure reads; running GX
(context, checkpoints, byte-stable Data Docs, result records) is pipeline/data/gx_runner.py.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import LmforgeError
from pipeline.data.gx_runner import (
    import_gx,
    make_context,
    pinned_run_time,
    record,
    strip_render_times,
    validate_frame,
)

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.config.schema import ValidateConfig

# Both regexes avoid lookarounds, \d, \w and \s, so pandas runs them on pyarrow's RE2 engine
# (fast) and Python's `re` gives the same answers in the streaming pass.
EMAIL_RE = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
"""An e-mail address: local part, @, dotted domain with an alphabetic TLD."""

PHONE_RE = (
    r"(?:^|[^0-9])(?:"
    r"(?:\+?1[ .-]?)?(?:\([0-9]{3}\)[ .-]?|[0-9]{3}[ .-])[0-9]{3}[ .-][0-9]{4}"
    r"|\+[0-9]{1,3}(?:[ .-][0-9]{1,4}){1,3}[ .-][0-9]{3,8}"
    r")(?:[^0-9]|\Z)"
)
"""A phone number: North-American 3-3-4 digits with separators, optional (area) and +1/1-,
or an international number written with a leading +. Separators are required, so years,
counts, dates and bare 10-digit ids do not match; digits may not run on at either end.
Every match contains three consecutive digits, so callers may pre-filter on that."""

NONBLANK_RE = r"\S"
"""A document is empty when it has no non-whitespace character (`not text.strip()`)."""

ROWS_SUITE = "rows"
AGGREGATES_SUITE = "aggregates"
AGGREGATE_KEYS = (
    "row_count",
    "null_count",
    "empty_count",
    "duplicate_fraction",
    "printable_fraction",
    "email_fraction",
    "phone_fraction",
    "min_source_rows",
    "length_out_of_range_fraction",
    "unprintable_fraction",
)
_SAMPLE_COLUMNS = ("text", "source", "doc_id")
_ALLOWED_CONTROL = "\n\t\r"
_ASCII_INVALID = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class ThresholdError(LmforgeError, ValueError):
    """Inconsistent `validate.*` gate thresholds (a params problem, reported without traceback)."""


@dataclass(frozen=True)
class GateThresholds:
    """Gate bounds; field names mirror the `validate.*` keys of params.yaml."""

    min_chars: int
    max_chars: int
    min_rows: int
    max_rows: int
    max_duplicate_fraction: float
    min_printable_fraction: float
    pii_mostly: float
    min_rows_per_source: int
    # Defaults of 1.0 (no tolerance) for callers that build thresholds by hand.
    length_mostly: float = 1.0
    printable_mostly: float = 1.0

    @classmethod
    def from_params(cls, validate: ValidateConfig) -> GateThresholds:
        """The gate's thresholds are the `validate.*` keys of the same names."""
        return cls(**{f.name: getattr(validate, f.name) for f in dataclasses.fields(cls)})

    def __post_init__(self) -> None:
        """Reject inconsistent bounds up front: GX would silently pass or fail everything."""
        for lo, hi in (("min_chars", "max_chars"), ("min_rows", "max_rows")):
            a, b = getattr(self, lo), getattr(self, hi)
            if not 0 <= a <= b:
                raise ThresholdError(f"validate.{lo}={a}, validate.{hi}={b}: need 0 <= min <= max")
        for key in (
            "max_duplicate_fraction",
            "min_printable_fraction",
            "pii_mostly",
            "length_mostly",
            "printable_mostly",
        ):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ThresholdError(f"validate.{key}={getattr(self, key)}: expected [0, 1]")
        if self.min_rows_per_source < 0:
            raise ThresholdError(f"validate.min_rows_per_source={self.min_rows_per_source}: < 0")


def count_invalid_chars(text: str) -> int:
    """Characters that are neither printable nor \\n, \\t, \\r; U+FFFD (decode error) counts."""
    if text.isascii():  # fast path in C: in ASCII only C0 controls and DEL are unprintable
        return len(_ASCII_INVALID.findall(text))
    return sum(
        1 for ch in text if ch == "\ufffd" or not (ch.isprintable() or ch in _ALLOWED_CONTROL)
    )


def printable_fraction(text: str) -> float:
    """Share of valid characters in `text`; an empty text is 1.0 (emptiness is its own check)."""
    return 1.0 - count_invalid_chars(text) / len(text) if text else 1.0


def add_derived_columns(sample: pd.DataFrame) -> pd.DataFrame:
    """Copy of `sample` with `n_chars` and `printable_fraction`, unless the caller gave them."""
    missing = [c for c in _SAMPLE_COLUMNS if c not in sample.columns]
    if missing:
        raise ValueError(f"sample: missing column(s) {missing}; expected {list(_SAMPLE_COLUMNS)}")
    import pandas as pd

    out = sample.copy()
    texts = [t if isinstance(t, str) else None for t in out["text"]]  # nulls stay NaN below

    def derived(fn: Any) -> pd.Series:
        values = [math.nan if t is None else fn(t) for t in texts]
        return pd.Series(values, index=out.index, dtype="float64")

    if "n_chars" not in out.columns:
        out["n_chars"] = derived(len)
    if "printable_fraction" not in out.columns:
        out["printable_fraction"] = derived(printable_fraction)
    return out


def aggregates_frame(aggregates: dict[str, Any]) -> pd.DataFrame:
    """One-row frame of the aggregates; None/NaN stays NaN so its expectation fails."""
    import pandas as pd

    missing = [k for k in AGGREGATE_KEYS if k not in aggregates]
    if missing:
        raise ValueError(f"aggregates: missing key(s) {missing}; expected {list(AGGREGATE_KEYS)}")
    row = {}
    for key in AGGREGATE_KEYS:
        value = aggregates[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise TypeError(f"aggregates[{key!r}]: expected a number, got {value!r}")
        row[key] = [math.nan if value is None else value]
    return pd.DataFrame(row)


def _row_expectations(t: GateThresholds) -> list:
    """Per-document checks on the sample; each quality check tolerates 1 - its `mostly`."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToNotBeNull(column="text"),
        gxe.ExpectColumnValuesToMatchRegex(column="text", regex=NONBLANK_RE),
        gxe.ExpectColumnValuesToBeBetween(
            column="n_chars", min_value=t.min_chars, max_value=t.max_chars, mostly=t.length_mostly
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="printable_fraction",
            min_value=t.min_printable_fraction,
            mostly=t.printable_mostly,
        ),
        gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=EMAIL_RE, mostly=t.pii_mostly),
        gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=PHONE_RE, mostly=t.pii_mostly),
    ]


def _aggregate_expectations(t: GateThresholds) -> list:
    """Corpus-wide checks. On one row min == max == the value, and GX reports it as observed.

    The shares of documents that cleaning drops for their length, printable share or PII are
    bounded by 1 - the matching `mostly`.
    """
    import great_expectations.expectations as gxe

    def tolerance(mostly: float) -> float:
        return round(1.0 - mostly, 12)  # 1 - 0.999 is 0.0010000000000000009

    def at_most(column: str, hi: float, lo: float | None = None) -> Any:
        return gxe.ExpectColumnMaxToBeBetween(column=column, min_value=lo, max_value=hi)

    def at_least(column: str, lo: float) -> Any:
        return gxe.ExpectColumnMinToBeBetween(column=column, min_value=lo)

    return [
        at_most("row_count", t.max_rows, lo=t.min_rows),
        at_most("null_count", 0, lo=0),
        at_most("empty_count", 0, lo=0),
        at_most("duplicate_fraction", t.max_duplicate_fraction),
        at_least("printable_fraction", t.min_printable_fraction),
        at_most("email_fraction", tolerance(t.pii_mostly)),
        at_most("phone_fraction", tolerance(t.pii_mostly)),
        at_least("min_source_rows", t.min_rows_per_source),
        at_most("length_out_of_range_fraction", tolerance(t.length_mostly)),
        at_most("unprintable_fraction", tolerance(t.printable_mostly)),
    ]


_LENGTH = ("length_mostly", "min_chars", "max_chars")
_PRINTABLE = ("printable_mostly", "min_printable_fraction")
# The `validate.*` params that set each expectation's bound, by (suite, column or regex).
PARAMS: dict[tuple[str, str], tuple[str, ...]] = {
    (ROWS_SUITE, "n_chars"): _LENGTH,
    (ROWS_SUITE, "printable_fraction"): _PRINTABLE,
    (ROWS_SUITE, EMAIL_RE): ("pii_mostly",),
    (ROWS_SUITE, PHONE_RE): ("pii_mostly",),
    (AGGREGATES_SUITE, "row_count"): ("min_rows", "max_rows"),
    (AGGREGATES_SUITE, "duplicate_fraction"): ("max_duplicate_fraction",),
    (AGGREGATES_SUITE, "printable_fraction"): ("min_printable_fraction",),
    (AGGREGATES_SUITE, "email_fraction"): ("pii_mostly",),
    (AGGREGATES_SUITE, "phone_fraction"): ("pii_mostly",),
    (AGGREGATES_SUITE, "min_source_rows"): ("min_rows_per_source",),
    (AGGREGATES_SUITE, "length_out_of_range_fraction"): _LENGTH,
    (AGGREGATES_SUITE, "unprintable_fraction"): _PRINTABLE,
}
# Row checks whose exact corpus-wide share is an aggregate: the aggregate decides.
EXACT_COUNTERPART = {
    "n_chars": "length_out_of_range_fraction",
    "printable_fraction": "unprintable_fraction",
    EMAIL_RE: "email_fraction",
    PHONE_RE: "phone_fraction",
}


def _key(rec: dict[str, Any]) -> str:
    """A record's column, or its regex for the PII checks (both run on `text`)."""
    regex = rec["kwargs"].get("regex")
    return regex if regex in (EMAIL_RE, PHONE_RE) else rec["column"]


def _decides(rec: dict[str, Any]) -> bool:
    return not (rec["suite"] == ROWS_SUITE and _key(rec) in EXACT_COUNTERPART)


_REGEX_NAMES = {EMAIL_RE: "EMAIL_RE", PHONE_RE: "PHONE_RE", NONBLANK_RE: "a non-blank char"}


def _num(value: Any) -> Any:
    """GX stores bounds as floats; show 20000.0 as 20000."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _expected(rec: dict[str, Any]) -> str:
    """Human text for an expectation's bound, e.g. '<= 0.05' or 'in [1, 20000]'."""
    kwargs = rec["kwargs"]
    lo, hi = _num(kwargs.get("min_value")), _num(kwargs.get("max_value"))
    if "regex" in kwargs:
        negate = "no " if rec["expectation"].endswith("not_match_regex") else ""
        bound = f"{negate}match for {_REGEX_NAMES.get(kwargs['regex'], kwargs['regex'])}"
    elif lo is not None and hi is not None:
        bound = f"== {lo}" if lo == hi else f"in [{lo}, {hi}]"
    elif lo is not None or hi is not None:
        bound = f">= {lo}" if lo is not None else f"<= {hi}"
    else:
        bound = "non-null" if rec["expectation"].endswith("not_be_null") else "no violation"
    if rec["unexpected_count"] is not None:  # a per-row expectation
        mostly = kwargs.get("mostly")
        bound += " in every row" if mostly is None else f" in at least {mostly:.2%} of rows"
    return bound


def _params(rec: dict[str, Any], t: GateThresholds | None) -> str:
    """'; set by validate.pii_mostly=0.99' for the params behind a record's bound."""
    names = PARAMS.get((rec["suite"], _key(rec)), ())
    if t is None or not names:
        return ""
    return "; set by " + ", ".join(f"validate.{n}={getattr(t, n)}" for n in names)


def _describe(
    rec: dict[str, Any], t: GateThresholds | None = None, examples: list[str] | None = None
) -> str:
    """One terminal line for a failed expectation; `examples`: doc_ids from its row check.

    Doc ids are shown whole (`<source>:<file>:<row>` can be long): never cut mid-id.
    """
    examples = examples or rec["unexpected_doc_ids"]
    if rec["error"]:
        observed = f"error: {rec['error']}"
    elif rec["unexpected_count"] is not None:
        pct = rec["unexpected_percent"] or 0.0
        observed = f"{rec['unexpected_count']} unexpected rows ({pct:.2f}%)"
    else:
        observed = repr(_num(rec["observed_value"]))
    if examples:
        observed += f", e.g. doc_id {', '.join(examples)}"
    return (
        f"  [{rec['suite']}] {rec['column']}: {rec['expectation']}: "
        f"observed {observed}; expected {_expected(rec)}{_params(rec, t)}"
    )


@dataclass
class GateResult:
    """Outcome of the gate: overall success plus one JSON-ready dict per expectation.

    Each record's `decides` says whether it counts toward `success` (see the module doc).
    """

    success: bool
    expectations: list[dict[str, Any]] = field(default_factory=list)
    thresholds: GateThresholds | None = None

    @property
    def failures(self) -> list[dict[str, Any]]:
        """The failed expectations that fail the gate."""
        return [e for e in self.expectations if not e["success"] and e.get("decides", True)]

    def _examples(self, rec: dict[str, Any]) -> list[str]:
        """For an exact share, the doc_ids its row check found in the sample."""
        rows = [r for r in self.expectations if r["suite"] == ROWS_SUITE]
        for row in rows:
            if (
                rec["suite"] == AGGREGATES_SUITE
                and EXACT_COUNTERPART.get(_key(row)) == rec["column"]
            ):
                return row["unexpected_doc_ids"]
        return []

    def failure_message(self) -> str:
        """Failed expectations, one per line: column, observed value, bound and its params."""
        if self.success:
            within = [e for e in self.expectations if not e["success"]]
            note = f" ({len(within)} sampled checks over, within tolerance)" if within else ""
            return f"data gate passed: all {len(self.expectations)} expectations met{note}"
        lines = [f"data gate failed: {len(self.failures)} of {len(self.expectations)} failed"]
        lines += [_describe(r, self.thresholds, self._examples(r)) for r in self.failures]
        return "\n".join(lines)


def run_gate(
    sample: pd.DataFrame,
    aggregates: dict[str, Any],
    thresholds: GateThresholds,
    docs_dir: Path | None = None,
) -> GateResult:
    """Validate the sample (row suite) and the exact aggregates (table suite) with GX.

    With `docs_dir`, the Data Docs site is written into it (created if missing) whether the
    gate passes or not, since a failing run is when the docs are needed. Pass a fresh folder
    (the validate stage passes an `io_utils.atomic_dir`): files already there are overwritten
    or left as they are, never deleted.
    """
    rows = add_derived_columns(sample)
    table = aggregates_frame(aggregates)
    gx = import_gx()
    ctx = make_context(gx, None if docs_dir is None else Path(docs_dir))
    run_id = gx.RunIdentifier(run_name="validate", run_time=pinned_run_time())
    suites = [
        (ROWS_SUITE, rows, _row_expectations(thresholds)),
        (AGGREGATES_SUITE, table, _aggregate_expectations(thresholds)),
    ]
    records = [
        record(name, evr)
        for name, frame, expectations in suites
        for evr in validate_frame(gx, ctx, name, frame, expectations, run_id).results
    ]
    for r in records:
        r["decides"] = _decides(r)
    if docs_dir is not None:
        strip_render_times(Path(docs_dir))
    success = all(r["success"] for r in records if r["decides"])
    return GateResult(success=success, expectations=records, thresholds=thresholds)
