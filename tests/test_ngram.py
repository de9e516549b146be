"""Tests of the character n-gram mimic model: normalization, exactness, sampling, save/load."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config.schema import MimicConfig
from pipeline.data.ngram import EOS, NGramModel

CORPUS = [
    "the cat sat on the mat.",
    "the dog sat on the log!",
    "a cat and a dog.",
    "",
    "tot",
    "héllo wörld ✓",
]
METHODS = ("kneser_ney", "add_k")


def next_dist(model: NGramModel, context: str) -> np.ndarray:
    """(V,) distribution of the symbol after ``context``: the table sample/log_prob share.

    White-box on purpose: the product only scores and samples, so it has no public query by
    text context, and the hand computations below check the smoothing through this table.
    """
    return model._dist(model._context_ids(context)).copy()


def kn(order: int, discount: float) -> NGramModel:
    return NGramModel(order, "kneser_ney", k=1.0, discount=discount)


def add_k(order: int, k: float) -> NGramModel:
    return NGramModel(order, "add_k", k=k, discount=0.75)


@pytest.fixture(scope="module")
def models() -> dict[tuple[int, str], NGramModel]:
    return {
        (order, method): NGramModel(order, method, k=0.5, discount=0.7).fit(CORPUS)
        for order in range(1, 6)
        for method in METHODS
    }


def test_vocab_is_training_chars_plus_eos(models):
    model = models[(3, "kneser_ney")]
    assert model.vocab[:-1] == sorted(set("".join(CORPUS)))
    assert model.vocab[model.eos_id] == EOS
    assert model.eos_id == len(model.vocab) - 1


CONTEXT_CHARS = [*sorted(set("".join(CORPUS))), "Z", "\n", "€"]  # last three are unseen


@settings(max_examples=150, deadline=None)
@given(context=st.text(alphabet=st.sampled_from(CONTEXT_CHARS), max_size=12))
def test_distributions_are_normalized(models, context):
    for model in models.values():
        p = next_dist(model, context)
        assert p.dtype == np.float64 and p.shape == (len(model.vocab),)
        assert np.all(p > 0)
        assert abs(p.sum() - 1.0) < 1e-12


@pytest.mark.parametrize("context", ["", "the ", "the cat", "xyz", "zzzz€", "the cat sat on"])
def test_named_contexts_are_normalized(models, context):
    for model in models.values():
        assert abs(next_dist(model, context).sum() - 1.0) < 1e-12


def test_only_last_order_minus_one_symbols_matter(models):
    model = models[(3, "kneser_ney")]
    np.testing.assert_array_equal(next_dist(model, "a long prefix ca"), next_dist(model, "zzca"))
    # At document start the context is BOS-padded, which differs from seen text.
    assert not np.array_equal(next_dist(model, "t"), next_dist(model, " t"))


@pytest.mark.parametrize("doc", ["the cat sat on the log.", "", "tot", "a dog ✓"])
def test_log_prob_is_sum_of_next_distribution_logs(models, doc):
    for model in models.values():
        expected = sum(
            math.log(next_dist(model, doc[:i])[model.vocab.index(c)]) for i, c in enumerate(doc)
        )
        expected += math.log(next_dist(model, doc)[model.eos_id])
        assert model.log_prob(doc) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_log_prob_of_unseen_char_is_minus_inf(models):
    for model in models.values():
        assert model.log_prob("the cat Zat") == -math.inf


def test_add_k_order_one_matches_hand_computation():
    # counts a:1, b:2, EOS:2 (N = 5), V = 3, k = 1: p = (c + 1) / (5 + 3)
    model = add_k(1, k=1.0).fit(["ab", "b"])
    assert model.vocab == ["a", "b", EOS]
    np.testing.assert_allclose(next_dist(model, "whatever"), [2 / 8, 3 / 8, 3 / 8])
    assert model.log_prob("ba") == pytest.approx(math.log(3 / 8 * 2 / 8 * 3 / 8))


def test_add_k_backs_off_to_seen_suffix():
    model = add_k(2, k=1.0).fit(["ab", "b"])
    # context "x" is unseen (and "x" is not even in the vocab) -> unigram add-k
    np.testing.assert_allclose(next_dist(model, "x"), [2 / 8, 3 / 8, 3 / 8])
    # context "a" seen once, followed by b: (c + 1) / (1 + 3)
    np.testing.assert_allclose(next_dist(model, "a"), [1 / 4, 2 / 4, 1 / 4])


def test_kneser_ney_matches_hand_computation():
    # docs "ab", "b"; order 2, D = 0.5; bigrams (BOS,a) (a,b) (b,EOS)x2 (BOS,b).
    # continuation counts: a <- {BOS} = 1, b <- {a, BOS} = 2, EOS <- {b} = 1; total 4, 3 types.
    # P_uni(w) = (N1+(.w) - D) / 4 + D * 3 / 4 * 1/3 = (0.25, 0.5, 0.25)
    # P(w | a): c(a b) = 1: P(b|a) = 0.5 / 1 + 0.5 * 1 / 1 * 0.5 = 0.75, others 0.5 * 0.25
    # P(w | BOS): c = {a: 1, b: 1}: P(a) = 0.5/2 + 0.5 * 2/2 * 0.25 = 0.375, P(b) = 0.5,
    #   P(EOS) = 0.125
    model = kn(2, discount=0.5).fit(["ab", "b"])
    np.testing.assert_allclose(next_dist(model, "a"), [0.125, 0.75, 0.125], rtol=1e-15)
    np.testing.assert_allclose(next_dist(model, ""), [0.375, 0.5, 0.125], rtol=1e-15)
    np.testing.assert_allclose(next_dist(model, "€"), [0.25, 0.5, 0.25], rtol=1e-15)
    order1 = kn(1, discount=0.5).fit(["ab", "b"])
    # order 1 uses raw counts (1, 2, 2)/5 discounted, back-off to uniform
    np.testing.assert_allclose(
        next_dist(order1, ""), [(0.5 + 0.5) / 5, (1.5 + 0.5) / 5, (1.5 + 0.5) / 5]
    )


@pytest.mark.parametrize("method", METHODS)
def test_samples_use_vocab_and_are_deterministic(models, method):
    model = models[(4, method)]
    docs = model.generate(num_docs=30, seed=7, max_chars=200)
    assert docs == model.generate(num_docs=30, seed=7, max_chars=200)
    assert docs != model.generate(num_docs=30, seed=8, max_chars=200)
    vocab = set(model.vocab)
    assert all(set(doc) <= vocab and len(doc) <= 200 for doc in docs)
    assert all(math.isfinite(model.log_prob(doc)) for doc in docs)
    assert model.sample(np.random.default_rng(0), max_chars=0) == ""


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trips_exactly(models, method, tmp_path):
    model = models[(5, method)]
    path = tmp_path / "mimic.json"
    model.save(path)
    assert not path.with_suffix(".tmp").exists()
    loaded = NGramModel.load(path)
    assert repr(loaded) == repr(model) and loaded.vocab == model.vocab
    for context in ["", "the c", "a cat and", "zz€", "héllo"]:
        np.testing.assert_array_equal(next_dist(loaded, context), next_dist(model, context))
    assert loaded.generate(5, seed=1, max_chars=100) == model.generate(5, seed=1, max_chars=100)


def test_load_rejects_bad_files(tmp_path, models):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json"):
        NGramModel.load(bad)
    state = models[(2, "add_k")].state_dict()
    state["ngrams"] = state["ngrams"][:-1]
    bad.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="ngrams"):
        NGramModel.load(bad)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"order": 0}, "order"),
        ({"order": 2.5}, "order"),
        ({"smoothing": "witten_bell"}, "smoothing"),
        ({"k": 0.0}, "k"),
        ({"k": float("inf")}, "k"),
        ({"discount": 1.0}, "discount"),
        ({"discount": 0.0}, "discount"),
    ],
)
def test_argument_validation_names_the_argument(kwargs, name):
    valid = {"order": 3, "smoothing": "kneser_ney", "k": 0.1, "discount": 0.75}
    with pytest.raises(ValueError, match=rf"^{name} must"):
        NGramModel(**{**valid, **kwargs})


def test_unfitted_and_empty_inputs_raise():
    with pytest.raises(RuntimeError, match="not fitted"):
        kn(3, 0.75).log_prob("")
    with pytest.raises(RuntimeError, match="not fitted"):
        kn(3, 0.75).generate(1, seed=0, max_chars=10)
    with pytest.raises(ValueError, match="docs is empty"):
        kn(3, 0.75).fit([])


def test_order_one_sample_entropy_matches_exact_value():
    # For order 1, doc length is geometric: E[-ln p(doc)] = H(p) / p(EOS) exactly.
    model = add_k(1, k=0.5).fit(CORPUS)
    p = next_dist(model, "")
    exact = -(p * np.log(p)).sum() / p[model.eos_id]
    nll = np.array([-model.log_prob(d) for d in model.generate(4000, seed=0, max_chars=10**6)])
    assert abs(nll.mean() - exact) < 4 * nll.std() / math.sqrt(len(nll))


def test_self_cross_entropy_agrees_between_independent_samples(models):
    # Two independent samples estimate the same source entropy (bits/byte) within noise.
    model = models[(4, "kneser_ney")]
    a = model.bits_per_byte(model.generate(1500, seed=1, max_chars=10**6))
    b = model.bits_per_byte(model.generate(1500, seed=2, max_chars=10**6))
    assert abs(a - b) / a < 0.05
    # The model fits its own samples better than the uniform distribution does.
    assert a < math.log2(len(model.vocab))


def test_no_defaults_that_params_yaml_owns():
    """`synthesize.mimic` owns order/smoothing/k/discount/max_chars: the library has none."""
    owned = {f.name for f in dataclasses.fields(MimicConfig)}
    params = {
        **inspect.signature(NGramModel).parameters,
        "max_chars": inspect.signature(NGramModel.sample).parameters["max_chars"],
    }
    assert owned == set(params) - {"self"}
    for name in owned:
        assert params[name].default is inspect.Parameter.empty, f"{name} has a default"
    assert inspect.signature(NGramModel.generate).parameters["max_chars"].default is (
        inspect.Parameter.empty
    )
