"""Fault row 10: planted bad data run through the flow.

A project whose last good run validated a clean story-world corpus is pointed at a local
JSONL file with nulls, duplicates, e-mail addresses and phone numbers (PII) and empty
documents, and the real flow runs (`lm_pipeline` against the session's Prefect server, DVC,
the stage processes). The Great Expectations gate of `validate` must fail the run; the
Prefect API's record of the run's task runs must show that no later stage ran; and the
validated data of the last good run must be byte-identical, with no temporary left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fault_helpers import leftover_temporaries, md5_files, orchestrated_project, task_run_states

from pipeline.core.names import STAGES
from pipeline.stages import validate

pytestmark = pytest.mark.slow

CLEAN = [f"Document number {i} talks about topic {i % 7} at some length." for i in range(300)]
PLANTED = {
    "null_count": [None] * 5,
    "empty_count": [""] * 5,
    "duplicate_fraction": [CLEAN[0]] * 80,
    "email_fraction": [f"mail me at person{i}@example.com now" for i in range(20)],
    "phone_fraction": [f"call 555-123-{4000 + i} today please" for i in range(20)],
}
BAD_SOURCE = [
    "validate.sources=[{kind: jsonl, name: planted, path: planted.jsonl}]",
    "validate.min_rows=10",
]
# What the last good run wrote: validate's outputs and report.
GOOD_OUTPUTS = ("data/validated", "reports/data_docs", "reports/validate.json")


def test_bad_data_fails_validate_and_no_later_stage_runs(tmp_path: Path, prefect_api):
    from flows.pipeline_flow import lm_pipeline

    root = orchestrated_project(tmp_path, [], [validate])
    rows = [*CLEAN, *(t for planted in PLANTED.values() for t in planted)]
    (root / "planted.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    before = md5_files(root, *GOOD_OUTPUTS)
    assert any(k.startswith("data/validated/") for k in before)

    # `until`: were the gate to pass by mistake, synthesize (a later stage) would run and show.
    state = lm_pipeline(
        root=str(root), overrides=BAD_SOURCE, push=False, until="synthesize", return_state=True
    )

    assert state.is_failed(), state
    message = str(state.result(raise_on_failure=False))
    assert "stage validate failed" in message and "exit 1" in message
    failed = json.loads((root / "reports" / "validate.failed.json").read_text())
    bad = {x["expectation"] + json.dumps(x) for x in failed["gate"]["expectations"]}
    unmet = [x for x in failed["gate"]["expectations"] if not x["success"]]
    for expectation in PLANTED:  # every kind of planted fault is caught, not just the first
        assert any(expectation in json.dumps(x) for x in unmet), (expectation, sorted(bad))

    tasks = task_run_states(str(state.state_details.flow_run_id))
    assert tasks["validate"] == ["Failed"], tasks
    assert not set(STAGES[1:]) & set(tasks), tasks  # no later stage has a task run at all

    assert md5_files(root, *GOOD_OUTPUTS) == before
    assert leftover_temporaries(root) == []
