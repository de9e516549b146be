"""Stage evaluate: every report section, the source-as-model KL check, and determinism."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import cfg_for, prepared_project

from pipeline import metrics as M
from pipeline.data.storyworld import StoryWorld
from pipeline.stages import evaluate, finetune, pretrain, synthesize, tokenizer, validate

SMALL = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=64",
    "pretrain.micro_batch_size=8",
    "pretrain.tokens_per_step=512",
    "pretrain.max_steps=20",
    "pretrain.eval_interval=20",
    "pretrain.eval_batches=1",
    "finetune.max_steps=4",
    "finetune.micro_batch_size=4",
    "finetune.eval_examples=8",
    "finetune.sharpness_steps=2",
    "finetune.hessian_iters=3",
    "evaluate.source_docs=60",
    "evaluate.prompts=6",
    "evaluate.test_windows=16",
    "evaluate.max_new_tokens=16",
]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    return prepared_project(
        tmp_path_factory.mktemp("ev"),
        ["synthesize.finetune_docs=40", *SMALL],
        [validate, synthesize, tokenizer, pretrain, finetune],
    )


def test_report_has_every_section(finetuned):
    cfg = cfg_for(finetuned)
    evaluate.run(cfg)
    report = json.loads((cfg.path("reports") / "evaluate.json").read_text())
    test = report["test"]
    assert test["perplexity"] == pytest.approx(2.718281828 ** test["cross_entropy"], rel=1e-6)
    assert 0 < test["bits_per_byte"] < 10
    assert {"ece", "brier", "entropy"} <= set(test["calibration"])
    for source in ("storyworld", "mimic"):
        kl = report["source_kl"][source]
        assert kl["ci_low"] <= kl["kl_bits_per_byte"] <= kl["ci_high"]
        assert kl["kl_bits_per_byte"] == pytest.approx(
            kl["model_bits_per_byte"] - kl["source_bits_per_byte"]
        )
    assert set(report["sharpness"]) == set(finetune.METHODS)
    assert set(report["generation"]) == {"greedy", "beam", "temperature", "top_k", "top_p"}
    for row in report["generation"].values():
        assert 0 <= row["validity_rate"] <= 1 and 0 <= row["distinct_1"] <= 1
    assert 0 <= report["task_accuracy"] <= 1
    md = (cfg.path("reports") / "evaluate.md").read_text()
    assert "## KL rate to the true source" in md and "| storyworld |" in md
    plots = cfg.path("reports") / "plots"
    curve = json.loads((plots / "loss_by_position.json").read_text())
    assert len(curve) == cfg.model.block_size
    assert (plots / "reliability.json").is_file()


def test_rerun_gives_the_same_report(finetuned):
    cfg = cfg_for(finetuned)
    evaluate.run(cfg)
    first = (cfg.path("reports") / "evaluate.json").read_bytes()
    evaluate.run(cfg)
    assert (cfg.path("reports") / "evaluate.json").read_bytes() == first


def test_a_model_that_is_the_source_scores_zero_kl(finetuned):
    """The KL path of the stage, fed the source's own bits as the model's, gives exactly 0."""
    cfg = cfg_for(finetuned)
    world = StoryWorld(evaluate.storyworld_spec(cfg))
    rng = random.Random(0)
    stories = [world.sample(rng) for _ in range(50)]
    bits = [-s.log_prob / evaluate.LN2 for s in stories]
    kl = M.kl_rate(bits, bits, [len(s.text.encode()) for s in stories])
    assert kl["kl_bits_per_byte"] == 0 and kl["ci_low"] == kl["ci_high"] == 0


def test_doc_bits_match_a_token_by_token_computation(finetuned):
    cfg = cfg_for(finetuned)
    model = evaluate.load_model(cfg.path("finetune"))
    ids = [[5, 17, 42], [7, 7]]
    got = evaluate.doc_bits(model, ids, eot=0)
    for doc, bits in zip(ids, got, strict=True):
        seq = torch.tensor([[0, *doc, 0]])
        logits, _ = model(seq[:, :-1])
        logp = torch.log_softmax(logits[0], -1)
        want = -sum(logp[i, t].item() for i, t in enumerate(seq[0, 1:].tolist())) / evaluate.LN2
        assert bits == pytest.approx(want, rel=1e-5)
