"""Tests of the evaluation metrics against hand computations and known sources."""

from __future__ import annotations

import math
import random
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.ngram import NGramModel
from pipeline.data.storyworld import StoryWorld, StoryWorldSpec
from pipeline.eval import calibration as C
from pipeline.eval import generation as G
from pipeline.eval import lm as M

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world() -> StoryWorld:
    # 24 names, 24 objects, 16 places, 3-12 sentences, stop 0.2, cast 3: a wide grammar.
    return StoryWorld(StoryWorldSpec(24, 24, 16, 3, 12, 0.2, 3))


def _ngram(order: int) -> NGramModel:
    """A Kneser-Ney character n-gram (D = 0.75; k is unused by kneser_ney)."""
    return NGramModel(order, "kneser_ney", k=1.0, discount=0.75)


def _stories(world: StoryWorld, seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [world.sample(rng).text for _ in range(n)]


@pytest.fixture(scope="module")
def samples(world: StoryWorld) -> dict[str, list[str]]:
    """Two independent story-world batches, a character-trigram mimic and shuffled stories."""
    n = 150
    shuffler = random.Random(5)

    def shuffle_words(text: str) -> str:
        words = text.split()
        shuffler.shuffle(words)
        return " ".join(words)

    mimic = _ngram(3).fit(_stories(world, 3, 300))
    return {
        "a": _stories(world, 1, n),
        "b": _stories(world, 2, n),
        "mimic": mimic.generate(n, seed=4, max_chars=2000),
        "shuffled": [shuffle_words(t) for t in _stories(world, 6, n)],
    }


@pytest.fixture(scope="module")
def feats(samples: dict[str, list[str]]) -> dict[str, np.ndarray]:
    return {k: G.ngram_features(v) for k, v in samples.items()}


# ---------------------------------------------------------------------- 1. LM scores
def test_lm_scores_hand_example():
    nll = torch.tensor([LN2, LN2, 2 * LN2])  # 1 + 1 + 2 = 4 bits
    s = M.lm_scores(nll, n_bytes=2)
    assert s["bits_per_byte"] == pytest.approx(2.0)
    assert s["bits_per_token"] == pytest.approx(4 / 3)
    assert s["cross_entropy"] == pytest.approx(4 * LN2 / 3)
    assert s["perplexity"] == pytest.approx(2 ** (4 / 3))
    assert s["num_tokens"] == 3 and s["num_bytes"] == 2


@pytest.mark.parametrize("V", [2, 50, 4096])
def test_uniform_model_has_perplexity_V(V):
    logits = torch.zeros(64, V)  # (N, V) uniform
    targets = torch.randint(0, V, (64,), generator=torch.Generator().manual_seed(0))
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")  # (N,)
    s = M.lm_scores(nll, n_bytes=64)
    assert s["perplexity"] == pytest.approx(V, rel=1e-5)
    assert s["bits_per_token"] == pytest.approx(math.log2(V), rel=1e-6)
    assert s["bits_per_byte"] == pytest.approx(math.log2(V), rel=1e-6)  # one byte per token


@pytest.mark.parametrize(
    "nll, n_bytes",
    [(torch.tensor([]), 1), (torch.tensor([1.0]), 0), (torch.tensor([math.nan]), 1)],
)
def test_lm_scores_rejects_bad_input(nll, n_bytes):
    with pytest.raises(ValueError, match="lm_scores"):
        M.lm_scores(nll, n_bytes)


def test_target_bytes_and_exact_bits_per_byte():
    table = torch.tensor([0, 1, 2, 4])  # id 0 the separator (0 bytes), id 3 a 4-byte emoji
    y = torch.tensor([[1, 3, 0], [2, 2, -1]])  # -1: padding, not scored
    assert int(M.target_bytes(y, table)) == 1 + 4 + 0 + 2 + 2  # = 9
    nll = torch.tensor([1.0, 2.0, 0.5, 0.25, 0.25])  # the 5 scored targets, the EOT's kept
    got = M.lm_scores(nll, int(M.target_bytes(y, table)))["bits_per_byte"]
    assert got == pytest.approx(4.0 / LN2 / 9)


def test_loss_by_position():
    assert M.loss_by_position(torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 1.0]])) == [2.0, 3.0, 0.5]
    with pytest.raises(ValueError):
        M.loss_by_position(torch.ones(3))


# ------------------------------------------------------------------------- 2. KL rate
def test_kl_rate_hand_example():
    r = M.kl_rate([10.0, 20.0, 14.0], [8.0, 15.0, 12.0], [4, 8, 4])
    assert r["kl_bits_per_byte"] == pytest.approx(9 / 16)
    assert r["model_bits_per_byte"] == pytest.approx(44 / 16)
    assert r["source_bits_per_byte"] == pytest.approx(35 / 16)
    resid = np.array([2.0, 5.0, 2.0]) - 9 / 16 * np.array([4, 8, 4])
    se = math.sqrt(resid.var(ddof=1) / 3) / (16 / 3)
    assert r["stderr"] == pytest.approx(se)
    assert r["ci_low"] == pytest.approx(9 / 16 - 1.96 * se)
    assert r["ci_high"] == pytest.approx(9 / 16 + 1.96 * se)
    assert r["num_docs"] == 3


def test_model_equal_to_source_has_zero_kl(world):
    stories = [world.sample(random.Random(s)) for s in range(40)]
    bits = [-s.log_prob / LN2 for s in stories]
    n_bytes = [len(s.text.encode("utf-8")) for s in stories]
    model_bits = [-world.log_prob(s.text) / LN2 for s in stories]  # the source, rescored
    r = M.kl_rate(model_bits, bits, n_bytes)
    assert r["kl_bits_per_byte"] == 0.0
    assert r["stderr"] == 0.0 and r["ci_low"] == r["ci_high"] == 0.0
    est = world.entropy_rate(40, seed=0)
    assert r["source_bits_per_byte"] == pytest.approx(est.bits_per_byte, rel=0.25)


def _toy_docs(rng: np.random.Generator, shape: tuple[int, ...], p, s, q, t):
    """Docs of i.i.d. 1-byte chars from categorical p, stopping w.p. s after each step.

    Returns (-log2 P, -log2 Q, bytes) per doc, where Q is chars from q with stop prob t.
    """
    L = rng.geometric(s, size=shape) - 1  # chars before the stop event, P(L=l) = (1-s)^l s
    counts = rng.multinomial(L, p)  # (*shape, A)
    logp = counts @ np.log(p) + L * math.log(1 - s) + math.log(s)
    logq = counts @ np.log(q) + L * math.log(1 - t) + math.log(t)
    return -logp / LN2, -logq / LN2, L


TOY = {"p": np.array([0.4, 0.3, 0.2, 0.1]), "s": 0.2, "q": np.full(4, 0.25), "t": 0.3}


def _toy_kl_per_byte(p, s, q, t) -> float:
    """Closed form: per char KL(p||q) + continue-event term, plus the stop term once per doc
    (E[L] = (1-s)/s chars per doc), in bits per byte."""
    per_char = float(np.sum(p * np.log(p / q))) + math.log((1 - s) / (1 - t))
    return (per_char + s / (1 - s) * math.log(s / t)) / LN2


def test_kl_rate_matches_closed_form_on_toy_source():
    rng = np.random.default_rng(0)
    source, model, n_bytes = _toy_docs(rng, (20000,), **TOY)
    r = M.kl_rate(model, source, n_bytes)
    truth = _toy_kl_per_byte(**TOY)
    assert truth > 0.1
    assert abs(r["kl_bits_per_byte"] - truth) < 4 * r["stderr"]
    assert r["stderr"] < 0.02
    assert r["kl_bits_per_byte"] == pytest.approx(
        r["model_bits_per_byte"] - r["source_bits_per_byte"]
    )


def test_kl_rate_interval_covers_truth_about_95_percent():
    rng = np.random.default_rng(1)
    source, model, n_bytes = _toy_docs(rng, (300, 400), **TOY)  # 300 runs of 400 docs
    truth = _toy_kl_per_byte(**TOY)
    runs = [M.kl_rate(model[i], source[i], n_bytes[i]) for i in range(300)]
    hits = [r["ci_low"] <= truth <= r["ci_high"] for r in runs]
    assert 0.90 <= np.mean(hits) <= 0.99


def test_kl_rate_with_ngram_mimic_as_source(world):
    source = _ngram(4).fit(_stories(world, 7, 200))
    docs = source.generate(200, seed=8, max_chars=5000)
    model = _ngram(2).fit(_stories(world, 9, 200))
    src_bits = [-source.log_prob(d) / LN2 for d in docs]
    mod_bits = [-model.log_prob(d) / LN2 for d in docs]
    n_bytes = [len(d.encode("utf-8")) for d in docs]
    r = M.kl_rate(mod_bits, src_bits, n_bytes)
    assert r["source_bits_per_byte"] == pytest.approx(source.bits_per_byte(docs))
    assert r["ci_low"] > 0  # a bigram model is clearly worse than the 4-gram source
    self_r = M.kl_rate(src_bits, src_bits, n_bytes)
    assert self_r["kl_bits_per_byte"] == 0.0 and self_r["stderr"] == 0.0


def test_kl_rate_infinite_when_model_gives_zero_probability():
    r = M.kl_rate([5.0, math.inf], [4.0, 3.0], [2, 2])
    assert r["kl_bits_per_byte"] == math.inf and r["source_bits_per_byte"] == 1.75


@pytest.mark.parametrize(
    "args, match",
    [
        (([1.0], [1.0], [1]), "at least 2"),
        (([1.0, 2.0], [1.0], [1, 1]), "one entry per document"),
        (([1.0, 2.0], [1.0, math.inf], [1, 1]), "source_nll_bits"),
        (([1.0, 2.0], [1.0, 1.0], [0, 0]), "positive total"),
        (([1.0, math.nan], [1.0, 1.0], [1, 1]), "NaN"),
    ],
)
def test_kl_rate_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        M.kl_rate(*args)


# ---------------------------------------------------------------------- 3. calibration
def test_perfectly_calibrated_toy_has_zero_ece_and_known_brier():
    probs = torch.tensor([[0.7, 0.3]], dtype=torch.float64).repeat(10, 1)  # (10, 2)
    targets = torch.tensor([0] * 7 + [1] * 3)  # right 70% of the time
    c = C.calibration(probs, targets, n_bins=10)
    assert c["ece"] == pytest.approx(0.0, abs=1e-12)
    # correct: 0.3^2 + 0.3^2 = 0.18; wrong: 0.7^2 + 0.7^2 = 0.98
    assert c["brier"] == pytest.approx(0.7 * 0.18 + 0.3 * 0.98)
    assert c["accuracy"] == pytest.approx(0.7)
    assert c["entropy"] == pytest.approx(-(0.7 * math.log(0.7) + 0.3 * math.log(0.3)))
    assert c["nll"] == pytest.approx(-(0.7 * math.log(0.7) + 0.3 * math.log(0.3)))


def test_overconfident_toy_has_known_ece():
    probs = torch.tensor([[0.9, 0.05, 0.05]]).repeat(10, 1)  # (10, 3) confidence 0.9
    targets = torch.tensor([0] * 5 + [1] * 5)  # accuracy 0.5
    c = C.calibration(probs, targets, n_bins=15)
    assert c["ece"] == pytest.approx(0.4)
    assert c["mce"] == pytest.approx(0.4)
    full = [b for b in c["diagram"] if b["count"]]
    assert len(full) == 1 and full[0]["lower"] <= 0.9 < full[0]["upper"]
    assert full[0]["confidence"] == pytest.approx(0.9) and full[0]["accuracy"] == 0.5


def test_two_bins_ece_is_count_weighted():
    probs = torch.tensor([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 6)  # (10, 2)
    targets = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])  # bin 0.9: 4/4, bin 0.5: 2/6
    c = C.calibration(probs, targets, n_bins=10)
    assert c["ece"] == pytest.approx(0.4 * 0.05 + 0.6 * (0.55 - 2 / 6))


def test_one_hot_correct_predictions():
    targets = torch.tensor([2, 0, 1, 3])
    probs = torch.nn.functional.one_hot(targets, 5).double()  # (4, 5)
    c = C.calibration(probs, targets)
    assert c["brier"] == 0.0 and c["entropy"] == 0.0 and c["ece"] == 0.0
    assert c["accuracy"] == 1.0 and c["nll"] == 0.0
    assert c["diagram"][-1]["count"] == 4  # confidence 1.0 lands in the last bin


@pytest.mark.parametrize("V", [2, 7, 1000])
def test_uniform_predictions_have_entropy_ln_V(V):
    acc = C.CalibrationAccumulator(15).update(torch.zeros(8, V), torch.arange(8) % V)
    assert acc.result()["entropy"] == pytest.approx(math.log(V), rel=1e-12)
    assert acc.result()["nll"] == pytest.approx(math.log(V), rel=1e-12)


def test_accumulator_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, 50, generator=g) * 3  # (N, V)
    targets = torch.randint(0, 50, (1000,), generator=g)
    targets[::17] = -100  # padding is ignored
    keep = targets != -100
    one_shot = C.calibration(torch.softmax(logits[keep].double(), -1), targets[keep], n_bins=15)
    acc = C.CalibrationAccumulator(15)
    for start in range(0, 1000, 137):
        acc.update(logits[start : start + 137], targets[start : start + 137])
    streamed = acc.result()
    assert streamed["count"] == one_shot["count"] == int(keep.sum())
    for key in ("ece", "mce", "brier", "entropy", "accuracy", "confidence", "nll"):
        assert streamed[key] == pytest.approx(one_shot[key], rel=1e-10, abs=1e-12), key
    for a, b in zip(streamed["diagram"], one_shot["diagram"], strict=True):
        assert a["count"] == b["count"]
    assert sum(b["count"] for b in streamed["diagram"]) == streamed["count"]


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    v=st.integers(2, 9),
    split=st.integers(0, 40),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.1, 10.0),
)
def test_calibration_is_chunk_invariant_and_bounded(n, v, split, seed, scale):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, v, (n,), generator=g)
    whole = C.CalibrationAccumulator(10).update(logits, targets).result()
    k = min(split, n)
    parts = C.CalibrationAccumulator(10).update(logits[:k], targets[:k])
    parts = parts.update(logits[k:], targets[k:]).result()
    for key in ("ece", "brier", "entropy", "nll"):
        assert parts[key] == pytest.approx(whole[key], rel=1e-9, abs=1e-12)
    assert 0.0 <= whole["ece"] <= 1.0 and 0.0 <= whole["brier"] <= 2.0
    assert 0.0 <= whole["entropy"] <= math.log(v) + 1e-9


def test_calibration_rejects_bad_input():
    with pytest.raises(ValueError, match="targets"):
        C.calibration(torch.full((2, 3), 1 / 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        C.calibration(torch.full((2, 3), 1 / 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="no predictions"):
        C.CalibrationAccumulator(5).result()
    with pytest.raises(ValueError, match="n_bins"):
        C.CalibrationAccumulator(0)


def test_reliability_png(tmp_path):
    pytest.importorskip("matplotlib")
    probs = torch.softmax(torch.randn(200, 6, generator=torch.Generator().manual_seed(1)), -1)
    diagram = C.calibration(probs, torch.randint(0, 6, (200,)))["diagram"]
    out = C.reliability_png(diagram, tmp_path / "plots" / "rel.png")
    assert out == tmp_path / "plots" / "rel.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------- 4. generation
def test_distinct_n_hand_examples():
    assert G.distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert G.distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)  # ab, bc, ab, bd
    assert G.distinct_n(["a  b\nc"], 3) == 1.0  # any whitespace separates words
    assert G.distinct_n(["a", "b"], 2) == 0.0  # no bigram at all
    with pytest.raises(ValueError):
        G.distinct_n(["a"], 0)


def test_repetition_rate_hand_examples():
    looping = "the cat sat . the cat sat . the cat sat"  # 11 words, 8 4-grams, 4 new
    assert G.repetition_rate([looping], 4) == pytest.approx(4 / 8)
    assert G.repetition_rate(["a b c d e"], 4) == 0.0
    assert G.repetition_rate([looping, "a b c d e", "too short"], 4) == pytest.approx(0.25)
    assert G.repetition_rate(["x x x"], 1) == pytest.approx(2 / 3)
    assert G.repetition_rate(["short"], 4) == 0.0


def test_ngram_features_are_stable_hashed_counts():
    F = G.ngram_features(["aa", "", "abc"], n=(1,), dim=64)
    assert F.shape == (3, 64) and F.dtype == np.float64
    assert F[0, zlib.crc32(b"1:a") % 64] == pytest.approx(1.0)  # counts (2), normalized
    assert not F[1].any()  # empty text: zero row
    assert np.linalg.norm(F[2]) == pytest.approx(1.0)
    F2 = G.ngram_features(["abc", "the cat"], dim=2**12)
    np.testing.assert_array_equal(F2, G.ngram_features(["abc", "the cat"], dim=2**12))
    assert np.allclose(np.linalg.norm(F2, axis=1), 1.0)
    assert np.count_nonzero(F2[0]) == 6  # a, b, c, ab, bc, abc (no collision at 4096)


def _brute_mmd2(X, Y, gamma):
    k = lambda a, b: math.exp(-gamma * float(np.sum((a - b) ** 2)))  # noqa: E731
    m, n = len(X), len(Y)
    xx = sum(k(X[i], X[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(Y[i], Y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x, y) for x in X for y in Y) / (m * n)
    return xx + yy - 2 * xy


def test_mmd2_matches_brute_force():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(6, 3)), rng.normal(1.0, 1.0, size=(5, 3))
    assert G.mmd2(X, Y, gamma=0.3) == pytest.approx(_brute_mmd2(X, Y, 0.3), rel=1e-10)
    Z = np.concatenate([X, Y])
    d2 = [float(np.sum((a - b) ** 2)) for i, a in enumerate(Z) for b in Z[i + 1 :]]
    gamma = 1 / (2 * float(np.median(d2)))
    assert G.mmd2(X, Y) == pytest.approx(_brute_mmd2(X, Y, gamma), rel=1e-10)


def test_mmd_and_precision_recall_separate_sources(feats):
    # The null distribution of MMD^2 when both sides come from one source: random re-splits
    # of the pooled a + b sample (exchangeable under H0; the pooled median gamma is the same).
    pooled, m = np.concatenate([feats["a"], feats["b"]]), len(feats["a"])
    rng = np.random.default_rng(0)
    null = []
    for _ in range(40):
        perm = rng.permutation(len(pooled))
        null.append(G.mmd2(pooled[perm[:m]], pooled[perm[m:]]))
    q95 = float(np.quantile(null, 0.95))
    assert abs(G.mmd2(feats["a"], feats["b"])) < q95
    for other in ("mimic", "shuffled"):
        diff = G.mmd2(feats["a"], feats[other])
        assert diff > max(null) and diff > 3 * q95
    pr_same = G.precision_recall_knn(feats["a"], feats["b"], k=3)
    pr_mimic = G.precision_recall_knn(feats["a"], feats["mimic"], k=3)
    assert pr_same["precision"] > 0.7 and pr_same["recall"] > 0.7
    assert pr_mimic["precision"] < pr_same["precision"] - 0.3
    assert pr_mimic["recall"] < pr_same["recall"] - 0.1


def test_precision_recall_hand_example():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # 1-NN radius 1 everywhere
    gen = np.array([[0.1], [0.4], [10.0], [10.5]])  # 1-NN radii 0.3, 0.3, 0.5, 0.5
    pr = G.precision_recall_knn(real, gen, k=1)
    assert pr["precision"] == 0.5  # 0.1 and 0.4 lie in the ball around real 0
    assert pr["recall"] == 0.25  # only real 0 lies in a generated ball (around 0.1)
    pr_self = G.precision_recall_knn(real, real.copy(), k=1)
    assert pr_self == {"precision": 1.0, "recall": 1.0}
    with pytest.raises(ValueError, match="at least"):
        G.precision_recall_knn(real[:2], gen, k=3)


# ------------------------------------------------------------------------ 5. validity
def test_validity_rate(world, samples):
    assert G.validity_rate(samples["a"], world.is_valid) == 1.0
    broken = [samples["a"][0], samples["a"][1].replace(".", "!"), "Mia was in the moon."]
    assert G.validity_rate(broken, world.is_valid) == pytest.approx(1 / 3)
    assert G.validity_rate(samples["shuffled"][:20], world.is_valid) < 0.2
    with pytest.raises(ValueError):
        G.validity_rate([], world.is_valid)
