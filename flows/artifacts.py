"""Prefect artifacts of a pipeline run: what a user sees on the flow run's Artifacts tab.

- `lm-pipeline-summary`: each stage's status, duration and key metrics;
- `gx-validation`: the Great Expectations result of the validate stage;
- `evaluation`: the evaluation tables (reports/evaluate.md without the samples);
- `registered-model`: the registered version and its alias, or why nothing was registered;
- `stage-failure`: on a failure, the failing stage's report.

The markdown builders are pure functions of the reports on disk; `publish` sends them.
`key_metrics` reads the figures the summary shows per stage (also the flow's return value).
`summary_table` and `where_to_look` are what `lmforge run` prints at the end (rich).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from pipeline.core.markdown import cell, escape_cell, fmt
from pipeline.core.names import REGISTER_VERSION, STAGES, failed_report, report_json, report_md
from pipeline.core.nested import dig

# The figures shown per stage in the run summary: (label, path into reports/<stage>.json).
KEY_METRICS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "validate": [
        ("train docs", ("splits", "train", "docs")),
        ("val docs", ("splits", "val", "docs")),
        ("duplicate fraction", ("aggregates", "duplicate_fraction")),
    ],
    "synthesize": [
        ("entropy bits/byte", ("source_entropy", "bits_per_byte")),
        ("synthetic share", ("mix", "synthetic_share_bytes")),
        ("fine-tune examples", ("finetune", "train_examples")),
    ],
    "tokenizer": [
        ("vocab", ("vocab_size",)),
        ("bytes/token (val)", ("bytes_per_token_val",)),
    ],
    "pretrain": [
        ("train loss", ("train_loss",)),
        ("val bits/byte", ("val_bpb",)),
        ("tokens", ("tokens_seen",)),
    ],
    "finetune": [
        ("method", ("method",)),
    ],
    "evaluate": [
        ("test bits/byte", ("test", "bits_per_byte")),
        ("n-gram bits/byte", ("baselines", "ngram", "bits_per_byte")),
        ("gain over n-gram", ("baselines", "gain_over_ngram")),
        ("KL bits/byte (story world)", ("source_kl", "storyworld", "kl_bits_per_byte")),
        ("task accuracy", ("task_accuracy",)),
        ("task answer bits/byte", ("task", "answer_bits_per_byte")),
    ],
    "register": [
        ("registered", ("registered",)),
        ("version", ("version",)),
        ("alias", ("alias",)),
        ("why not", ("reason",)),
    ],
}

# Reports beside reports/<stage>.json that the summary reads too (not DVC outputs).
EXTRA_REPORTS = {"register": REGISTER_VERSION}


MAX_CELL = 80


def _cell(value: Any) -> str:
    """One table cell: JSON for structures, cut to MAX_CELL characters, markdown-escaped."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return cell(text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def summary_markdown(
    results: list[dict[str, Any]], parent_run_id: str | None, experiment: str | None
) -> str:
    """Stage | status | seconds | key metrics, then where the run is recorded."""
    lines = [
        "# lm-pipeline run",
        "",
        "| stage | status | seconds | key metrics |",
        "|---|---|---|---|",
    ]
    for r in results:
        shown = {k: v for k, v in r["metrics"].items() if v is not None}
        figures = ", ".join(escape_cell(f"{k}: {fmt(v)}") for k, v in shown.items())
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']} | {figures} |")
    lines.append("")
    if parent_run_id:
        lines.append(f"MLflow parent run: `{parent_run_id}`")
    if experiment:
        lines.append(f"DVC experiment: `{experiment}` (`dvc exp show`)")
    return "\n".join(lines)


def _verdict(rec: dict[str, Any]) -> str:
    """A sampled check over its tolerance does not fail the gate (its exact share decides)."""
    if rec.get("success"):
        return "yes"
    return "no (sample; the exact share decides)" if rec.get("decides") is False else "**no**"


def gx_markdown(reports: Path) -> str | None:
    """The Great Expectations gate of `validate`, one row per expectation."""
    report = _read(reports / report_json("validate")) or _read(reports / failed_report("validate"))
    if not report or "gate" not in report:
        return None
    gate = report["gate"]
    verdict = "passed" if gate.get("success") else "**FAILED**"
    lines = [
        f"# Great Expectations: {verdict}",
        "",
        "| suite | expectation | column | arguments | success | unexpected % |",
        "|---|---|---|---|---|---|",
    ]
    for e in gate.get("expectations", []):
        lines.append(
            f"| {e.get('suite', '')} | {e.get('expectation', '')} | {e.get('column') or ''} "
            f"| {_cell(e.get('kwargs', {}))} | {_verdict(e)} "
            f"| {fmt(e.get('unexpected_percent'))} |"
        )
    return "\n".join(lines)


def evaluation_markdown(reports: Path) -> str | None:
    """reports/evaluate.md up to its samples (the tables)."""
    path = reports / report_md("evaluate")
    if not path.is_file():
        return None
    return path.read_text().split("\n## Samples", 1)[0]


def registry_markdown(reports: Path) -> str | None:
    """The registered version and alias, or the reason nothing was registered."""
    report = _read(reports / report_json("register"))
    if report is None:
        return None
    name = report.get("model_name", "")
    if not report.get("registered"):
        return f"# Not registered: {name}\n\n{report.get('reason', '')}"
    version = _read(reports / REGISTER_VERSION) or {}
    lines = [
        f"# Registered: {name} version {version.get('version')} as `{version.get('alias')}`",
        "",
        f"Model URI: `{version.get('model_uri')}`",
    ]
    comparison = version.get("comparison") or {}
    if comparison.get("champion_version"):
        lines += [
            "",
            f"Against champion version {comparison['champion_version']} on "
            f"{comparison.get('documents')} test documents: "
            f"{fmt(comparison.get('challenger_bits_per_byte'))} vs "
            f"{fmt(comparison.get('champion_bits_per_byte'))} bits/byte "
            f"(margin {fmt(comparison.get('margin'))}): "
            + ("promoted" if comparison.get("promoted") else "not promoted"),
        ]
    return "\n".join(lines)


def failure_markdown(stage: str, reports: Path, output_tail: str) -> str:
    """A failed stage: its failure report when it wrote one, and the end of its output."""
    lines = [f"# Stage `{stage}` failed", ""]
    failed = _read(reports / failed_report(stage))
    if failed is not None:
        lines += [
            f"`reports/{stage}.failed.json` (the previous outputs are kept):",
            "",
            "```json",
            json.dumps(failed, indent=1, default=str)[:6000],
            "```",
            "",
        ]
    lines += ["Output (last lines):", "", "```", output_tail, "```"]
    return "\n".join(lines)


def publish(key: str, markdown: str | None, description: str) -> None:
    """Create one markdown artifact on the current flow run (nothing when no markdown)."""
    if markdown is None:
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown, key=key, description=description)


def key_metrics(reports: Path, stage: str) -> dict[str, Any]:
    """The summary figures of a stage, read from its DVC metrics file in `reports`."""
    path = reports / report_json(stage)
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    extra = reports / EXTRA_REPORTS.get(stage, "-")
    if extra.is_file():  # e.g. the registered version, which DVC does not track
        report |= json.loads(extra.read_text())
    figures = {label: dig(report, keys) for label, keys in KEY_METRICS.get(stage, [])}
    # a figure is a leaf: a mapping at its path (a report of another shape) shows as absent
    return {k: None if isinstance(v, dict) else v for k, v in figures.items()}


def publish_markdown(push: bool, errors: list[str], saved: bool = True) -> str:
    """The summary's last section: did the run's record reach DVC and the remote?"""
    lines = ["", "## DVC experiment and remote", ""]
    if not saved:
        lines.append("Partial run (`until`): not saved as a DVC experiment, not pushed.")
    elif not errors:
        lines.append("Saved" + (" and pushed." if push else "; not pushed (`--no-push`)."))
    for error in errors:
        step, _, output = error.partition("\n")
        lines += [f"**{step}**", "", "```", output, "```", ""]
    return "\n".join(lines)


def publish_run(
    summary: str, reports: Path, stages: list[str] | tuple[str, ...], push: bool, errors: list[str]
) -> None:
    """Every artifact of a finished run; a report is shown only if its stage was in the run."""
    publish(
        "lm-pipeline-summary",
        summary + publish_markdown(push, errors, saved=len(stages) == len(STAGES)),
        "stage status, durations and key metrics",
    )
    if "validate" in stages:
        publish("gx-validation", gx_markdown(reports), "Great Expectations")
    if "evaluate" in stages:
        publish("evaluation", evaluation_markdown(reports), "evaluation tables")
    if "register" in stages:
        publish("registered-model", registry_markdown(reports), "model registry")


def shown_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures that apply: a figure the run's sources do not give (None: e.g. the story
    world's KL on a real corpus, "why not" on a registered model) is not shown."""
    return {k: v for k, v in metrics.items() if v is not None}


def summary_line(r: dict[str, Any]) -> str:
    """One stage of the summary as a log line: stage, status, seconds, the figures shown."""
    figures = ", ".join(f"{k}: {fmt(v)}" for k, v in shown_metrics(r["metrics"]).items())
    return f"{r['stage']:<11} {r['status']:<20} {r['seconds']:6.1f}s  {figures}"


def summary_table(results: list[dict[str, Any]]) -> Table:
    """Stage | ran or skipped | seconds | key metrics, one row per stage of the run."""
    table = Table(title="lm-pipeline run", title_justify="left", show_lines=False)
    table.add_column("stage", style="bold")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("key metrics", overflow="fold")
    for r in results:
        status = str(r.get("status", ""))
        style = "green" if status == "ran" else "dim"
        figures = "\n".join(f"{k}: {fmt(v)}" for k, v in shown_metrics(r["metrics"]).items())
        seconds = r.get("seconds")
        shown = f"{seconds:.1f}" if isinstance(seconds, int | float) else "n/a"
        table.add_row(r["stage"], Text(status, style=style), shown, figures)
    return table


def where_to_look(result: dict[str, Any], tracking_uri: str, push: bool) -> Text:
    """Where the run is recorded: MLflow, Prefect, DVC and, when pushed, the remote."""
    # A server (team mode) has its own UI at its URL; a local store needs `mlflow ui`.
    served = tracking_uri.startswith(("http://", "https://"))
    ui = f"open {tracking_uri}" if served else f"mlflow ui --backend-store-uri {tracking_uri}"
    lines = ["Where to look:", f"  MLflow:  {ui}"]
    if result.get("mlflow_parent_run_id"):
        lines.append(f"           parent run {result['mlflow_parent_run_id']}")
    lines.append("  Prefect: prefect server start   (then open the flow run of lm-pipeline)")
    if result.get("dvc_experiment"):
        lines.append(f"  DVC:     experiment {result['dvc_experiment']}   (dvc exp show)")
    lines.append("           dvc metrics show; dvc plots show")
    if push:
        pushed = "pushed" if result.get("dvc_pushed") else "NOT pushed (see the log)"
        lines.append(f"  Remote:  outputs {pushed}; dvc pull restores them")
    return Text("\n".join(lines))


def print_run_end(console: Console, result: dict[str, Any], tracking_uri: str, push: bool):
    """The end of `lmforge run`: the summary table, then the "where to look" block."""
    console.print()
    console.print(
        Group(
            summary_table(result.get("stages", [])),
            Text(""),
            where_to_look(result, tracking_uri, push),
        )
    )
