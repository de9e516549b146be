"""Great Expectations plumbing for the data gate (pipeline/data/expectations.py).

- `import_gx`: GX imported lazily (it takes seconds), its INFO logging quieted;
- `make_context`: an ephemeral context with no progress bars and only our Data Docs site;
- `validate_frame`: one suite on one DataFrame through its own Checkpoint;
- `record`: one JSON-ready dict per expectation result (doc_ids, never document text);
- `pinned_run_time`, `strip_render_times`: Data Docs that are a pure function of the results,
  so an identical re-run gives byte-identical files (DVC hashes).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

_MAX_DOC_IDS = 5
_RENDER_TIME = re.compile(r"(logo-long\.png)\?d=[0-9TZ.]+")
_STAMP = re.compile(r"\b\d{8}T\d{6}\.\d{6}Z\b")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def import_gx() -> Any:
    """Import GX with its logger at WARNING (unless configured): its INFO output is noise."""
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)
    import great_expectations as gx

    return gx


def make_context(gx: Any, docs_dir: Path | None) -> Any:
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


def validate_frame(
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


def record(suite: str, evr: Any) -> dict[str, Any]:
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


def pinned_run_time() -> datetime:
    """GX's run time, pinned so identical data gives byte-identical Data Docs (DVC hashes).

    `SOURCE_DATE_EPOCH` (the reproducible-builds convention) sets it; by default it is the
    Unix epoch. The real run time is recorded by MLflow.
    """
    return datetime.fromtimestamp(int(os.environ.get("SOURCE_DATE_EPOCH", "0")), UTC)


def strip_render_times(docs_dir: Path) -> None:
    """Make the HTML a pure function of the results: GX stamps pages with render times and
    random element ids, which would change the output's hash on every identical re-run."""
    pinned = pinned_run_time().strftime("%Y%m%dT%H%M%S.%fZ")
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
