"""Model card: built from the typed config and the files the stages write, every section.

The stage reports below have the keys a real `ci`-sized run writes (values copied from one,
lists shortened); evaluate.md and finetune.md are rendered by those stages' own functions.
A register test (tests/test_register.py) renders the card of a real run end to end.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cfg_for, make_project

from pipeline.core.errors import LmforgeError
from pipeline.core.io import atomic_write_json, atomic_write_text
from pipeline.core.markdown import si
from pipeline.eval.comparison import comparison_markdown
from pipeline.eval.report import markdown as evaluate_markdown
from pipeline.serve.card_inputs import CardInputs
from pipeline.serve.model_card import render_model_card

SECTIONS = (
    "Data",
    "Synthetic data",
    "Tokenizer",
    "Architecture",
    "Training compute",
    "Evaluation",
    "Fine-tuning",
    "Quality gate",
    "Decoding samples",
    "Lineage",
    "Limitations",
)


def _method(loss: float, sharp: float, top: float, low: float, converged: bool) -> dict:
    return {
        "answer_loss": loss,
        "task_accuracy": 0.0,
        "sharpness": sharp,
        "hessian_max_eig": top,
        "hessian_min_eig": low,
        "hessian_max_residual": 0.43,
        "hessian_min_residual": 0.67,
        "hessian_converged": converged,
    }


METHODS = {
    "adamw": _method(4.5141, 0.2817, 131.54, -4.21, False),
    "sam+swa": _method(4.5305, 0.1724, 92.214, 0.0312, True),
}
EXPECTATION = {
    "column": "text",
    "expectation": "expect_column_values_to_not_be_null",
    "observed_value": None,
    "success": True,
    "unexpected_count": 0,
    "unexpected_doc_ids": [],
    "unexpected_percent": 0.0,
}
REPORTS: dict[str, dict] = {
    "validate": {
        "aggregates": {"duplicate_fraction": 0.0, "printable_fraction": 1.0, "row_count": 400},
        "dropped": {},
        "gate": {"expectations": [EXPECTATION], "success": True},
        "rows_per_source": {"storyworld": 400},
        "splits": {
            "test": {"bytes": 5023, "docs": 23},
            "train": {"bytes": 72551, "docs": 362},
            "val": {"bytes": 2798, "docs": 15},
        },
    },
    "synthesize": {
        "checks": {
            "finetune": {"contamination": {"contaminated": 0, "contaminated_fraction": 0.0}},
            **{
                gen: {
                    "contamination": {"contaminated": 0, "contaminated_fraction": 0.0},
                    "drift": {"length_distance": dist, "unigram_kl_bits": kl},
                    "gx_success": True,
                }
                for gen, dist, kl in (
                    ("mimic", 0.4058, 0.002382),
                    ("storyworld", 0.04834, 0.003949),
                )
            },
        },
        "contaminated_fraction": 0.0,
        "finetune": {"kind": "qa", "test_examples": 8, "train_examples": 32},
        "generators": ["storyworld", "mimic"],
        "mimic": {"bits_per_byte_own_samples": 0.5307, "order": 5},
        "mix": {
            "real_bytes": 72551,
            "rejected_for_length": {"mimic": 1, "storyworld": 0},
            "synthetic_bytes": 18674,
            "synthetic_docs": {"mimic": 34, "storyworld": 47},
            "synthetic_share_bytes": 0.20470265826253767,
        },
        "source_entropy": {"bits_per_byte": 0.25519, "num_docs": 200, "stderr": 0.001926},
    },
    "pretrain": {
        "device": "cpu",
        "flops": 2652241920.0,
        "params": 34976,
        "steps": 20,
        "tokens_seen": 10240,
        "train_loss": 4.5729,
        "val_bpb": 3.6838,
        "val_loss": 4.5982,
        "world_size": 1,
    },
    "finetune": {"compare": True, "method": "sam+swa", "methods": METHODS},
    "evaluate": {
        "generation": {
            s: {"distinct_1": 0.45, "mmd2": 1.1421, "validity_rate": v}
            for s, v in (("greedy", 0.25), ("top_p", 0.5))
        },
        "sharpness": {
            "adamw": {
                "hessian_converged": False,
                "hessian_max_eig": 1.708,
                "hessian_min_eig": -0.01328,
                "sharpness": 0.03593,
                "test_loss": 4.5233,
            },
        },
        "flatness": ["adamw is alone: nothing to compare."],
        "source_kl": {
            "storyworld": {
                "ci_high": 3.5751,
                "ci_low": 3.4392,
                "kl_bits_per_byte": 3.5072,
                "model_bits_per_byte": 3.7654,
                "multi_window_docs": 46,
                "num_docs": 60,
                "source_bits_per_byte": 0.2582,
                "stderr": 0.03468,
            },
        },
        "task_accuracy": 0.0,
        "task": {
            "kind": "qa",
            "examples": 40,
            "answer_loss": 2.1,
            "answer_bits_per_byte": 3.2,
            "exact_match": 0.0,
        },
        "baselines": {
            "ngram": {"bits_per_byte": 2.6, "order": 5, "smoothing": "kneser_ney"},
            "unigram": {"bits_per_byte": 4.4, "smoothing": "add_one"},
            "xz": {"bits_per_byte": 2.9, "preset": 9},
            "train_docs": 300,
            "test_docs": 23,
            "test_bytes": 5023,
            "unseen_test_chars": 0,
            "model_scores_whole_split": True,
            "gain_over_ngram": -1.159477016252967,
        },
        "test": {
            "bits_per_byte": 3.759477016252967,
            "bits_per_token": 6.5314,
            "calibration": {
                "accuracy": 0.04395,
                "brier": 0.98358,
                "confidence": 0.01771,
                "count": 1024,
                "ece": 0.026238,
                "entropy": 5.3974,
                "mce": 0.026238,
                "nll": 4.5272,
            },
            "cross_entropy": 4.5272,
            "num_bytes": 1779,
            "num_tokens": 1024,
            "perplexity": 92.498,
            "tokens_scored": 1024,
        },
    },
}
GENS = {"greedy": ["One day, Ben was in the playground.ooo"], "top_p": ["Leo was | in"]}
META = {
    "bytes_per_token": {"test": 1.7173, "train": 1.7354, "val": 1.724},
    "dtype": "uint16",
    "eot_id": 0,
    "format_version": 1,
    "special_tokens": ["<|endoftext|>"],
    "splits": {
        s: {"bytes": b, "docs": d, "file": f"{s}.bin", "md5": "0" * 32, "tokens": t}
        for s, b, d, t in (("test", 5023, 23, 2948), ("train", 91225, 443, 53010))
    },
    "train_corpus_digest": "accaa80bfb64e8390e843421949e6095",
    "vocab_size": 300,
}
MODEL_CONFIG = {
    "activation": "gelu",
    "bias": False,
    "block_size": 64,
    "dropout": 0.0,
    "mlp_ratio": 4,
    "n_embd": 32,
    "n_head": 2,
    "n_layer": 2,
    "pos_encoding": "learned",
    "rope_base": 10000.0,
    "vocab_size": 320,
}
GATE = {
    "passed": False,
    "failed": ["ece"],
    "checks": [
        {
            "name": "test_bits_per_byte",
            "value": 3.759,
            "op": "<=",
            "threshold": 4.0,
            "passed": True,
        },
        {"name": "ece", "value": 0.1454, "op": "<=", "threshold": 0.1, "passed": False},
    ],
}


def write_run(root: Path, reports: dict[str, dict], meta: dict | None = META) -> None:
    """The files the stages write: reports/<stage>.json, evaluate.md, finetune.md, meta.json."""
    for stage, report in reports.items():
        report = copy.deepcopy(report)
        if stage == "finetune":  # as the finetune stage writes it: json and md together
            from pipeline.eval.sharpness import flatness_verdict

            report["flatness"] = flatness_verdict(report["methods"])
            md = comparison_markdown(report["methods"], report["method"])
            atomic_write_text(root / "reports" / "finetune.md", md)
        if stage == "evaluate":
            atomic_write_text(root / "reports" / "evaluate.md", evaluate_markdown(report, GENS, 1))
        atomic_write_json(root / "reports" / f"{stage}.json", report)
    if meta is not None:
        atomic_write_json(root / "data" / "tokenizer" / "meta.json", meta)


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    root = make_project(tmp_path / "proj", overrides=["register.model_name=lmforge-gpt"])
    write_run(root, REPORTS)
    return root


def card(root: Path, **changes) -> str:
    values = {
        "cfg": cfg_for(root),
        "model_config": dict(MODEL_CONFIG),
        "num_params": 34976,
        "samples": [("One day, Ben", "One day, Ben was in the playground.")],
        "gate": GATE,
        "lineage": {"git_commit": "3f2a9c1", "dvc_experiment": "exp-ci"},
        "timing": {"wall_seconds": 42.5, "tokens_per_s": 241.0},
    }
    return render_model_card(CardInputs(**(values | changes)))


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


def test_card_has_title_summary_and_every_section_in_order(run_root):
    md = card(run_root)
    assert md.startswith("# lmforge-gpt\n")
    assert "Test bits/byte: 3.759." in md and "Quality gate: **failed**" in md
    positions = [md.index(f"\n## {h}\n") for h in SECTIONS]
    assert positions == sorted(positions)


def test_evaluation_embeds_evaluate_md_without_its_samples(run_root):
    ev = section(card(run_root), "Evaluation")
    stage_md = (run_root / "reports" / "evaluate.md").read_text()
    test_row = row(stage_md, "4.5272")  # the held-out table as evaluate rendered it
    assert test_row in ev and cells(test_row)[2] == "3.7595"
    assert row(stage_md, "storyworld") in ev and "[3.4392, 3.5751]" in ev
    assert "### Held-out test split" in ev and "\n## Held-out" not in ev  # demoted under ##
    assert "# Evaluation" not in ev.replace("## Evaluation", "")
    assert "Samples" not in ev and "playground.ooo" not in ev  # the card has its own samples


def test_finetune_section_shows_the_comparison_and_its_flatness_sentences(run_root):
    ft = section(card(run_root), "Fine-tuning")
    assert cells(row(ft, "sam+swa (moves on)"))[1:6] == [
        "4.5305",
        "0.000",
        "0.1724",
        "92.21",
        "0.0312",
    ]
    assert cells(row(ft, "adamw"))[4:6] == ["131.5", "-4.21"]
    sentences = json.loads((run_root / "reports" / "finetune.json").read_text())["flatness"]
    assert sentences and all(f"- {s}" in ft for s in sentences)  # as finetune stated them
    assert any("sam+swa is flatter than adamw by ε-sharpness" in s for s in sentences)


def test_a_method_that_is_not_flatter_is_stated_as_such(run_root):
    reports = copy.deepcopy(REPORTS)
    reports["finetune"]["methods"]["sam+swa"] |= {"sharpness": 0.39, "hessian_max_eig": 386.0}
    write_run(run_root, {"finetune": reports["finetune"]})
    ft = section(card(run_root), "Fine-tuning")
    assert "sam+swa is NOT flatter than adamw" in ft


def test_data_section_shows_sources_gx_verdict_and_failed_expectations(run_root):
    data = section(card(run_root), "Data")
    num_docs = cfg_for(run_root).validate.sources[0].num_docs
    origin = f"story-world grammar, {num_docs:,} docs generated"
    assert cells(row(data, "storyworld | storyworld")) == ["storyworld", "storyworld", origin]
    assert "Great Expectations gate: **passed**, 1 of 1 expectations met." in data
    assert cells(row(data, "train")) == ["train", "362", "72,551"]
    reports = copy.deepcopy(REPORTS)
    failed = dict(
        EXPECTATION,
        expectation="expect_column_value_lengths_to_be_between",
        success=False,
        unexpected_percent=3.2,
    )
    reports["validate"]["gate"] = {"expectations": [EXPECTATION, failed], "success": False}
    write_run(run_root, {"validate": reports["validate"]})
    data = section(card(run_root), "Data")
    assert "**failed**, 1 of 2 expectations met." in data
    assert cells(row(data, "expect_column_value_lengths_to_be_between")) == [
        "expect_column_value_lengths_to_be_between",
        "text",
        "n/a",
        "3.2",
    ]


def test_synthetic_share_target_and_drift_per_generator(run_root):
    syn = section(card(run_root), "Synthetic data")
    target = cfg_for(run_root).synthesize.synthetic_share
    assert f"20.47 % (target {100 * target:.4g} %)" in syn
    assert cells(row(syn, "mimic")) == ["mimic", "34", "1", "0.002382", "0.4058", "0", "passed"]
    assert "0.2552 bits/byte" in syn and "qa task, 32 train / 8 test examples" in syn


def test_a_real_text_run_without_a_source_entropy_renders_its_card(run_root):
    # Measured: the shakespeare preset's register stage failed here ("no key
    # 'source_entropy'") once its model passed the gate: `in` on a report raised.
    # Then "no key 'checks.mimic.drift'": with synthetic_share 0 no mimic sample is added,
    # so synthesize checks none and reports why instead of a drift.
    reports = copy.deepcopy(REPORTS)
    syn_report = reports["synthesize"]
    del syn_report["source_entropy"]
    syn_report["checks"]["mimic"] = {
        "checked": "no documents to check",
        "contamination": {"contaminated": 0, "n_docs": 0},
    }
    syn_report["mix"]["synthetic_docs"]["mimic"] = 0
    write_run(run_root, {"synthesize": syn_report})
    syn = section(card(run_root), "Synthetic data")
    assert "Story-world source entropy rate" not in syn
    mimic = ["mimic", "0", "1", "n/a", "n/a", "0", "no documents to check"]
    assert cells(row(syn, "mimic")) == mimic


def test_tokenizer_section_reads_meta_json_including_another_end_of_text_token(run_root):
    tok = section(card(run_root), "Tokenizer")
    assert "`<|endoftext|>` (id 0)" in tok and cells(row(tok, "train")) == [
        "train",
        "443",
        "91,225",
        "53,010",
        "1.735",
    ]
    write_run(run_root, {}, META | {"special_tokens": ["<|end|>", "<|endoftext|>"]})
    assert "**End-of-text token:** `<|end|>` (id 0)" in section(card(run_root), "Tokenizer")


def test_architecture_is_the_model_config_with_head_size_and_parameters(run_root):
    arch = section(card(run_root), "Architecture")
    for key in MODEL_CONFIG:  # every GPTConfig field, as model_config.json has it
        assert cells(row(arch, f"{key} "))[0] == key
    assert cells(row(arch, "n_embd")) == ["n_embd", "32"]
    assert cells(row(arch, "head size")) == ["head size", "16"]  # 32 / 2 heads
    assert cells(row(arch, "parameters")) == ["parameters", "34,976 (34.98k)"]


def test_compute_shows_reported_flops_and_the_mlflow_timing(run_root):
    compute = section(card(run_root), "Training compute")
    assert si(2652241920.0, "FLOP") in compute and "10,240" in compute
    assert "42.5 s" in compute and "241" in compute and "cpu x 1" in compute
    assert "sam+swa" in compute
    compute = section(card(run_root, timing={}), "Training compute")
    assert "Wall time:** not available (no pretrain run in MLflow)" in compute


def test_failed_gate_check_is_shown_as_failed(run_root):
    md = card(run_root)
    gate = section(md, "Quality gate")
    assert "**failed**: 1 of 2 checks" in gate
    assert cells(row(gate, "ece")) == ["ece", "0.1454", "≤ 0.1", "**FAIL**"]
    assert cells(row(gate, "test_bits_per_byte"))[3] == "pass"
    assert "Quality gate failed" in section(md, "Limitations")


@pytest.mark.parametrize("stage", ["validate", "synthesize", "pretrain", "finetune", "evaluate"])
def test_missing_stage_output_says_not_available(run_root, stage):
    for path in (run_root / "reports").glob(f"{stage}.*"):
        path.unlink()
    md = card(run_root)
    assert f"not available (stage {stage} not run)" in md
    assert all(f"\n## {h}\n" in md for h in SECTIONS)


def test_card_renders_before_any_stage_ran(tmp_path):
    root = make_project(tmp_path / "empty")
    md = card(root, model_config={}, num_params=0, samples=[], gate={}, lineage={}, timing={})
    for stage in ("validate", "synthesize", "tokenizer", "pretrain", "finetune", "evaluate"):
        assert f"not available (stage {stage} not run)" in md
    assert "not available (the gate was not evaluated)" in section(md, "Quality gate")


def test_a_report_without_a_key_the_stage_writes_is_an_error_naming_file_and_key(run_root):
    reports = copy.deepcopy(REPORTS)
    del reports["pretrain"]["flops"]
    write_run(run_root, {"pretrain": reports["pretrain"]})
    with pytest.raises(LmforgeError, match=r"pretrain\.json: no key 'flops'"):
        card(run_root)
    write_run(run_root, {"pretrain": REPORTS["pretrain"]})
    del reports["validate"]["gate"]["expectations"][0]["success"]
    write_run(run_root, {"validate": reports["validate"]})
    with pytest.raises(
        LmforgeError, match=r"validate\.json: no key 'gate\.expectations\[0\]\.success'"
    ):
        card(run_root)
    write_run(run_root, {"validate": REPORTS["validate"]})
    (run_root / "reports" / "synthesize.json").write_text('{"mix": {"real_bytes": 1')
    with pytest.raises(LmforgeError, match=r"synthesize\.json: not a readable JSON report"):
        card(run_root)


def test_pipes_and_newlines_in_free_text_do_not_break_table_rows(run_root):
    samples = [("Tom | Ann", "Tom said: a|b\nthen \\| left"), ("<b>x</b>", "`code` *star*")]
    lineage = {"dvc_experiment": "exp|1", "git_commit": ""}
    md = card(run_root, samples=samples, lineage=lineage)
    table = [line for line in section(md, "Decoding samples").splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(samples)  # header, rule, one line per sample
    assert all(len(cells(line)) == 3 for line in table)
    assert cells(table[2])[1] == "Tom \\| Ann"
    assert "<b>" not in md
    assert cells(row(section(md, "Lineage"), "dvc_experiment")) == ["dvc_experiment", "exp\\|1"]
    assert cells(row(section(md, "Lineage"), "git_commit")) == ["git_commit", "n/a"]


def test_limitations_are_specific(run_root):
    lim = section(card(run_root), "Limitations")
    assert "34,976 parameters" in lim and "10,240 tokens (0.2928 per parameter" in lim
    assert "synthetic story world" in lim and "20.47 %" in lim
    assert "block_size = 64 tokens" in lim and "No safety tuning" in lim
    assert "greedy 75 %, top_p 50 %" in lim  # hallucination = 1 - validity rate
    assert "ECE 0.02624" in lim and "(underconfident)" in lim  # confidence 0.018 < acc 0.044


def test_module_imports_without_torch_or_mlflow():
    code = (
        "import sys, pipeline.serve.model_card; "
        "assert not {'torch', 'mlflow'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_card_sets_the_model_beside_the_classical_baselines(run_root):
    md = card(run_root)
    # evaluate.md's baselines table, embedded: the model, then each baseline with its gap.
    assert cells(row(md, "this model")) == ["this model", "3.7595", "0.0000"]
    assert cells(row(md, "character 5-gram"))[1:] == ["2.6000", "-1.1595"]
    assert cells(row(md, "xz -9"))[1:] == ["2.9000", "-0.8595"]
    limits = section(md, "Limitations")
    assert "1.159 bits/byte worse than a character 5-gram" in limits
