"""Great Expectations gate for the validate stage.

GX is slow on very large DataFrames, so the gate validates two small frames: a seeded
*sample* of documents against row-level expectations, and a one-row frame of *exact*
aggregates (computed by our own streaming pass over the whole corpus) against table-level
expectations. Both results are reported together and the gate fails if any expectation fails.

GX is imported lazily (it takes seconds), so importing this module stays cheap; the regexes
and the printable-character helpers are plain Python so the streaming pass can share them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import LmforgeError

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
)
_SAMPLE_COLUMNS = ("text", "source", "doc_id")
_ALLOWED_CONTROL = "\n\t\r"
_ASCII_INVALID = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_MAX_DOC_IDS = 5
_RENDER_TIME = re.compile(r"(logo-long\.png)\?d=[0-9TZ.]+")
_STAMP = re.compile(r"\b\d{8}T\d{6}\.\d{6}Z\b")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


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
        for key in ("max_duplicate_fraction", "min_printable_fraction", "pii_mostly"):
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
    """Per-document checks on the sample; PII checks tolerate a share of 1 - pii_mostly."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToNotBeNull(column="text"),
        gxe.ExpectColumnValuesToMatchRegex(column="text", regex=NONBLANK_RE),
        gxe.ExpectColumnValuesToBeBetween(
            column="n_chars", min_value=t.min_chars, max_value=t.max_chars
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="printable_fraction", min_value=t.min_printable_fraction
        ),
        gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=EMAIL_RE, mostly=t.pii_mostly),
        gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=PHONE_RE, mostly=t.pii_mostly),
    ]


def _aggregate_expectations(t: GateThresholds) -> list:
    """Corpus-wide checks. On one row min == max == the value, and GX reports it as observed.

    length_out_of_range_fraction must be exactly 0: the gate runs on the corpus that will be
    trained on, so any out-of-range document means cleaning or thresholds are wrong.
    """
    import great_expectations.expectations as gxe

    pii_max = round(1.0 - t.pii_mostly, 12)  # 1 - 0.999 is 0.0010000000000000009

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
        at_most("email_fraction", pii_max),
        at_most("phone_fraction", pii_max),
        at_least("min_source_rows", t.min_rows_per_source),
        at_most("length_out_of_range_fraction", 0.0, lo=0.0),
    ]


def _import_gx() -> Any:
    """Import GX with its logger at WARNING (unless configured): its INFO output is noise."""
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)
    import great_expectations as gx

    return gx


def _make_context(gx: Any, docs_dir: Path | None) -> Any:
    """Ephemeral context with no progress bars and only our docs site (if any).

    A default ephemeral context carries a docs site in a throw-away temp dir, which
    UpdateDataDocsAction would also build; passing our own config avoids that.
    """
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        sites["lmforge"] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir),
            },
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _validate(
    gx: Any, ctx: Any, name: str, frame: pd.DataFrame, expectations: list, run_id: Any
) -> Any:
    """Run one suite on one DataFrame through its own Checkpoint.

    One Checkpoint per frame because Checkpoint.run passes the same batch_parameters
    ({"dataframe": df}) to every ValidationDefinition it holds.
    """
    asset = ctx.data_sources.add_pandas(f"lmforge_{name}").add_dataframe_asset(name)
    suite = ctx.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = ctx.validation_definitions.add(
        gx.ValidationDefinition(
            name=name, data=asset.add_batch_definition_whole_dataframe("all"), suite=suite
        )
    )
    # Unexpected *values* are full documents (and PII): report doc_ids instead.
    result_format: dict[str, Any] = {
        "result_format": "SUMMARY",
        "partial_unexpected_count": _MAX_DOC_IDS,
        "exclude_unexpected_values": True,
    }
    if "doc_id" in frame.columns:
        result_format["unexpected_index_column_names"] = ["doc_id"]
    actions = (
        [gx.checkpoint.UpdateDataDocsAction(name="docs")] if ctx.list_data_docs_sites() else []
    )
    checkpoint = ctx.checkpoints.add(
        gx.Checkpoint(
            name=f"validate_{name}",
            validation_definitions=[definition],
            actions=actions,
            result_format=result_format,
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=run_id)
    return next(iter(result.run_results.values()))


def _jsonable(value: Any) -> Any:
    """numpy scalars -> Python, NaN -> None, so json.dumps gives strict JSON."""
    if hasattr(value, "item") and not isinstance(value, list | dict | str):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _doc_ids(result: dict) -> list[str]:
    """Flatten GX's partial_unexpected_index_list ([{"doc_id": [...]}] or [{"doc_id": x}])."""
    ids: list[Any] = []
    for item in result.get("partial_unexpected_index_list") or []:
        value = item.get("doc_id") if isinstance(item, dict) else item
        ids.extend(value if isinstance(value, list) else [value])
    return [str(i) for i in ids[:_MAX_DOC_IDS]]


def _record(suite: str, evr: Any) -> dict[str, Any]:
    """One JSON-serializable row per expectation result."""
    kwargs = dict(evr.expectation_config.kwargs)
    column = kwargs.pop("column", None)
    kwargs.pop("batch_id", None)
    result = evr.result or {}
    error = evr.exception_info.get("exception_message") if evr.exception_info else None
    return _jsonable(
        {
            "suite": suite,
            "expectation": evr.expectation_config.type,
            "column": column,
            "kwargs": kwargs,
            "success": bool(evr.success),
            "observed_value": result.get("observed_value"),
            "unexpected_count": result.get("unexpected_count"),
            "unexpected_percent": result.get("unexpected_percent"),
            "unexpected_doc_ids": _doc_ids(result),
            "error": error,
        }
    )


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


def _describe(rec: dict[str, Any]) -> str:
    """One terminal line for a failed expectation."""
    if rec["error"]:
        observed = f"error: {rec['error']}"
    elif rec["unexpected_count"] is not None:
        pct = rec["unexpected_percent"] or 0.0
        observed = f"{rec['unexpected_count']} unexpected rows ({pct:.2f}%)"
        if rec["unexpected_doc_ids"]:
            observed += f", e.g. doc_id {', '.join(rec['unexpected_doc_ids'])}"
    else:
        observed = repr(_num(rec["observed_value"]))
    return (
        f"  [{rec['suite']}] {rec['column']}: {rec['expectation']}: "
        f"observed {observed}; expected {_expected(rec)}"
    )


@dataclass
class GateResult:
    """Outcome of the gate: overall success plus one JSON-ready dict per expectation."""

    success: bool
    expectations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [e for e in self.expectations if not e["success"]]

    def failure_message(self) -> str:
        """Failed expectations, one per line, with column, observed value and bound."""
        if self.success:
            return f"data gate passed: all {len(self.expectations)} expectations met"
        lines = [f"data gate failed: {len(self.failures)} of {len(self.expectations)} failed"]
        return "\n".join(lines + [_describe(rec) for rec in self.failures])


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
    gx = _import_gx()
    ctx = _make_context(gx, None if docs_dir is None else Path(docs_dir))
    run_id = gx.RunIdentifier(run_name="validate", run_time=_pinned_run_time())
    suites = [
        (ROWS_SUITE, rows, _row_expectations(thresholds)),
        (AGGREGATES_SUITE, table, _aggregate_expectations(thresholds)),
    ]
    records = [
        _record(name, evr)
        for name, frame, expectations in suites
        for evr in _validate(gx, ctx, name, frame, expectations, run_id).results
    ]
    if docs_dir is not None:
        _strip_render_times(Path(docs_dir))
    return GateResult(success=all(r["success"] for r in records), expectations=records)


def _pinned_run_time() -> datetime:
    """GX's run time, pinned so identical data gives byte-identical Data Docs (DVC hashes).

    `SOURCE_DATE_EPOCH` (the reproducible-builds convention) sets it; by default it is the
    Unix epoch. The real run time is recorded by MLflow.
    """
    return datetime.fromtimestamp(int(os.environ.get("SOURCE_DATE_EPOCH", "0")), UTC)


def _strip_render_times(docs_dir: Path) -> None:
    """Make the HTML a pure function of the results: GX stamps pages with render times and
    random element ids, which would change the output's hash on every identical re-run."""
    pinned = _pinned_run_time().strftime("%Y%m%dT%H%M%S.%fZ")
    for page in docs_dir.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        fixed = _RENDER_TIME.sub(r"\1", html)
        fixed = _STAMP.sub(pinned, fixed)
        fixed = _UUID.sub(_numbering(), fixed)
        if fixed != html:
            page.write_text(fixed, encoding="utf-8")


def _numbering() -> Callable[[re.Match], str]:
    """A replacer giving each distinct match a sequential id, in order of appearance."""
    ids: dict[str, str] = {}
    return lambda m: ids.setdefault(m.group(0), f"id{len(ids)}")
