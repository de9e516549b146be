"""Tests of the drift (unigram KL, length distance) and contamination checks."""

from __future__ import annotations

import inspect
import itertools
import json
import math

import numpy as np
import pytest

from pipeline.data.drift import (
    NGramIndex,
    length_distance,
    unigram_kl,
)

REAL = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles",
    "Now is the winter of our discontent made glorious summer by this sun of York; and all "
    "the clouds that lour'd upon our house in the deep bosom of the ocean buried.",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    "All the world's a stage.",
]
SYNTHETIC = [
    "The little robot found a shiny red key under the old oak tree near the quiet river bank "
    "and carried it home to show its friend the curious grey cat who lived next door.",
    "A tiny dragon learned to bake bread with its grandmother every sunday morning in spring.",
    "Short story.",
]


def test_kl_is_zero_for_identical_sets_and_positive_otherwise():
    assert unigram_kl(REAL, REAL) == 0.0
    assert unigram_kl(REAL, list(reversed(REAL))) == pytest.approx(0.0, abs=1e-12)
    assert unigram_kl(SYNTHETIC, REAL) > 0.0
    assert unigram_kl(["aaaa"], ["bbbb"]) > unigram_kl(["aab"], ["abb"]) > 0


def test_kl_matches_hand_computation():
    # P = (2/3, 1/3), Q = (1/3, 2/3) over {a, b}; mixed with eps uniform mass.
    eps = 1e-6
    p = np.array([2 / 3, 1 / 3]) * (1 - eps) + eps / 2
    q = np.array([1 / 3, 2 / 3]) * (1 - eps) + eps / 2
    expected = float(np.sum(p * np.log2(p / q)))
    assert unigram_kl(["aa", "b"], ["abb"], smoothing=eps) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1 / 3, rel=1e-5)  # the unsmoothed KL is 1/3 bit


def test_kl_of_unseen_character_is_finite_and_large():
    kl = unigram_kl(["ab"], ["aa"], smoothing=1e-6)
    assert math.isfinite(kl) and kl > 5


def test_kl_validates_inputs():
    with pytest.raises(ValueError, match="smoothing"):
        unigram_kl(["a"], ["a"], smoothing=0.0)
    with pytest.raises(ValueError, match="q_docs"):
        unigram_kl(["a"], ["", ""])


def test_length_distance_zero_for_identical_and_grows_with_shift():
    rng = np.random.default_rng(0)
    base = rng.integers(10, 2000, size=500)
    assert length_distance(base, base) == 0.0
    assert length_distance(base, rng.permutation(base)) == 0.0
    shifts = [length_distance(base, base * s) for s in (1.5, 2, 4, 8)]
    assert all(a < b for a, b in itertools.pairwise(shifts))
    # scale-free: a factor-2 change in (large) lengths is about ln 2 away
    assert length_distance(base * 1000, base * 2000) == pytest.approx(math.log(2), rel=1e-3)
    assert length_distance([3, 5], [5, 3, 3, 5]) == 0.0


def test_length_distance_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 500, size=97), rng.integers(0, 900, size=41)
    expected = scipy_stats.wasserstein_distance(np.log1p(a), np.log1p(b))
    assert length_distance(a, b) == pytest.approx(expected, rel=1e-12)


def test_length_distance_validates_inputs():
    with pytest.raises(ValueError, match="a_lengths"):
        length_distance([], [1])
    with pytest.raises(ValueError, match="b_lengths"):
        length_distance([1], [-1])


def test_contamination_catches_planted_duplicate_and_shared_ngram():
    index = NGramIndex(REAL, n=13)
    shared = " ".join(REAL[1].split()[5:18])  # 13 words of a reference doc
    planted = [
        SYNTHETIC[0],
        "  " + REAL[0].upper().replace(" ", "\n  ") + " ",  # exact duplicate after normalizing
        "Once upon a time a frog said that " + shared + " and then hopped away happily.",
        SYNTHETIC[1],
    ]
    report = index.find_leaks(planted)
    assert (report.n_docs, report.exact_duplicates, report.ngram_overlaps) == (4, 1, 1)
    assert report.contaminated == 2
    kinds = {(e.doc_index, e.kind) for e in report.examples}
    assert kinds == {(1, "exact"), (2, "ngram")}
    ngram_example = next(e for e in report.examples if e.kind == "ngram")
    assert ngram_example.text == shared.lower()
    assert len(ngram_example.text.split()) == 13
    json.dumps(report.to_dict())  # JSON-friendly
    assert report.to_dict()["contaminated_fraction"] == 0.5


def test_no_leak_on_clean_synthetic_data():
    report = NGramIndex(REAL, n=13).find_leaks(SYNTHETIC)
    assert report.contaminated == 0 and report.examples == []


def test_twelve_shared_words_are_not_a_13_gram_leak():
    shared = " ".join(REAL[1].split()[5:17])  # only 12 words
    doc = "Once upon a time a frog said that " + shared + " and then hopped away."
    assert NGramIndex(REAL, n=13).find_leaks([doc]).contaminated == 0


def test_short_docs_are_only_compared_exactly():
    index = NGramIndex(REAL, n=13)
    # "All the world's a stage." is a short reference doc: equality counts, containment doesn't
    report = index.find_leaks(["all the WORLD'S a stage.", "all the world's a stage. indeed"])
    assert (report.exact_duplicates, report.ngram_overlaps) == (1, 0)
    # a short doc made of a long reference doc's words is not an exact match
    report = index.find_leaks(["To be, or not to be, that is the question:"])
    assert report.contaminated == 0


def test_max_report_limits_examples_and_n_is_configurable():
    index = NGramIndex(REAL, n=3)
    docs = [f"story {i}: lend me your ears now" for i in range(10)]
    report = index.find_leaks(docs, max_report=4)
    assert report.ngram_overlaps == 10 and len(report.examples) == 4
    with pytest.raises(ValueError, match="n must"):
        NGramIndex(REAL, n=0)


def test_index_n_has_no_default_params_yaml_owns_it():
    """`synthesize.contamination_ngram` (20 in params.yaml) owns n; the old default was 13."""
    assert inspect.signature(NGramIndex).parameters["n"].default is inspect.Parameter.empty
    with pytest.raises(TypeError):
        NGramIndex(REAL)  # type: ignore[call-arg]
