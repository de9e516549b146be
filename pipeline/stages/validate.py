"""Stage `validate`: ingest the sources, gate them with Great Expectations, clean and split.

    dvc repro validate                     # as part of the DAG
    python -m pipeline.stages.validate     # directly, reading params.yaml
    lmforge stage validate --set validate.max_chars=4000

Outputs (paths from params.yaml):
- `paths.validated/`: `train.parquet`, `val.parquet`, `test.parquet` (text, source, doc_id)
  and the resolved `config.yaml`;
- `paths.data_docs/`: the GX Data Docs site;
- `reports/validate.json`: every expectation with its observed value, the exact aggregates,
  and the split sizes.

On a failed gate the stage exits 1 listing each failed expectation; the previous outputs stay
as they were, and the failing report and Data Docs go to `reports/validate.failed.json` and
`<paths.data_docs>.failed/` for inspection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config, save_resolved
from pipeline.core.errors import GateFailed
from pipeline.core.io import atomic_dir, atomic_write_json, no_room_error
from pipeline.core.names import failed_report, report_json, split_parquet
from pipeline.core.progress import Progress
from pipeline.core.seeding import derive_seed
from pipeline.data.clean import SPLITS, CorpusScan
from pipeline.data.expectations import GateResult, GateThresholds, run_gate
from pipeline.data.ingest import SCHEMA, iter_corpus
from pipeline.ops.stage_runner import stage_entry
from pipeline.ops.tracking import SPLIT_CONTEXT, start_run

log = logging.getLogger(__name__)
STAGE = "validate"


def scan_corpus(cfg: Config, out_dir: Path) -> CorpusScan:
    """Stream every source once, writing cleaned rows to `<out_dir>/<split>.parquet`."""
    scan = CorpusScan(cfg.validate, derive_seed(cfg.seed, STAGE, "gx-sample"))
    writers: dict[str, pq.ParquetWriter] = {}
    progress = Progress("validate: scanned", unit="B")
    split = SPLITS[0]  # the parquet being written, to name it when the disk is full
    try:
        for split in SPLITS:
            writers[split] = pq.ParquetWriter(out_dir / split_parquet(split), SCHEMA)
        for table in iter_corpus(cfg):
            for split, rows in scan.add(table).items():
                writers[split].write_table(rows.cast(SCHEMA))
            progress.update(pa.compute.sum(pa.compute.binary_length(table["text"])).as_py() or 0)
        for split in SPLITS:
            writers[split].close()  # flushes: a full disk may first show here
    except BaseException as e:
        for w in writers.values():
            with contextlib.suppress(Exception):
                w.close()
        if (err := no_room_error(out_dir / split_parquet(split), e)) is not None:
            raise err from e
        raise
    progress.close()
    return scan


def build_report(scan: CorpusScan, gate: GateResult) -> dict[str, Any]:
    """reports/validate.json: only deterministic figures, so DVC hashes match on a re-run."""
    return {
        "gate": {"success": gate.success, "expectations": gate.expectations},
        "aggregates": scan.aggregates(),
        "dropped": dict(sorted(scan.dropped.items())),
        "rows_per_source": dict(sorted(scan.per_source.items())),
        "splits": {s: {"docs": scan.kept[s], "bytes": scan.kept_bytes[s]} for s in SPLITS},
    }


def _keep_failure(cfg: Config, report: dict[str, Any], docs_tmp: Path) -> Path:
    """Park the failing report and Data Docs beside (never over) the last good outputs."""
    failed_docs = cfg.path("data_docs").with_name(cfg.path("data_docs").name + ".failed")
    shutil.rmtree(failed_docs, ignore_errors=True)
    shutil.copytree(docs_tmp, failed_docs)
    return atomic_write_json(cfg.path("reports") / failed_report(STAGE), report)


def run(cfg: Config) -> dict[str, Any]:
    """Validate, clean and split the corpus; raise GateFailed (outputs untouched) on failure."""
    t0 = time.perf_counter()
    with start_run(cfg, STAGE) as tracker:
        tracker.log_params({"seed": cfg.seed, STAGE: dataclasses.asdict(cfg.validate)})
        with (
            atomic_dir(cfg.path("validated")) as out_tmp,
            atomic_dir(cfg.path("data_docs")) as docs_tmp,
        ):
            scan = scan_corpus(cfg, out_tmp)
            log.info("validate: running the Great Expectations suites")
            gate = run_gate(
                scan.sample_frame(),
                scan.aggregates(),
                GateThresholds.from_params(cfg.validate),
                docs_tmp,
            )
            report = build_report(scan, gate)
            if not gate.success:
                path = _keep_failure(cfg, report, docs_tmp)
                tracker.log_artifact(path)
                raise GateFailed(
                    f"{gate.failure_message()}\nfull report: {path}\n"
                    f"data docs: {cfg.path('data_docs')}.failed/index.html\n"
                    f"previous outputs in {cfg.path('validated')} are unchanged"
                )
            save_resolved(cfg, out_tmp)
        # The report last, after both folders are in place: a kill before this line leaves
        # the previous report with the previous outputs, never a report without its outputs.
        report_path = atomic_write_json(cfg.path("reports") / report_json(STAGE), report)
        # Artifacts and datasets are logged from their final places, after the renames.
        seconds = time.perf_counter() - t0
        tracker.log_metrics({**scan.aggregates(), "seconds": seconds})
        tracker.log_metrics({"mchars_per_s": scan.chars / 1e6 / seconds})
        tracker.log_metrics({f"{s}_docs": scan.kept[s] for s in SPLITS})
        tracker.log_artifact(report_path)
        tracker.log_artifact(cfg.path("data_docs"), "data_docs")
        for s in SPLITS:
            path = cfg.path("validated") / split_parquet(s)
            tracker.log_dataset(path, f"validated-{s}", SPLIT_CONTEXT[s], role="output")
        summary = {
            "docs": dict(scan.kept),
            "dropped": dict(scan.dropped),
            "seconds": round(seconds, 2),
        }
        tracker.describe(STAGE, summary)
    return summary


# `dvc repro validate`; by hand `python -m pipeline.stages.validate --set k=v`
main = stage_entry(STAGE, run)

if __name__ == "__main__":
    raise SystemExit(main())
