"""Decoding tests: the KV cache against full forwards, greedy/sampling/beam search, the logit
filters, eos handling, seeding, config validation and the block_size limits."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import math
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from pipeline.config import DecodingConfig, EvaluateConfig
from pipeline.config.decoding import DecodingError
from pipeline.config.schema import DECODING_FIELDS
from pipeline.model.generate import (
    beam_search,
    filter_logits,
    generate,
    penalize_logits,
    sequence_logprob,
)
from pipeline.model.gpt import GPT, GPTConfig, KVCache
from pipeline.serve.textgen import GenerationParams, GenerationRequestError

POS = ["learned", "sinusoidal", "rotary"]
OFF = dict(  # every filter and lever off
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    num_beams=1,
    seed=0,
    no_repeat_ngram_size=0,
    repetition_penalty=1.0,
)


def dec(strategy: str, max_new_tokens: int, **settings: object) -> DecodingConfig:
    """A DecodingConfig with the given settings, the others off (it has no defaults)."""
    return DecodingConfig(strategy, max_new_tokens, **{**OFF, **settings})


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and the CI machine's 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def all_logprobs(model: GPT, prompt: list[int], conts: list[list[int]]) -> list[float]:
    """log p(cont | prompt) for equal-length continuations in one batched full forward."""
    ids = torch.tensor([prompt + c for c in conts])  # (N, P + L)
    logp = F.log_softmax(model(ids[:, :-1])[0].double(), dim=-1)[:, len(prompt) - 1 :]
    return logp.gather(-1, ids[:, len(prompt) :, None]).sum(dim=(1, 2)).tolist()


def tiny_model(pos: str = "learned", vocab: int = 7, n_layer: int = 2, seed: int = 0) -> GPT:
    """A random model with peaked distributions (std 0.3 weights), so argmax has no near-ties."""
    cfg = GPTConfig(
        vocab_size=vocab, block_size=16, n_layer=n_layer, n_head=2, n_embd=16, pos_encoding=pos
    )
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


# --------------------------------------------------------------------------------------
# KV cache against the full forward
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("pos", POS)
def test_cached_logits_equal_full_forward_at_every_step(pos: str, use_sdpa: bool) -> None:
    model = tiny_model(pos)
    model.set_use_sdpa(use_sdpa)
    torch.manual_seed(1)
    seq = torch.randint(0, 7, (3, 16))  # (B, T): the whole block
    full = model(seq)[0]  # (B, T, V)
    cache = KVCache.empty(model.config, 3)
    # Chunks: a multi-token prefill, single tokens, and multi-token chunks after a prefix
    # (the explicit-mask path), filling block_size exactly.
    t = 0
    for n in (5, 1, 1, 3, 1, 4, 1):
        logits = model(seq[:, t : t + n], cache=cache)[0]  # (B, n, V)
        torch.testing.assert_close(logits, full[:, t : t + n], atol=1e-5, rtol=0)
        t += n
        assert cache.length == t
    assert t == 16


@pytest.mark.parametrize("pos", POS)
def test_cache_reorder_selects_and_expands_the_batch(pos: str) -> None:
    model = tiny_model(pos)
    seq = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    cache = KVCache.empty(model.config, 2, max_len=8)
    model(seq[:, :3], cache=cache)
    cache.reorder(torch.tensor([1, 1, 0]))  # swap, duplicate: (2, ...) -> (3, ...)
    assert cache.batch_size == 3
    got = model(seq[[1, 1, 0], 3:], cache=cache)[0][:, -1]  # (3, V)
    want = model(seq[[1, 1, 0]])[0][:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_cache_past_block_size_raises_naming_block_size() -> None:
    model = tiny_model()
    cache = KVCache.empty(model.config, 1)
    model(torch.zeros(1, 15, dtype=torch.long), cache=cache)
    model(torch.zeros(1, 1, dtype=torch.long), cache=cache)  # exactly block_size: fine
    with pytest.raises(ValueError, match="block_size=16"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        KVCache.empty(model.config, 1, max_len=17)


def test_cache_batch_mismatch_raises() -> None:
    model = tiny_model()
    cache = KVCache.empty(model.config, 2)
    with pytest.raises(ValueError, match="KVCache"):
        model(torch.zeros(3, 2, dtype=torch.long), cache=cache)


# --------------------------------------------------------------------------------------
# Greedy and sampling
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize(
    "cfg",
    [
        dec("greedy", 12),
        dec("sample", 12, seed=3),
        dec("sample", 12, temperature=0.7, top_k=4, top_p=0.9, seed=5),
    ],
    ids=["greedy", "sample", "sample-filtered"],
)
def test_cached_and_uncached_decoding_give_the_same_tokens(pos: str, cfg: DecodingConfig) -> None:
    model = tiny_model(pos)
    prompt = torch.tensor([[1, 2, 3], [3, 0, 6]])  # (B, T)
    cached = generate(model, prompt, cfg, use_cache=True)
    uncached = generate(model, prompt, cfg, use_cache=False)
    assert cached.shape == (2, 12)
    assert torch.equal(cached, uncached)


def test_greedy_is_the_argmax_of_the_full_forward() -> None:
    model = tiny_model()
    prompt = [1, 2]
    out = generate(model, prompt, dec("greedy", 6))
    assert isinstance(out, list) and len(out) == 6
    seq = list(prompt)
    for tok in out:
        assert tok == int(model(torch.tensor([seq]))[0][0, -1].argmax())
        seq.append(tok)


@pytest.mark.parametrize("pos", POS)
def test_near_zero_temperature_sampling_equals_greedy(pos: str) -> None:
    model = tiny_model(pos)
    prompt = torch.tensor([[1, 2, 3], [5, 5, 0]])
    greedy = generate(model, prompt, dec("greedy", 10))
    cold = generate(model, prompt, dec("sample", 10, temperature=1e-4))
    assert torch.equal(greedy, cold)


def test_same_seed_same_samples_independent_of_global_rng() -> None:
    model = tiny_model(vocab=8)
    prompt = torch.tensor([[1, 2], [3, 4], [5, 6]])
    cfg = dec("sample", 12, seed=7)
    torch.manual_seed(0)
    a = generate(model, prompt, cfg)
    torch.manual_seed(123)
    _ = torch.rand(10)
    b = generate(model, prompt, cfg)
    assert torch.equal(a, b)
    others = [generate(model, prompt, dec("sample", 12, seed=s)) for s in range(8, 12)]
    assert any(not torch.equal(a, o) for o in others)
    # decoding does not advance the global RNG
    torch.manual_seed(5)
    generate(model, prompt, cfg)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


def test_eos_stops_a_sequence_and_pads_finished_rows() -> None:
    model = tiny_model()
    prompt = torch.tensor([[1, 2, 3], [3, 0, 6]])
    free = generate(model, prompt, dec("greedy", 10))
    eos = int(free[0, 2])
    stop0 = free[0].tolist().index(eos)  # row 0 emits eos first here
    out = generate(model, prompt, dec("greedy", 10), eos_id=eos)
    row1 = free[1].tolist()
    stop1 = row1.index(eos) if eos in row1 else 9
    assert out.size(1) == max(stop0, stop1) + 1  # stops once every row has emitted eos
    assert out[0, : stop0 + 1].tolist() == free[0, : stop0 + 1].tolist()
    assert (out[0, stop0:] == eos).all()  # finished row padded with eos
    assert out[1, : stop1 + 1].tolist() == row1[: stop1 + 1]
    assert (out[1, stop1:] == eos).all() or stop1 == 9
    single = generate(model, [1, 2, 3], dec("greedy", 10), eos_id=eos)
    assert single == free[0, : stop0 + 1].tolist()  # a list ends at its eos


def test_generate_restores_the_training_mode() -> None:
    model = tiny_model().train()
    generate(model, [1, 2], dec("greedy", 3))
    assert model.training
    model.eval()
    generate(model, [1, 2], dec("sample", 3))
    assert not model.training


def test_generate_crops_the_prompt_from_the_left() -> None:
    model = tiny_model("rotary")
    long_prompt = [i % 7 for i in range(30)]
    cfg = dec("greedy", 4)
    out = generate(model, long_prompt, cfg)
    # block_size 16: the prompt keeps its last 16 - 4 + 1 = 13 tokens
    assert out == generate(model, long_prompt[-13:], cfg)
    assert out == generate(model, long_prompt, cfg, use_cache=False)
    with pytest.raises(ValueError, match="block_size"):
        generate(model, [1], dec("greedy", 17))
    assert len(generate(model, [1], dec("greedy", 16))) == 16


# --------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pos", "n_new"), [("learned", 3), ("sinusoidal", 2), ("rotary", 3)])
def test_full_width_beam_search_finds_the_exact_most_probable_continuation(
    pos: str, n_new: int
) -> None:
    V = 5
    model = tiny_model(pos, vocab=V)
    prompt = [1, 4, 2]
    conts = [list(c) for c in itertools.product(range(V), repeat=n_new)]
    brute = sorted(zip(all_logprobs(model, prompt, conts), conts, strict=True), reverse=True)
    assert brute[0][0] == pytest.approx(sequence_logprob(model, prompt, brute[0][1]), abs=1e-9)
    beams = beam_search(model, prompt, V**n_new, n_new, length_penalty=0.0)
    assert len(beams) == V**n_new
    best_seq, best_score = beams[0]
    assert best_seq == brute[0][1]
    assert best_score == pytest.approx(brute[0][0], abs=1e-5)
    assert best_score == pytest.approx(sequence_logprob(model, prompt, best_seq), abs=1e-5)
    # Every continuation is returned with its exact log-prob, best first.
    scores = [s for _, s in beams]
    assert scores == sorted(scores, reverse=True)
    brute_of = {tuple(c): lp for lp, c in brute}
    for (seq, score), (lp, _) in zip(beams, brute, strict=True):
        assert score == pytest.approx(lp, abs=1e-5)  # the same order of scores
        assert score == pytest.approx(brute_of[tuple(seq)], abs=1e-5)  # each seq its own
    for seq, score in beams[:5]:
        assert score == pytest.approx(sequence_logprob(model, prompt, seq), abs=1e-5)


@pytest.mark.parametrize("pos", POS)
def test_beam_search_cached_equals_uncached_and_scores_follow_the_convention(pos: str) -> None:
    model = tiny_model(pos, vocab=8)
    prompt = [2, 5, 1]
    eos, lp = 3, 1.0
    cached = beam_search(model, prompt, 4, 8, length_penalty=lp, eos_id=eos)
    uncached = beam_search(model, prompt, 4, 8, length_penalty=lp, eos_id=eos, use_cache=False)
    assert [s for s, _ in cached] == [s for s, _ in uncached]
    for (_, a), (_, b) in zip(cached, uncached, strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    assert len(cached) == 4
    for seq, score in cached:
        assert eos not in seq[:-1]  # eos only ever ends a beam
        assert len(seq) == 8 or seq[-1] == eos
        want = sequence_logprob(model, prompt, seq) / len(seq) ** lp
        assert score == pytest.approx(want, abs=1e-5)
    assert [s for _, s in cached] == sorted((s for _, s in cached), reverse=True)


def test_single_beam_without_eos_is_greedy() -> None:
    model = tiny_model("rotary")
    prompt = [1, 2, 3]
    greedy = generate(model, prompt, dec("greedy", 8))
    [(seq, _)] = beam_search(model, prompt, 1, 8, length_penalty=0.0)
    assert seq == greedy
    assert generate(model, prompt, dec("beam", 8)) == greedy


def test_generate_beam_strategy_returns_the_best_beam() -> None:
    model = tiny_model(vocab=5)
    cfg = dec("beam", 3, num_beams=4)
    best = beam_search(model, [1, 4], 4, 3, length_penalty=0.5, eos_id=2)[0][0]
    assert generate(model, [1, 4], cfg, eos_id=2, length_penalty=0.5) == best
    batch = generate(model, torch.tensor([[1, 4], [1, 4]]), cfg, eos_id=2, length_penalty=0.5)
    assert batch[0].tolist()[: len(best)] == best
    assert torch.equal(batch[0], batch[1])


# --------------------------------------------------------------------------------------
# Logit filters
# --------------------------------------------------------------------------------------


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().view(-1).tolist()


@pytest.mark.parametrize(("p", "n_kept"), [(0.3, 1), (0.5, 1), (0.7, 2), (0.8, 2), (0.81, 3)])
def test_top_p_keeps_the_smallest_set_reaching_p(p: float, n_kept: int) -> None:
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # order shuffled: sorting must happen
    out = filter_logits(probs.log(), top_p=p)
    assert kept(out) == sorted([1, 3, 0, 2][:n_kept])
    assert kept(filter_logits(probs.log(), top_p=1.0)) == [0, 1, 2, 3]


@pytest.mark.parametrize(("p", "n_kept"), [(0.25, 1), (0.5, 2), (0.5 + 1e-3, 3), (0.75, 3)])
def test_top_p_at_an_exact_boundary_keeps_the_smaller_set(p: float, n_kept: int) -> None:
    # softmax of equal logits is exactly 0.25 each: mass 0.5 reaches p=0.5 with two tokens.
    assert len(kept(filter_logits(torch.zeros(1, 4), top_p=p))) == n_kept


def test_top_k_keeps_k_and_combines_with_top_p_and_temperature() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isfinite(out).sum(dim=1).tolist() == [2, 2]
    assert kept(out) == [1, 2]
    assert kept(filter_logits(logits, top_k=0)) == [0, 1, 2, 3, 4]
    assert kept(filter_logits(logits, top_k=99)) == [0, 1, 2, 3, 4]
    # ties: exactly k survive
    assert torch.isfinite(filter_logits(torch.zeros(1, 6), top_k=3)).sum() == 3
    # top-k renormalises before top-p: probs over {1, 2} are [0.73, 0.27]
    assert kept(filter_logits(logits, top_k=2, top_p=0.7)) == [1]
    assert kept(filter_logits(logits, top_k=2, top_p=0.75)) == [1, 2]
    # temperature divides the logits, then top-p sees the sharper distribution
    out = filter_logits(logits, temperature=0.5, top_k=3)
    torch.testing.assert_close(out[0, [1, 2, 3]], logits[0, [1, 2, 3]] / 0.5)
    sharp = F.softmax(logits[:1] / 0.1, dim=-1)
    assert sharp[0, 1] > 0.99
    assert kept(filter_logits(logits, temperature=0.1, top_p=0.99)) == [1]
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(logits, temperature=0.0)


# --------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(strategy="topk"), "strategy"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.0), "max_new_tokens"),
        (dict(max_new_tokens=None), "max_new_tokens"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=10.5), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=65), "num_beams"),
        (dict(seed=True), "seed"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**63), "seed"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
        (dict(no_repeat_ngram_size=2.0), "no_repeat_ngram_size"),
        (dict(no_repeat_ngram_size=True), "no_repeat_ngram_size"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.2), "repetition_penalty"),
        (dict(repetition_penalty=10.5), "repetition_penalty"),
        (dict(repetition_penalty=math.nan), "repetition_penalty"),
        (dict(repetition_penalty="1.2"), "repetition_penalty"),
    ],
)
def test_decoding_config_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(DecodingError, match=rf"^{field}: expected") as e:
        DecodingConfig(**{"strategy": "sample", "max_new_tokens": 4, **OFF, **kwargs})
    assert e.value.field == field


def test_generate_checks_its_eos_and_length_penalty() -> None:
    model = tiny_model(vocab=5)
    with pytest.raises(ValueError, match="eos_id"):
        generate(model, [1], dec("greedy", 2), eos_id=-1)
    with pytest.raises(ValueError, match="eos_id"):
        generate(model, [1], dec("greedy", 2), eos_id=5)  # outside the vocabulary
    with pytest.raises(ValueError, match="length_penalty"):
        generate(model, [1], dec("beam", 2), length_penalty=math.nan)
    with pytest.raises(TypeError, match="DecodingConfig"):
        generate(model, [1], {"strategy": "greedy", "max_new_tokens": 2})  # type: ignore[arg-type]


def test_beam_width_applies_to_strategy_beam_only() -> None:
    model = tiny_model()
    assert dec("beam", 4, num_beams=5).num_beams == 5
    greedy = generate(model, [1, 2], dec("greedy", 6))
    assert generate(model, [1, 2], dec("greedy", 6, num_beams=3)) == greedy  # ignored


DECODING_KNOBS = {"max_new_tokens", "temperature", "top_k", "top_p", "num_beams"}


def test_the_decoding_settings_are_defined_once() -> None:
    """One dataclass: a class elsewhere in pipeline/ that annotates two or more decoding
    settings must take each from DecodingConfig (`decoding_spec`), and the served request,
    evaluate's keys and `generate` use DecodingConfig itself."""
    root = Path(__file__).resolve().parents[1] / "pipeline"
    redefined = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            knobs = [
                st
                for st in node.body
                if isinstance(st, ast.AnnAssign)
                and isinstance(st.target, ast.Name)
                and st.target.id in DECODING_KNOBS
            ]
            if len(knobs) < 2 or (path.name, node.name) == ("schema.py", "DecodingConfig"):
                continue
            for st in knobs:
                call = st.value
                if not (
                    isinstance(call, ast.Call) and getattr(call.func, "id", "") == "decoding_spec"
                ):
                    redefined.append(f"{path.relative_to(root.parent)}:{node.name}.{st.target.id}")
    assert not redefined, f"decoding settings defined outside DecodingConfig: {redefined}"

    request = [f.name for f in dataclasses.fields(GenerationParams)]
    assert issubclass(GenerationParams, DecodingConfig)
    assert request == [*DECODING_FIELDS, "return_full_text"]
    assert typing.get_type_hints(generate)["cfg"] is DecodingConfig
    ours = {f.name: f for f in dataclasses.fields(DecodingConfig)}
    hints, ev_hints = typing.get_type_hints(DecodingConfig), typing.get_type_hints(EvaluateConfig)
    for f in dataclasses.fields(EvaluateConfig):
        if f.name in ours:  # evaluate's flat keys: same type, same bounds
            assert ev_hints[f.name] == hints[f.name], f.name
            for bound in ("min", "max", "above"):
                assert f.metadata[bound] == ours[f.name].metadata[bound], (f.name, bound)


def ended_candidates(V: int, L: int, eos: int) -> list[list[int]]:
    """Every continuation that ends with eos within L tokens (eos nowhere else)."""
    return [[*body, eos] for n in range(L) for body in itertools.product(range(1, V), repeat=n)]


def brute_ranking(model: GPT, prompt: list[int], cands: list[list[int]], lp: float) -> list:
    """(score, candidate), best first: sum log p / length**lp, by one forward each."""
    scored = ((sequence_logprob(model, prompt, c) / len(c) ** lp, c) for c in cands)
    return sorted(scored, reverse=True)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -0.5, 2.0])
def test_full_width_beam_search_with_eos_is_exact_under_the_length_penalty(
    length_penalty: float,
) -> None:
    # Candidates: any eos-free prefix followed by eos, or L tokens without eos. At full width
    # nothing is pruned, so the early stop must only fire when it cannot change the answer.
    V, L, eos = 4, 3, 0
    model = tiny_model("learned", vocab=V, seed=2)
    prompt = [1, 2]
    cands = ended_candidates(V, L, eos) + [
        list(c) for c in itertools.product(range(1, V), repeat=L)
    ]
    brute = brute_ranking(model, prompt, cands, length_penalty)
    beams = beam_search(model, prompt, V**L, L, length_penalty=length_penalty, eos_id=eos)
    assert beams[0][0] == brute[0][1]
    assert beams[0][1] == pytest.approx(brute[0][0], abs=1e-5)
    assert any(seq[-1] == eos for seq, _ in beams)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_prefer_finished_returns_the_best_ended_beam_before_any_cut_off_one(
    length_penalty: float,
) -> None:
    # Full width, so the exact answer is known by brute force: the best of the candidates
    # that end with eos. Seed 2's overall best is cut off by the budget (no eos), so the
    # two rankings differ and the flag is what changes the answer.
    V, L, eos = 4, 3, 0
    model = tiny_model("learned", vocab=V, seed=2)
    prompt = [1, 2]
    ended = ended_candidates(V, L, eos)
    brute = brute_ranking(model, prompt, ended, length_penalty)
    args = (model, prompt, V**L, L, length_penalty, eos)
    plain = beam_search(*args)
    beams = beam_search(*args, prefer_finished=True)
    assert plain[0][0][-1] != eos  # the plain ranking's best stops mid-way
    assert beams[0][0] == brute[0][1]
    assert beams[0][1] == pytest.approx(brute[0][0], abs=1e-5)
    n_ended = sum(seq[-1] == eos for seq, _ in beams)
    assert n_ended == len(ended)  # every ended candidate, best first, then the cut-off ones
    assert [seq for seq, _ in beams[:n_ended]] == [c for _, c in brute]
    for (_, got), (want, _) in zip(beams[:n_ended], brute, strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    assert sorted(map(tuple, (seq for seq, _ in beams))) == sorted(
        map(tuple, (s for s, _ in plain))
    )
    # generate's beam strategy takes the same flag.
    cfg = dec("beam", L, num_beams=V**L)
    kw = dict(eos_id=eos, length_penalty=length_penalty)
    assert generate(model, prompt, cfg, prefer_finished=True, **kw) == beams[0][0]
    assert generate(model, prompt, cfg, **kw) == plain[0][0]


@pytest.mark.parametrize("prefer_finished", [False, True])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5, 0.0, -1.0, 2.0])
def test_beam_search_early_stop_never_changes_the_result(
    length_penalty: float, prefer_finished: bool
) -> None:
    # Vocab 3 so eos (id 0) is likely and num_beams finished beams appear early.
    fired = False
    for seed in range(4):
        model = tiny_model("rotary", vocab=3, seed=seed)
        calls = {"n": 0}
        real_forward = model.forward

        def counting_forward(*args, _real=real_forward, _calls=calls, **kwargs):
            _calls["n"] += 1
            return _real(*args, **kwargs)

        model.forward = counting_forward
        args = ([1, 2], 3, 12, length_penalty, 0)
        early = beam_search(model, *args, prefer_finished=prefer_finished)
        n_early = calls["n"]
        full = beam_search(model, *args, early_stopping=False, prefer_finished=prefer_finished)
        fired |= n_early < calls["n"] - n_early
        assert [s for s, _ in early] == [s for s, _ in full]
        for (_, a), (_, b) in zip(early, full, strict=True):
            assert a == pytest.approx(b, abs=1e-9)
    # The early stop was exercised (with a strong length penalty long beams stay hopeful).
    assert fired or length_penalty > 1


@pytest.mark.parametrize(("vocab", "width", "seed"), [(3, 3, 18), (4, 2, 1), (4, 3, 2)])
def test_beam_search_early_stop_bound_uses_the_longest_length_when_penalty_is_positive(
    vocab: int, width: int, seed: int
) -> None:
    # Cases found by search where a live beam still wins only because its final length
    # max_new_tokens divides its sum: a bound at the next length would stop too early.
    model = tiny_model("rotary", vocab=vocab, seed=seed)
    early = beam_search(model, [1, 2], width, 12, 1.0, eos_id=0)
    full = beam_search(model, [1, 2], width, 12, 1.0, eos_id=0, early_stopping=False)
    assert [s for s, _ in early] == [s for s, _ in full]


def naive_beam_search(
    model: GPT, prompt: list[int], width: int, n_new: int, lp: float, eos: int
) -> list[tuple[list[int], float]]:
    """Beam search spelled out with sequence_logprob, running to n_new (no early stop)."""
    V = model.config.vocab_size
    live, finished = [[]], []
    for _ in range(n_new):
        ext = [([*b, t], sequence_logprob(model, prompt, [*b, t])) for b in live for t in range(V)]
        finished += [(c, lp_ / len(c) ** lp) for c, lp_ in ext if c[-1] == eos]
        finished = sorted(finished, key=lambda b: -b[1])[:width]
        live_ext = sorted((e for e in ext if e[0][-1] != eos), key=lambda e: -e[1])[:width]
        live = [c for c, _ in live_ext]
    done = finished + [(c, lp_ / len(c) ** lp) for c, lp_ in live_ext]
    return sorted(done, key=lambda b: -b[1])[:width]


@pytest.mark.parametrize(
    ("width", "lp", "seed"), [(2, 1.0, 0), (3, 0.0, 1), (2, -0.5, 2), (3, 2.0, 3)]
)
def test_beam_search_matches_a_naive_reference(width: int, lp: float, seed: int) -> None:
    model = tiny_model("sinusoidal", vocab=4, seed=seed)
    prompt = [1, 3]
    want = naive_beam_search(model, prompt, width, 5, lp, eos=0)
    for early_stopping in (True, False):
        got = beam_search(model, prompt, width, 5, lp, eos_id=0, early_stopping=early_stopping)
        assert [s for s, _ in got] == [s for s, _ in want]
        for (_, a), (_, b) in zip(got, want, strict=True):
            assert a == pytest.approx(b, abs=1e-5)


def test_sampled_rows_are_padded_with_eos_after_they_finish() -> None:
    model = tiny_model(vocab=8)
    prompt = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 1]])
    for seed in range(3):
        cfg = dec("sample", 12, temperature=2.0, seed=seed)
        out = generate(model, prompt, cfg, eos_id=0)
        for row in out.tolist():
            if 0 in row:
                assert set(row[row.index(0) :]) == {0}
        assert bool((out == 0).any(dim=1).all()) or out.size(1) == 12


def test_beam_search_rejects_an_eos_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError, match="eos_id"):
        beam_search(tiny_model(vocab=5), [1], 2, 3, eos_id=5)


# --------------------------------------------------------------------------------------
# Repetition levers: no_repeat_ngram_size and repetition_penalty
# --------------------------------------------------------------------------------------


def hand_adjusted(logits: list[float], seq: list[int], n: int, penalty: float) -> list[float]:
    """The levers spelled out on one row: CTRL penalty on each seen id, then n-gram bans."""
    out = list(logits)
    for t in set(seq):
        out[t] = out[t] / penalty if out[t] > 0 else out[t] * penalty
    if n > 0:
        start = tuple(seq[len(seq) - n + 1 :]) if n > 1 else ()
        grams = [tuple(seq[j : j + n]) for j in range(len(seq) - n + 1)]
        banned = {g[-1] for g in grams if g[:-1] == start}
        if len(banned) < len(out):  # every token banned: none is
            for t in banned:
                out[t] = -math.inf
    return out


def repeats_an_ngram(seq: list[int], n: int) -> bool:
    grams = [tuple(seq[j : j + n]) for j in range(len(seq) - n + 1)]
    return len(set(grams)) < len(grams)


def test_penalize_logits_on_hand_computed_values() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    ids = torch.tensor([[0, 1, 0, 4], [2, 3, 2, 3]])  # (B, L); token 4's logit is 0
    out = penalize_logits(logits, ids, 0, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0, 0.0], [1.0, 1.0, 0.5, 0.5, 1.0]]
    # n=2: after "... 0 4" nothing followed a 4; after "... 2 3" a 2 followed "3" once
    out = penalize_logits(logits, ids, 2, 1.0)
    assert torch.isinf(out).tolist() == [[False] * 5, [False, False, True, False, False]]
    # n=3: "2 3 2" is in row 1, so 2 after "2 3" is banned; row 0 has no "0 4 x"
    assert torch.isinf(penalize_logits(logits, ids, 3, 1.0))[1].nonzero().view(-1).tolist() == [2]
    # n=1 bans every token already seen; n longer than the sequence bans nothing
    seen = torch.isinf(penalize_logits(logits, ids, 1, 1.0))[0].tolist()
    assert seen == [True, True, False, False, True]
    assert torch.equal(penalize_logits(logits, ids, 5, 1.0), logits)
    assert penalize_logits(logits, ids, 0, 1.0) is logits  # off: untouched


def test_penalize_logits_matches_a_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    V = 6
    for n, penalty in itertools.product([0, 1, 2, 3, 4], [0.6, 1.0, 1.7]):
        for L in (1, 3, 9):
            logits = torch.randn(4, V, generator=gen)  # (B, V)
            ids = torch.randint(0, 3 if L == 9 else V, (4, L), generator=gen)  # repeats
            got = penalize_logits(logits, ids, n, penalty)
            for b in range(4):
                want = hand_adjusted(logits[b].tolist(), ids[b].tolist(), n, penalty)
                assert got[b].tolist() == pytest.approx(want, rel=1e-6), (n, penalty, L, b)
    # a row with every token banned keeps its logits (n=1 after all of 0..V-1)
    ids = torch.arange(V).unsqueeze(0)
    logits = torch.randn(1, V, generator=gen)
    assert torch.equal(penalize_logits(logits, ids, 1, 1.0), logits)


def greedy_reference(model: GPT, prompt: list[int], n_new: int, n: int, penalty: float):
    """Greedy decoding spelled out: full forwards, hand-adjusted logits, Python argmax."""
    seq = list(prompt)
    for _ in range(n_new):
        z = hand_adjusted(model(torch.tensor([seq]))[0][0, -1].tolist(), seq, n, penalty)
        seq.append(max(range(len(z)), key=lambda t: z[t]))
    return seq[len(prompt) :]


def test_greedy_with_no_repeat_bigrams_never_repeats_one() -> None:
    model = tiny_model(vocab=7)
    prompt = [1, 2, 1]  # the prompt's bigrams count too
    free = generate(model, prompt, dec("greedy", 13))
    assert repeats_an_ngram(prompt + free, 2)  # without the lever it does repeat
    out = generate(model, prompt, dec("greedy", 13, no_repeat_ngram_size=2))
    assert len(out) == 13 and not repeats_an_ngram(prompt + out, 2)
    assert out == greedy_reference(model, prompt, 13, 2, 1.0)
    assert out == generate(
        model, prompt, dec("greedy", 13, no_repeat_ngram_size=2), use_cache=False
    )
    # n=3 allows repeated bigrams but no repeated trigram
    out3 = generate(model, prompt, dec("greedy", 13, no_repeat_ngram_size=3))
    assert not repeats_an_ngram(prompt + out3, 3)
    assert out3 == greedy_reference(model, prompt, 13, 3, 1.0)


def test_repetition_penalty_gives_the_hand_computed_next_token_distribution() -> None:
    model = tiny_model(vocab=7)
    prompt, penalty, temperature = [1, 2, 2, 5], 3.0, 0.8
    z = model(torch.tensor([prompt]))[0][0, -1]  # (V,)
    hand = hand_adjusted(z.tolist(), prompt, 0, penalty)
    want = F.softmax(torch.tensor(hand, dtype=torch.float64) / temperature, dim=-1)
    adjusted = penalize_logits(z.unsqueeze(0), torch.tensor([prompt]), 0, penalty)
    got = F.softmax(filter_logits(adjusted, temperature).double(), dim=-1)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # each seen token's probability changed, in the direction of its logit's sign
    plain = F.softmax(z.double() / temperature, dim=-1)
    assert not torch.allclose(got, plain, atol=1e-3)
    # generate decodes from that distribution: the sampled token, and the greedy argmax
    for seed in range(5):
        cfg = dec("sample", 1, temperature=temperature, seed=seed, repetition_penalty=penalty)
        g = torch.Generator().manual_seed(seed)
        draw = torch.multinomial(
            F.softmax(filter_logits(adjusted, temperature), dim=-1), 1, generator=g
        )
        assert generate(model, prompt, cfg) == [int(draw)]
    for p in (0.5, 1.5, 4.0, 10.0):
        want_seq = greedy_reference(model, prompt, 6, 0, p)
        assert generate(model, prompt, dec("greedy", 6, repetition_penalty=p)) == want_seq


def test_some_repetition_penalty_changes_greedy_decoding() -> None:
    model = tiny_model(vocab=7)
    prompt = [1, 2, 3]
    free = generate(model, prompt, dec("greedy", 10))
    changed = [
        p
        for p in (1.5, 3.0, 10.0)
        if generate(model, prompt, dec("greedy", 10, repetition_penalty=p)) != free
    ]
    assert changed  # the lever acts (so the tests above can fail)


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize(
    "cfg",
    [
        dec("greedy", 12, no_repeat_ngram_size=2, repetition_penalty=1.3),
        dec("sample", 12, seed=3, no_repeat_ngram_size=1, repetition_penalty=0.7),
        dec("sample", 12, top_k=4, top_p=0.9, seed=5, no_repeat_ngram_size=3),
        dec("beam", 8, num_beams=3, no_repeat_ngram_size=2, repetition_penalty=1.5),
    ],
    ids=["greedy", "sample", "sample-filtered", "beam"],
)
def test_levers_give_the_same_tokens_cached_and_uncached(pos: str, cfg: DecodingConfig) -> None:
    model = tiny_model(pos)
    prompt = torch.tensor([[1, 2, 3], [3, 0, 6]])  # (B, T)
    cached = generate(model, prompt, cfg, eos_id=4, use_cache=True)
    assert torch.equal(cached, generate(model, prompt, cfg, eos_id=4, use_cache=False))
    if cfg.strategy == "sample":
        return  # a batch's rows share one generator: a row alone draws differently
    rows = [generate(model, row.tolist(), cfg, eos_id=4) for row in prompt]
    for row, alone in zip(cached.tolist(), rows, strict=True):
        assert row[: len(alone)] == alone  # each row decodes on its own sequence


def naive_lever_beam_search(
    model: GPT, prompt: list[int], width: int, n_new: int, eos: int, n: int, penalty: float
) -> list[tuple[list[int], float]]:
    """naive_beam_search with the levers: each extension's log-prob is the log-softmax of
    its beam's hand-adjusted logits; banned extensions (-inf) are dropped."""

    def logp(beam: list[int]) -> list[float]:
        z = hand_adjusted(
            model(torch.tensor([prompt + beam]))[0][0, -1].tolist(), prompt + beam, n, penalty
        )
        return F.log_softmax(torch.tensor(z, dtype=torch.float64), dim=-1).tolist()

    live, finished = [([], 0.0)], []
    for _ in range(n_new):
        ext = [([*b, t], s + lp) for b, s in live for t, lp in enumerate(logp(b)) if lp > -math.inf]
        finished += [(c, s / len(c)) for c, s in ext if c[-1] == eos]
        finished = sorted(finished, key=lambda b: -b[1])[:width]
        live = sorted((e for e in ext if e[0][-1] != eos), key=lambda e: -e[1])[:width]
    done = finished + [(c, s / len(c)) for c, s in live]
    return sorted(done, key=lambda b: -b[1])[:width]


def test_beam_search_respects_no_repeat_per_beam() -> None:
    model = tiny_model("rotary", vocab=5, seed=2)
    prompt = [1, 3, 1]
    free = beam_search(model, prompt, 4, 10, 1.0)
    assert any(repeats_an_ngram(prompt + seq, 2) for seq, _ in free)  # it would repeat
    beams = beam_search(model, prompt, 4, 10, 1.0, no_repeat_ngram_size=2)
    assert len(beams) == 4
    for seq, _ in beams:  # each beam, prompt included, on its own sequence
        assert not repeats_an_ngram(prompt + seq, 2), seq
    # against a brute-force beam search with the levers, eos and the length penalty
    for n, penalty in ((2, 1.0), (3, 1.4), (0, 2.0)):
        want = naive_lever_beam_search(model, prompt, 3, 6, 0, n, penalty)
        for early_stopping in (True, False):
            got = beam_search(
                model,
                prompt,
                3,
                6,
                1.0,
                eos_id=0,
                early_stopping=early_stopping,
                no_repeat_ngram_size=n,
                repetition_penalty=penalty,
            )
            assert [s for s, _ in got] == [s for s, _ in want], (n, penalty)
            for (_, a), (_, b) in zip(got, want, strict=True):
                assert a == pytest.approx(b, abs=1e-5)
    cfg = dec("beam", 10, num_beams=4, no_repeat_ngram_size=2)
    assert generate(model, prompt, cfg) == beams[0][0]


def test_beam_search_drops_extensions_banned_everywhere() -> None:
    # vocab 3 and n=1: after the prompt's tokens only one token is left, then none is
    # banned (a row never has every token banned), so beams stay well defined.
    model = tiny_model(vocab=3)
    beams = beam_search(model, [0, 1], 4, 3, 1.0, no_repeat_ngram_size=1)
    assert beams[0][0][0] == 2 and all(seq[0] == 2 for seq, _ in beams)
    assert all(math.isfinite(s) for _, s in beams)
    # eos banned (seen in the prompt): no beam ends with it
    beams = beam_search(model, [0, 1], 2, 3, 1.0, eos_id=0, no_repeat_ngram_size=1)
    assert all(seq[0] == 2 and math.isfinite(s) for seq, s in beams)


def test_lever_errors_name_the_field() -> None:
    for field, bad in [
        ("no_repeat_ngram_size", -1),
        ("no_repeat_ngram_size", 1.5),
        ("no_repeat_ngram_size", "2"),
        ("repetition_penalty", 0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", 11.0),
        ("repetition_penalty", None),
    ]:
        with pytest.raises(GenerationRequestError, match=rf"^{field}: expected") as e:
            GenerationParams.from_mapping({field: bad})
        assert e.value.field == field
        with pytest.raises(DecodingError, match=rf"^{field}: expected"):
            beam_search(tiny_model(vocab=5), [1], 2, 3, **{field: bad})
    ok = GenerationParams.from_mapping({"no_repeat_ngram_size": 3, "repetition_penalty": 2})
    assert (ok.no_repeat_ngram_size, ok.repetition_penalty) == (3, 2.0)
    assert isinstance(ok.repetition_penalty, float)


def test_decode_all_applies_evaluates_levers_to_every_strategy(monkeypatch) -> None:
    from pipeline.config import load_config
    from pipeline.eval import decoding

    cfg = load_config(Path(__file__).resolve().parents[1])
    ev = dataclasses.replace(cfg.evaluate, no_repeat_ngram_size=3, repetition_penalty=1.3)
    seen: list[DecodingConfig] = []
    monkeypatch.setattr(decoding, "encode_docs", lambda tok, texts: [[1] for _ in texts])
    monkeypatch.setattr(decoding, "decode", lambda tok, ids: "")
    kwargs: list[dict] = []

    def fake_generate(m, ids, d, **kw):
        seen.append(d)
        kwargs.append(kw)
        return [0]

    monkeypatch.setattr(decoding, "generate", fake_generate)
    gens = decoding.decode_all(
        tiny_model(), None, 0, ["a"], dataclasses.replace(cfg, evaluate=ev), 1
    )
    assert set(gens) == {"greedy", "beam", "temperature", "top_k", "top_p"}
    assert len(seen) == 5
    assert {(d.no_repeat_ngram_size, d.repetition_penalty) for d in seen} == {(3, 1.3)}
    # Evaluate's budget holds a whole story: a beam it cut off never wins over an ended one.
    assert all(kw["prefer_finished"] is True and kw["eos_id"] == 0 for kw in kwargs)


def test_continuation_budget_fills_the_window_a_prompt_leaves() -> None:
    from pipeline.eval.decoding import continuation_budget

    # (max_new_tokens, block_size, context_len) -> min(max_new, max(T // 2, T - context)).
    assert continuation_budget(96, 128, 11) == 96  # a first sentence: the whole story fits
    assert continuation_budget(96, 128, 40) == 88  # up to the end of the window, no further
    assert continuation_budget(96, 128, 100) == 64  # a long prompt keeps half the window
    assert continuation_budget(20, 128, 11) == 20  # never more than asked for


def test_decode_all_gives_each_prompt_the_room_its_window_leaves(monkeypatch) -> None:
    from pipeline.config import load_config
    from pipeline.eval import decoding

    cfg = load_config(Path(__file__).resolve().parents[1])
    ev = dataclasses.replace(cfg.evaluate, max_new_tokens=96)
    budgets: list[int] = []
    lengths = {"short": 3, "long": 79}  # + the end-of-text start: contexts of 4 and 80
    monkeypatch.setattr(decoding, "encode_docs", lambda tok, ps: [[1] * lengths[p] for p in ps])
    monkeypatch.setattr(decoding, "decode", lambda tok, ids: "")
    monkeypatch.setattr(
        decoding, "generate", lambda m, ids, d, **kw: budgets.append(d.max_new_tokens) or [0]
    )
    model = tiny_model()
    T = model.config.block_size  # 16: budgets 12 (T - 4) and 8 (half the window)
    decoding.decode_all(model, None, 0, ["short", "long"], dataclasses.replace(cfg, evaluate=ev), 1)
    expected = [T - 4, T // 2]
    assert budgets == expected * 5  # the same two budgets for each of the five strategies
