"""Stage synthesize: the mix, the fine-tuning set, entropy, and the checks on synthetic data."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import cfg_for

from pipeline.core.errors import GateFailed
from pipeline.core.io import tree_md5
from pipeline.data.drift import NGramIndex
from pipeline.data.ngram import NGramModel
from pipeline.data.synthetic import drop_contaminated
from pipeline.stages import synthesize, validate


@pytest.fixture
def validated(project):
    cfg = cfg_for(project, "validate.sources=[{kind: storyworld, num_docs: 800}]")
    validate.run(cfg)
    return cfg


def test_mix_finetune_set_and_report(validated):
    cfg = validated
    summary = synthesize.run(cfg)
    out = cfg.path("synthetic")
    mix = pq.read_table(out / "pretrain_train.parquet").to_pydict()
    sources = set(mix["source"])
    assert sources == {"real", "synthetic:storyworld", "synthetic:mimic"}
    share = summary["mix"]["synthetic_share_bytes"]
    assert abs(share - cfg.synthesize.synthetic_share) < 0.02
    ft = [json.loads(x) for x in (out / "finetune_test.jsonl").read_text().splitlines()]
    assert ft and all(e["prompt"].endswith("\nA:") and e["answer"].startswith(" ") for e in ft)
    # Each answer is right: the story itself says it (the grammar's facts, rendered).
    assert all(e["answer"].strip().removeprefix("the ") in e["prompt"] for e in ft)
    report = json.loads((cfg.path("reports") / "synthesize.json").read_text())
    ent = report["source_entropy"]
    assert ent["num_docs"] >= 10000 and 0 < ent["bits_per_byte"] < 2 and ent["stderr"] > 0
    assert report["checks"]["storyworld"]["gx_success"] and report["checks"]["mimic"]["gx_success"]
    assert NGramModel.load(out / "mimic.json").order == cfg.synthesize.mimic.order


def test_rerun_is_bit_identical(validated):
    synthesize.run(validated)
    first = tree_md5(validated.path("synthetic"))
    synthesize.run(validated)
    assert tree_md5(validated.path("synthetic")) == first


def test_contamination_check_drops_a_planted_leak():
    held_out = ["the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat"]
    index = NGramIndex(held_out, n=13)
    leak = "Novel opening words. " + held_out[0].upper() + " and a novel ending."
    clean = ["a completely different story about a small red boat on a quiet lake at dawn"]
    kept, report = drop_contaminated([leak, *clean, held_out[0]], index)
    assert kept == clean
    assert report["ngram_overlaps"] == 1 and report["exact_duplicates"] == 1


def test_drift_gate_fails_and_keeps_previous_outputs(validated):
    synthesize.run(validated)
    before = tree_md5(validated.path("synthetic"))
    strict = cfg_for(validated.root, "synthesize.max_unigram_kl=0.0")
    with pytest.raises(GateFailed, match=r"synthesize\.max_unigram_kl"):
        synthesize.run(strict)
    assert tree_md5(validated.path("synthetic")) == before


def test_missing_validated_split_is_a_clear_error(project):
    with pytest.raises(GateFailed, match=r"train\.parquet: validated split not found"):
        synthesize.run(cfg_for(project))


@pytest.mark.parametrize(
    "off", ["synthesize.synthetic_share=0.0", "synthesize.max_synthetic_docs=0"]
)
def test_no_augmentation_is_a_run_with_only_real_text(project, off):
    """Both params allow 0: the mix is the real split alone, and nothing is left to check."""
    cfg = cfg_for(project, "validate.sources=[{kind: storyworld, num_docs: 400}]", off)
    validate.run(cfg)
    summary = synthesize.run(cfg)
    mix = pq.read_table(cfg.path("synthetic") / "pretrain_train.parquet").to_pydict()
    assert set(mix["source"]) == {"real"} and summary["mix"]["synthetic_bytes"] == 0
    report = json.loads((cfg.path("reports") / "synthesize.json").read_text())
    for gen in cfg.synthesize.generators:
        assert report["checks"][gen]["checked"] == "no documents to check"
