"""The human-readable evaluate report (`reports/evaluate.md`) and its numbers for MLflow.

Every table goes through `pipeline.core.markdown.table`: numbers are formatted here (the
report's fixed digits), names are escaped there, so no strategy or source name breaks a row.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.markdown import Md, table
from pipeline.core.nested import flatten


def markdown(report: dict[str, Any], gens: dict[str, list[str]], k: int) -> str:
    """`reports/evaluate.md`: the report's tables and the first `k` generations per strategy."""
    lines = [
        "# Evaluation",
        *_test_section(report["test"]),
        *_baselines_section(report["test"]["bits_per_byte"], report.get("baselines")),
        *_kl_section(report["source_kl"]),
        *_sharpness_section(report["sharpness"], report.get("flatness", [])),
        *_decoding_section(report["generation"]),
        *_task_section(report.get("task")),
        "",
        "## Samples",
        "",
    ]
    for s, texts in gens.items():
        lines += [f"### {s}", ""] + [f"- {t!r}" for t in texts[:k]] + [""]
    return "\n".join(lines) + "\n"


def _test_section(t: dict[str, Any]) -> list[str]:
    c = t["calibration"]
    header = ["cross-entropy (nats/token)", "perplexity", "bits/byte", "ECE", "Brier", "entropy"]
    row = [f"{t['cross_entropy']:.4f}", f"{t['perplexity']:.3f}", f"{t['bits_per_byte']:.4f}"]
    row += [f"{c['ece']:.4f}", f"{c['brier']:.4f}", f"{c['entropy']:.4f}"]
    return ["", "## Held-out test split", "", *table(header, [row])]


BASELINE_NAMES = {
    "ngram": "character {order}-gram ({smoothing})",
    "unigram": "character unigram (add-one)",
    "xz": "xz -{preset}, conditioned on train",
}


def _baselines_section(model_bpb: float, b: dict[str, Any] | None) -> list[str]:
    """The model's test bits/byte beside each classical baseline's, on the same test split."""
    if b is None:
        return []
    rows = [["this model", f"{model_bpb:.4f}", "0.0000"]]
    for key, label in BASELINE_NAMES.items():
        bpb = b[key]["bits_per_byte"]
        rows.append([label.format(**b[key]), f"{bpb:.4f}", f"{bpb - model_bpb:+.4f}"])
    scope = (
        "the model's score covers the same split"
        if b["model_scores_whole_split"]
        else "the model's score covers only `evaluate.test_windows` windows of it"
    )
    return [
        "",
        "## Baselines on the test split",
        "",
        f"Fitted on the real training split ({b['train_docs']} documents), scored on all "
        f"{b['test_docs']} test documents ({b['test_bytes']} bytes); {scope}. The last column "
        "is how many bits/byte the model saves over each.",
        "",
        *table(["model", "test bits/byte", "model's gain"], rows),
    ]


def _kl_section(source_kl: dict[str, dict[str, Any]]) -> list[str]:
    header = ["source", "model bits/byte", "source entropy bits/byte", "KL bits/byte", "95% CI"]
    header += ["docs", "docs over one window"]
    rows = [
        [
            name,
            f"{r['model_bits_per_byte']:.4f}",
            f"{r['source_bits_per_byte']:.4f}",
            f"{r['kl_bits_per_byte']:.4f}",
            Md(f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]"),  # our brackets, not a link
            str(r["num_docs"]),
            str(r["multi_window_docs"]),
        ]
        for name, r in source_kl.items()
    ]
    return [
        "",
        "## KL rate to the true source",
        "",
        "Whole documents are scored, each token once with up to the model's full context;",
        "the last column counts the documents longer than one context window.",
        "",
        *table(header, rows),
        *_sampling_kl_table(source_kl),
    ]


def _sampling_kl_table(source_kl: dict[str, dict[str, Any]]) -> list[str]:
    """Per source and sampling strategy: the KL rate of what that strategy samples."""
    rows = [
        [
            name,
            strategy,
            f"{r['kl_bits_per_byte']:.4f}",
            Md(f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]"),
            f"{r['never_produced']:.4f}",
        ]
        for name, per_source in source_kl.items()
        for strategy, r in per_source.get("sampling", {}).items()
    ]
    if not rows:
        return []
    header = ["source", "sampling strategy", "KL bits/byte", "95% CI", "docs it never samples"]
    return [
        "",
        "The same documents scored under each sampling strategy's own distribution (the",
        "model's logits after its temperature, top-k or top-p): what sampling that way costs",
        "against the source. A strategy that drops a token the source uses never samples",
        "that document, so its KL is infinite.",
        "",
        *table(header, rows),
    ]


FLATNESS_HEADER = ["epsilon-sharpness", "largest Hessian eig.", "smallest Hessian eig."]


def flatness_cells(r: dict[str, Any]) -> list[str]:
    """The FLATNESS_HEADER cells of one method's measures (`pipeline/eval/flatness.py`)."""
    return [f"{r[k]:.4g}" for k in ("sharpness", "hessian_max_eig", "hessian_min_eig")]


def converged_cell(r: dict[str, Any]) -> str:
    return "yes" if r["hessian_converged"] else "no"


def _sharpness_section(sharpness: dict[str, dict[str, Any]], flatness: list[str]) -> list[str]:
    header = ["method", "test loss", *FLATNESS_HEADER, "converged"]
    rows = [
        [m, f"{r['test_loss']:.4f}", *flatness_cells(r), converged_cell(r)]
        for m, r in sharpness.items()
    ]
    return ["", "## Sharpness of the fine-tuned weights", "", *table(header, rows), ""] + [
        f"- {s}" for s in flatness
    ]


def _decoding_section(generation: dict[str, dict[str, float]]) -> list[str]:
    cols = list(next(iter(generation.values())))
    rows = [[s, *(f"{r[c]:.4f}" for c in cols)] for s, r in generation.items()]
    return ["", "## Decoding", "", *table(["strategy", *cols], rows)]


def _task_section(task: dict[str, Any] | None) -> list[str]:
    """The fine-tuning test split: answer loss, and exact match where it is a skill."""
    if task is None:
        return []
    what = "questions on stories" if task["kind"] == "qa" else "continuations of real text"
    line = (
        f"Fine-tuning test split ({task['examples']} {what}): answer loss "
        f"{task['answer_bits_per_byte']:.4f} bits/byte"
    )
    if "exact_match" in task:
        line += f", exact-match accuracy {task['exact_match']:.4f}"
    return ["", "## Fine-tuning task", "", line + "."]


def flat_numbers(d: dict[str, Any]) -> dict[str, float]:
    """Every finite number of a nested report, keyed by its dotted path (MLflow metrics).

    Booleans, strings, lists (tables are in the markdown) and non-finite values (an infinite
    KL) are left out: MLflow metrics are finite floats. The walk is `core.nested.flatten`.
    """
    return flatten(d, numbers_only=True)
