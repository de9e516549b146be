"""The classical baselines of evaluate, checked against computations made another way.

- the unigram: a brute-force count loop of add-one probabilities;
- xz: the `xz -9` command line on the same bytes;
- the n-gram: every character of the test split has a finite cost, also one that training
  never saw, and its distributions stay normalized with the extra symbol;
- the gate: the relative check passes and fails on `gain_over_ngram`.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cfg_for

from pipeline.config import GateConfig
from pipeline.core.errors import LmforgeError
from pipeline.data.baselines import (
    classical_baselines,
    fitted_ngram,
    unseen_chars,
    xz_bits_per_byte,
)
from pipeline.serve.gate import check_gate

TRAIN = [
    "the cat sat on the mat.",
    "a dog ran to the park and sat down.",
    "the bird sang in the tree all day.",
] * 20
TEST = ["the cat ran to the tree.", "a bird sat on the dog!"]  # '!' never in training


def write_split(folder: Path, name: str, texts: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts}), folder / f"{name}.parquet")


@pytest.fixture
def cfg(project: Path):
    cfg = cfg_for(project)
    write_split(cfg.path("validated"), "train", TRAIN)
    write_split(cfg.path("validated"), "test", TEST)
    return cfg


def brute_force_unigram_bpb(train: list[str], test: list[str]) -> float:
    """Add-one unigram over train's characters, test's and the end of document, by hand."""
    counts = Counter("".join(train)) + Counter({"<eos>": len(train)})
    vocab = set(counts) | set("".join(test))
    total = sum(counts.values()) + len(vocab)
    bits = 0.0
    for doc in test:
        for sym in [*doc, "<eos>"]:
            bits -= math.log2((counts[sym] + 1) / total)
    return bits / sum(len(d.encode()) for d in test)


def test_unigram_matches_a_brute_force_count(cfg):
    got = classical_baselines(cfg, model_bits_per_byte=1.0, model_whole_split=True)
    assert got["unigram"]["bits_per_byte"] == pytest.approx(
        brute_force_unigram_bpb(TRAIN, TEST), rel=1e-12
    )


@pytest.mark.skipif(shutil.which("xz") is None, reason="the xz command line is not installed")
def test_xz_matches_the_xz_command_line():
    def xz_len(data: bytes) -> int:
        out = subprocess.run(["xz", "-9", "-c"], input=data, capture_output=True, check=True)
        return len(out.stdout)

    before = "\n".join(TRAIN).encode()
    after = before + ("\n" + "\n".join(TEST)).encode()
    expected = 8 * (xz_len(after) - xz_len(before)) / sum(len(d.encode()) for d in TEST)
    assert xz_bits_per_byte(TRAIN, TEST) == pytest.approx(expected, abs=1e-12)


def test_xz_conditioning_on_train_makes_a_repeat_nearly_free():
    # A test split that repeats training costs a few bytes of back-references, not its size.
    assert xz_bits_per_byte(TRAIN, TRAIN) < 0.1 < xz_bits_per_byte(["unrelated"], TRAIN)


def test_ngram_prices_unseen_test_characters_and_stays_normalized():
    unseen = unseen_chars(TRAIN, TEST)
    model = fitted_ngram(TRAIN, unseen, order=3, smoothing="kneser_ney", k=0.1, d=0.75)
    assert "!" in model.vocab
    assert math.isfinite(model.log_prob(TEST[1]))
    for context in ("", "a", "the ca", "dog!"):
        dist = model._dist(model._context_ids(context))
        assert dist.sum() == pytest.approx(1.0, abs=1e-12)
        assert dist[model._index["!"]] > 0


def test_report_gain_and_counts(cfg):
    got = classical_baselines(cfg, model_bits_per_byte=0.5, model_whole_split=False)
    assert got["gain_over_ngram"] == pytest.approx(got["ngram"]["bits_per_byte"] - 0.5)
    assert got["ngram"]["order"] == cfg.synthesize.mimic.order
    assert (got["train_docs"], got["test_docs"], got["unseen_test_chars"]) == (60, 2, 1)
    assert got["test_bytes"] == sum(len(d.encode()) for d in TEST)
    assert got["model_scores_whole_split"] is False
    # On this repetitive text the n-gram must beat the unigram by far.
    assert got["ngram"]["bits_per_byte"] < got["unigram"]["bits_per_byte"] - 1.0


def test_an_empty_test_split_is_a_clear_error(cfg):
    write_split(cfg.path("validated"), "test", [])
    with pytest.raises(LmforgeError, match=r"test\.parquet: no documents"):
        classical_baselines(cfg, model_bits_per_byte=1.0, model_whole_split=True)


def gate(min_gain: float) -> GateConfig:
    return GateConfig(
        min_gain_over_ngram=min_gain,
        max_test_bits_per_byte=8.0,
        max_ece=1.0,
        min_task_accuracy=0.0,
    )


def evaluation(gain: float | None, kind: str = "qa") -> dict:
    ev = {
        "test": {"bits_per_byte": 1.0, "calibration": {"ece": 0.1}},
        "baselines": {} if gain is None else {"gain_over_ngram": gain},
        "task": {"kind": kind},
        "task_accuracy": 0.5 if kind == "qa" else None,
    }
    return ev


def test_gate_relative_check_on_the_gain_over_the_ngram():
    assert check_gate(evaluation(0.06), gate(0.05))["passed"]
    failed = check_gate(evaluation(0.04), gate(0.05))
    assert failed["failed"] == ["gain_over_ngram"]
    # No baseline in the report: the check cannot be made, so the model does not pass.
    assert check_gate(evaluation(None), gate(-8.0))["failed"] == ["gain_over_ngram"]


def test_gate_checks_exact_match_only_on_question_answering():
    names = [c["name"] for c in check_gate(evaluation(0.1, "continuation"), gate(0.0))["checks"]]
    assert "task_accuracy" not in names
    names = [c["name"] for c in check_gate(evaluation(0.1, "qa"), gate(0.0))["checks"]]
    assert "task_accuracy" in names
