"""Model card: the figures a reader relies on, every section, missing reports, escaping."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.errors import LmforgeError
from pipeline.serve.model_card import (
    STAGES,
    CardInputs,
    fmt,
    load_reports,
    render_model_card,
    si,
)

SECTIONS = (
    "Data",
    "Synthetic data",
    "Tokenizer",
    "Architecture",
    "Training compute",
    "Evaluation",
    "Quality gate",
    "Decoding samples",
    "Lineage",
    "Limitations",
)

# The structure of a real `ci` run's reports (values copied from one, lists shortened).
REPORTS: dict[str, dict] = {
    "validate": {
        "aggregates": {"duplicate_fraction": 0.0, "printable_fraction": 1.0, "row_count": 2000},
        "dropped": {},
        "gate": {
            "expectations": [
                {
                    "column": "text",
                    "expectation": "expect_column_values_to_not_be_null",
                    "observed_value": None,
                    "success": True,
                    "unexpected_percent": 0.0,
                },
            ],
            "success": True,
        },
        "rows_per_source": {"storyworld": 2000},
        "splits": {
            "test": {"bytes": 19334, "docs": 94},
            "train": {"bytes": 354372, "docs": 1818},
            "val": {"bytes": 16072, "docs": 88},
        },
    },
    "synthesize": {
        "checks": {
            "mimic": {
                "contamination": {"contaminated": 0, "contaminated_fraction": 0.0},
                "drift": {"length_distance": 0.3604, "unigram_kl_bits": 0.0003364},
                "gx_success": True,
            },
        },
        "contaminated_fraction": 0.0,
        "finetune": {"kind": "qa", "test_examples": 77, "train_examples": 323},
        "generators": ["storyworld", "mimic"],
        "mimic": {"bits_per_byte_own_samples": 0.4958, "order": 5},
        "mix": {
            "real_bytes": 354372,
            "rejected_for_length": {"mimic": 5, "storyworld": 0},
            "synthetic_bytes": 88734,
            "synthetic_docs": {"mimic": 201, "storyworld": 224},
            "synthetic_share_bytes": 0.2002545666273984,
        },
        "source_entropy": {"bits_per_byte": 0.2551494, "num_docs": 10000, "stderr": 0.000261},
    },
    "tokenizer": {
        "bytes_per_token_val": 3.898132427843803,
        "eot_id": 0,
        "train_corpus_digest": "e5199c579310a17f1dadd435cda56650",
        "vocab_size": 512,
    },
    "pretrain": {
        "params": 131392,
        "steps": 60,
        "tokens_seen": 122880,
        "train_loss": 1.912,
        "val_bpb": 0.7109,
        "val_loss": 1.8806,
    },
    "finetune": {
        "compare": True,
        "method": "sam+swa",
        "methods": {
            "adamw": {
                "answer_loss": 1.9843,
                "sharpness": 0.2817,
                "task_accuracy": 0.1094,
                "hessian_max_eig": 131.54,
                "hessian_min_eig": -4.21,
                "hessian_max_residual": 0.031,
                "hessian_min_residual": 0.52,
                "hessian_converged": False,
            },
            "sam+swa": {
                "answer_loss": 2.1692,
                "sharpness": 0.1724,
                "task_accuracy": 0.04688,
                "hessian_max_eig": 92.214,
                "hessian_min_eig": 0.0312,
                "hessian_max_residual": 0.0021,
                "hessian_min_residual": 0.0009,
                "hessian_converged": True,
            },
        },
        "flatness": [
            "sam+swa is flatter than adamw by ε-sharpness (0.172 vs 0.282) "
            "and by the largest Hessian eigenvalue (92.2 vs 132).",
            "The Hessian has a negative eigenvalue for adamw (≤ -4.21): those weights are not "
            "at a minimum of the loss on this batch (a saddle point, or descent was still "
            "possible).",
        ],
    },
    "evaluate": {
        "generation": {
            "greedy": {"distinct_1": 0.2547, "mmd2": 0.2463, "validity_rate": 0.25},
        },
        "sharpness": {
            "adamw": {
                "sharpness": 0.1685,
                "test_loss": 2.7265,
                "hessian_max_eig": 49.05,
                "hessian_min_eig": -1.3,
                "hessian_converged": True,
            },
            "sam+swa": {
                "sharpness": 0.2533,
                "test_loss": 2.6518,
                "hessian_max_eig": 69.72,
                "hessian_min_eig": -0.8,
                "hessian_converged": False,
            },
        },
        "source_kl": {
            "storyworld": {
                "ci_high": 0.6955923759128475,
                "ci_low": 0.6606359621317694,
                "kl_bits_per_byte": 0.6781141690223085,
                "model_bits_per_byte": 0.9333,
                "num_docs": 200,
                "source_bits_per_byte": 0.2552,
            },
        },
        "task_accuracy": 0.05194805194805195,
        "test": {
            "bits_per_byte": 1.0280022847238974,
            "bits_per_token": 3.921,
            "calibration": {
                "accuracy": 0.2629,
                "brier": 0.8080261493278657,
                "confidence": 0.2793,
                "ece": 0.14543249801186417,
                "entropy": 3.6434,
            },
            "cross_entropy": 2.717840873658133,
            "perplexity": 15.14758136987906,
            "tokens_scored": 4096,
        },
    },
}

MODEL_CONFIG = {
    "activation": "gelu",
    "bias": False,
    "block_size": 64,
    "dropout": 0.0,
    "mlp_ratio": 4,
    "n_embd": 64,
    "n_head": 2,
    "n_layer": 2,
    "pos_encoding": "learned",
    "vocab_size": 512,
}
TOKENIZER_META = {
    "bytes_per_token": {"test": 3.886, "train": 3.895, "val": 3.898},
    "eot_id": 0,
    "special_tokens": ["<|endoftext|>"],
    "splits": {"train": {"bytes": 443106, "docs": 2243, "tokens": 116005}},
    "train_corpus_digest": "e5199c579310a17f1dadd435cda56650",
    "vocab_size": 512,
}
PARAMS = {
    "validate": {"sources": [{"kind": "storyworld", "name": "storyworld", "num_docs": 2000}]},
    "synthesize": {"generators": ["storyworld", "mimic"], "synthetic_share": 0.2},
    "tokenizer": {"special_tokens": ["<|endoftext|>"]},
    "pretrain": {"device": "auto", "max_steps": 60, "tokens_per_step": 2048},
    "finetune": {"method": "sam+swa", "max_steps": 20, "lr": 0.001, "data": "task"},
}
GATE = {
    "passed": False,
    "checks": [
        {
            "name": "test_bits_per_byte",
            "value": 1.028,
            "threshold": 2.0,
            "op": "<=",
            "passed": True,
        },
        {"name": "ece", "value": 0.1454, "threshold": 0.1, "op": "<=", "passed": False},
    ],
}


def inputs(**changes) -> CardInputs:
    """The fixture run's card inputs, with some fields replaced."""
    base = CardInputs(
        model_name="lmforge-gpt",
        reports=json.loads(json.dumps(REPORTS)),
        model_config=dict(MODEL_CONFIG),
        num_params=131392,
        tokenizer_meta=dict(TOKENIZER_META),
        params=json.loads(json.dumps(PARAMS)),
        samples=[("One day, Ben", "One day, Ben was in the playground.")],
        gate=GATE,
        lineage={"git_commit": "3f2a9c1", "dvc_experiment": "exp-ci", "prefect_run_id": "r-1"},
    )
    return dataclasses.replace(base, **changes)


def section(md: str, heading: str) -> str:
    """The body of `## heading`, up to the next `##` heading."""
    body = md.split(f"\n## {heading}\n", 1)[1]
    return body.split("\n## ", 1)[0]


def row(md: str, first_cell: str) -> str:
    """The table row whose first cell starts with `first_cell`."""
    rows = [line for line in md.splitlines() if line.startswith(f"| {first_cell}")]
    assert rows, f"no table row starting with {first_cell!r}"
    return rows[0]


def cells(line: str) -> list[str]:
    """Split a markdown table row on unescaped pipes (a backslash escapes the next char)."""
    out, cur, i = [], "", 0
    while i < len(line):
        if line[i] == "\\":
            cur, i = cur + line[i : i + 2], i + 2
            continue
        if line[i] == "|":
            out.append(cur.strip())
            cur = ""
        else:
            cur += line[i]
        i += 1
    assert out and out[0] == "" and cur.strip() == "", f"malformed row: {line!r}"
    return out[1:]


def test_card_has_title_and_every_section_in_order():
    md = render_model_card(inputs())
    assert md.startswith("# lmforge-gpt\n")
    positions = [md.index(f"\n## {h}\n") for h in SECTIONS]
    assert positions == sorted(positions)


def test_evaluation_table_shows_test_bits_per_byte_and_kl_rate_with_ci():
    ev = section(render_model_card(inputs()), "Evaluation")
    assert cells(row(ev, "test bits/byte")) == ["test bits/byte", "1.028"]
    assert cells(row(ev, "test perplexity"))[1] == "15.15"
    assert cells(row(ev, "ECE"))[1] == "0.1454"
    kl = cells(row(ev, "KL rate to the storyworld"))[1]
    assert kl.startswith("0.6781") and "0.6606" in kl and "0.6956" in kl
    assert cells(row(ev, "task accuracy"))[1] == "0.05195"
    # the fine-tuning comparison marks the method that moved on; sharpness per method
    assert "2.169" in row(ev, "sam+swa (chosen)")
    assert cells(row(ev, "adamw"))[1] == "1.984"


def test_flatness_rows_show_both_hessian_ends_and_the_stated_verdict():
    ev = section(render_model_card(inputs()), "Evaluation")
    # finetune's table: largest and smallest eigenvalue, and whether Lanczos converged
    assert cells(row(ev, "adamw"))[4:] == ["131.5", "-4.21", "no"]
    assert cells(row(ev, "sam+swa (chosen)"))[4:] == ["92.21", "0.0312", "yes"]
    # evaluate's table on the test split
    sharpness = ev.split("Sharpness of the fine-tuned weights", 1)[1]
    assert cells(row(sharpness, "adamw"))[3:] == ["49.05", "-1.3", "yes"]
    assert "| largest Hessian eigenvalue | smallest Hessian eigenvalue |" in sharpness
    # what finetune said the numbers show, as it said it
    assert (
        "- sam+swa is flatter than adamw by ε-sharpness (0.172 vs 0.282) "
        "and by the largest Hessian eigenvalue (92.2 vs 132)."
    ) in ev
    assert "- The Hessian has a negative eigenvalue for adamw (≤ -4.21): those weights" in ev


def test_a_method_that_is_not_flatter_is_stated_as_such():
    reports = json.loads(json.dumps(REPORTS))
    reports["finetune"]["flatness"] = [
        "sam+swa is NOT flatter than adamw by ε-sharpness (0.39 vs 0.15) "
        "nor by the largest Hessian eigenvalue (386 vs 68).",
    ]
    ev = section(render_model_card(inputs(reports=reports)), "Evaluation")
    assert (
        "- sam+swa is NOT flatter than adamw by ε-sharpness (0.39 vs 0.15) "
        "nor by the largest Hessian eigenvalue (386 vs 68)."
    ) in ev
    del reports["finetune"]["flatness"]  # a report from before the verdict existed
    ev = section(render_model_card(inputs(reports=reports)), "Evaluation")
    assert "What the flatness numbers show: not stated" in ev
    assert "flatter" not in ev


def test_failed_gate_check_is_shown_as_failed():
    gate = section(render_model_card(inputs()), "Quality gate")
    assert "**failed**" in gate
    assert cells(row(gate, "ece")) == ["ece", "0.1454", "≤ 0.1", "**FAIL**"]
    assert cells(row(gate, "test_bits_per_byte"))[3] == "pass"
    assert "Quality gate failed" in section(render_model_card(inputs()), "Limitations")


@pytest.mark.parametrize("stage", ["validate", "synthesize", "pretrain", "finetune", "evaluate"])
def test_missing_stage_report_says_not_available(stage):
    reports = {k: v for k, v in REPORTS.items() if k != stage}
    md = render_model_card(inputs(reports=reports))
    assert f"not available (stage {stage} not run)" in md
    assert all(f"\n## {h}\n" in md for h in SECTIONS)


def test_card_renders_with_nothing_but_a_name():
    md = render_model_card(
        inputs(
            reports={},
            model_config={},
            tokenizer_meta={},
            params={},
            samples=[],
            gate={},
            lineage={},
            num_params=0,
        )
    )
    for stage in ("validate", "synthesize", "tokenizer", "pretrain", "finetune", "evaluate"):
        assert f"not available (stage {stage} not run)" in md
    assert "not available (the gate was not evaluated)" in section(md, "Quality gate")


def test_pipes_and_newlines_in_free_text_do_not_break_table_rows():
    samples = [("Tom | Ann", "Tom said: a|b\nthen \\| left"), ("<b>x</b>", "`code` *star*")]
    lineage = {"dvc_experiment": "exp|1", "git_commit": ""}
    md = render_model_card(inputs(samples=samples, lineage=lineage))
    table = [line for line in section(md, "Decoding samples").splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(samples)  # header, rule, one line per sample
    assert all(len(cells(line)) == 3 for line in table)
    assert cells(table[2])[1] == "Tom \\| Ann"
    assert "<b>" not in md
    assert cells(row(section(md, "Lineage"), "dvc_experiment")) == ["dvc_experiment", "exp\\|1"]


def test_compute_estimates_flops_when_the_report_has_none():
    compute = section(render_model_card(inputs()), "Training compute")
    assert si(6 * 131392 * 122880, "FLOP") in compute and "6·N·D" in compute
    assert "122,880" in compute and "sam+swa" in compute
    reports = json.loads(json.dumps(REPORTS))
    reports["pretrain"].update(flops=1.5e15, tokens_per_s=2700.0, device="cpu")
    compute = section(render_model_card(inputs(reports=reports)), "Training compute")
    assert "1.5 PFLOP" in compute and "6·N·D" not in compute
    assert "2700" in compute and "cpu" in compute


def test_limitations_are_specific():
    lim = section(render_model_card(inputs()), "Limitations")
    assert "131,392 parameters" in lim and "synthetic story world" in lim
    assert "block_size = 64 tokens" in lim
    assert "No safety tuning" in lim
    assert "greedy 75 %" in lim  # hallucination = 1 - validity rate 0.25
    assert "ECE 0.1454" in lim and "overconfident" in lim


def test_numbers_are_formatted_for_people():
    assert fmt(1234567) == "1,234,567"
    assert fmt(0.123456) == "0.1235"
    assert fmt(122880.0) == "122,880"
    assert fmt(None) == "n/a"
    assert si(96.87e9, "FLOP") == "96.87 GFLOP"


def test_load_reports_skips_missing_and_names_a_corrupted_file(tmp_path: Path):
    (tmp_path / "validate.json").write_text(json.dumps(REPORTS["validate"]))
    assert load_reports(tmp_path, STAGES) == {"validate": REPORTS["validate"]}
    (tmp_path / "evaluate.json").write_text('{"test": {"bits_per_byte": 1.0')
    with pytest.raises(LmforgeError, match=r"evaluate\.json"):
        load_reports(tmp_path, STAGES)
    (tmp_path / "evaluate.json").write_text("[1, 2]")
    with pytest.raises(LmforgeError, match=r"evaluate\.json: expected a JSON object"):
        load_reports(tmp_path, STAGES)


def test_module_imports_without_torch_or_mlflow():
    code = (
        "import sys, pipeline.serve.model_card; "
        "assert not {'torch', 'mlflow'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
