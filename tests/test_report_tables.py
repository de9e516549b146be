"""Every report table goes through pipeline/core/markdown.table: a name with a `|` or markup
(a source, a method, a strategy, a sweep point's error) stays in its cell.

Checked on the evaluate report (pipeline/eval/report.py), the finetune comparison
(pipeline/eval/comparison.py) and the sweep report (pipeline/sweep/report.py), by counting the
unescaped cell separators of every table line against its header.
"""

from __future__ import annotations

import re

from pipeline.eval.comparison import comparison_markdown
from pipeline.eval.report import markdown
from pipeline.sweep.report import report_markdown

HOSTILE = "a|b *c* <d>"  # a cell separator, emphasis and an HTML tag in one name


def tables(md: str) -> list[list[list[str]]]:
    """Each table of `md` as rows of cells (split at unescaped `|`), the header row first."""
    found: list[list[list[str]]] = []
    previous = ""
    for line in md.splitlines():
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line)[1:-1]  # outside the first and last pipe
            if not previous.startswith("|"):
                found.append([])
            found[-1].append([c.strip() for c in cells])
        previous = line
    return found


def assert_rectangular(md: str, expected_tables: int) -> list[list[list[str]]]:
    found = tables(md)
    assert len(found) == expected_tables, md
    for t in found:
        widths = {len(row) for row in t}
        assert widths == {len(t[0])}, (t, md)
    return found


def _method(i: int) -> dict[str, float | bool]:
    return {
        "test_loss": 1.5 + i,
        "sharpness": 0.01 * (i + 1),
        "hessian_max_eig": 12.0 + i,
        "hessian_min_eig": -0.001 * i,
        "hessian_converged": i == 0,
        "answer_loss": 0.7 + i,
        "task_accuracy": 0.25 * i,
        "hessian_max_residual": 1e-5,
        "hessian_min_residual": 0.03,
    }


def test_evaluate_report_tables_keep_hostile_names_in_their_cells():
    kl = {
        "model_bits_per_byte": 1.1,
        "source_bits_per_byte": 0.9,
        "kl_bits_per_byte": 0.2,
        "ci_low": 0.15,
        "ci_high": 0.25,
        "num_docs": 100,
        "multi_window_docs": 3,
    }
    calibration = {"ece": 0.01, "brier": 0.5, "entropy": 1.1}
    report = {
        "test": {
            "cross_entropy": 1.2,
            "perplexity": 3.3,
            "bits_per_byte": 0.9,
            "calibration": calibration,
        },
        "source_kl": {HOSTILE: kl},
        "sharpness": {HOSTILE: _method(0)},
        "generation": {HOSTILE: {"distinct_1": 0.5, "mmd2": 0.01}},
        "task_accuracy": None,
    }
    found = assert_rectangular(markdown(report, {}, 0), 4)
    _, kl_table, sharp, decoding = found
    assert kl_table[2][0] == sharp[2][0] == decoding[2][0] == r"a\|b \*c\* \<d\>"
    assert kl_table[2][4] == "[0.1500, 0.2500]"  # the CI's own brackets are not escaped


def test_finetune_comparison_table_keeps_hostile_names_in_their_cells():
    md = comparison_markdown({"adamw": _method(0), HOSTILE: _method(1)}, HOSTILE)
    [table] = assert_rectangular(md, 1)
    assert table[3][0] == r"a\|b \*c\* \<d\> (moves on)"


def test_sweep_table_keeps_a_failed_points_error_in_its_cell():
    row = {"point": "p0", "n_layer": 2, "n_head": 2, "n_embd": 1024, "N": 12345, "steps": 1000}
    row |= {"D": 1_024_000, "val_bpb": 1.5}
    failed = [{"point": "p1", "error": "Traceback\nValueError: shape (2|3) * `x`"}]
    [points] = assert_rectangular(report_markdown([row], None, None, failed, "no fit"), 1)
    assert points[2][:5] == ["p0", "2", "2", "1024", "12,345"]  # counts as the report had them
    assert points[3][1] == r"failed: ValueError: shape (2\|3) \* \`x\`"
