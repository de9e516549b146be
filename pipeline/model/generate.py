"""Decoding from a trained GPT: greedy, sampling (temperature, top-k, top-p) and beam search.

    prompt ids -> crop from the left to fit block_size -> prefill (one forward over the prompt,
    filling a KVCache) -> per step: next-token logits -> repetition levers -> pick a token
    -> feed only that token

Choices worth stating:
- The context is never slid: the prompt is cropped from the left once, so that prompt and
  continuation fit `block_size` together (`max_new_tokens` <= block_size). Sliding would change
  the positions of cached keys, and the cached and uncached paths would then disagree.
- `use_cache=False` recomputes the full forward each step: the slow reference the cached path
  is tested against (same tokens, logits within float rounding).
- The settings are `pipeline.config.DecodingConfig`, the one decoding dataclass (params.yaml's
  `register.decoding`, the served model's requests, evaluate); the end-of-text id (a fact of
  the tokenizer) and beam search's length penalty (evaluate's) are arguments of `generate`.
- Sampling draws from a `torch.Generator` seeded from `DecodingConfig.seed`: results repeat for a
  seed and neither read nor disturb the global RNG (training's seeding stays intact).
- Beam scores are sum(log p) / length**length_penalty with length = number of generated tokens
  (eos included, prompt excluded); length_penalty 0 gives the plain sum of log-probs.
- `prefer_finished` (evaluate's choice) ranks every beam that ended with eos ahead of the
  beams the budget cut off. A cut-off beam of predictable tokens can outscore every ended
  one at any length penalty (its end-of-text was never paid for), and its text then stops
  mid-sentence. When the budget is meant to hold a whole document (evaluate's is), such a
  beam is never the answer while an ended one exists. Off by default: a served request with
  a short budget wants the best prefix, not the best short ending.
- The repetition levers (`penalize_logits`) act on the logits of every strategy before
  anything else (temperature, top-k, top-p, beam search's log-softmax), each row or beam on
  its own sequence: the (cropped) prompt plus what it generated. `repetition_penalty` is
  CTRL's (HF RepetitionPenaltyLogitsProcessor): a seen token's logit is divided by the
  penalty when > 0, else multiplied. `no_repeat_ngram_size` n (HF NoRepeatNGramLogitsProcessor)
  bans a token that would complete an n-gram already in the sequence. HF's beam search
  applies them to log-probs; here beams take the log-softmax of the adjusted logits. Both
  off (0 and 1.0) leave the logits untouched, so results are bit-identical to no levers.
- Logits cover the model's whole (padded) vocabulary; ids above the tokenizer's real size are
  never targets in training, so their probabilities are tiny but not zero.

Everything runs under `torch.no_grad()` in eval mode (dropout off); the model's previous
train/eval mode is restored afterwards. Pure torch and the standard library.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.nn import functional as F

from pipeline.config.decoding import DecodingError, field_problem
from pipeline.config.schema import DecodingConfig
from pipeline.model.gpt import GPT, KVCache

TOP_P_TOLERANCE = 1e-6  # cumulative mass within this of p counts as reaching p (float rounding)


def _check_eos(eos_id: int | None, vocab_size: int) -> None:
    if eos_id is not None and (
        isinstance(eos_id, bool) or not isinstance(eos_id, int) or not 0 <= eos_id < vocab_size
    ):
        raise ValueError(f"eos_id={eos_id!r} is outside the vocabulary [0, {vocab_size})")


def _check_length_penalty(length_penalty: float) -> None:
    ok = isinstance(length_penalty, int | float) and not isinstance(length_penalty, bool)
    if not ok or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")


def _check_levers(no_repeat_ngram_size: object, repetition_penalty: object) -> None:
    """DecodingConfig's rule for the repetition levers (for `beam_search`, which takes them
    as arguments); DecodingError naming the field."""
    hints = typing.get_type_hints(DecodingConfig)
    meta = {f.name: f.metadata for f in dataclasses.fields(DecodingConfig)}
    for name, value in (
        ("no_repeat_ngram_size", no_repeat_ngram_size),
        ("repetition_penalty", repetition_penalty),
    ):
        problem = field_problem(value, hints[name], meta[name])
        if problem is not None:
            raise DecodingError(name, problem)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _inference(model: GPT) -> Iterator[None]:
    """no_grad + eval mode (dropout off), restoring the caller's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _model_device_dtype(model: GPT) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _as_batch(prompt_ids: list[int] | Tensor, device: torch.device) -> Tensor:
    """A list, a (T,) or a (B, T) tensor of ids -> a (B, T) long tensor on `device`."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)  # (1, T)
    if ids.dim() != 2 or ids.size(1) == 0:
        raise ValueError(
            f"prompt_ids must be a non-empty list or a (B, T) tensor of ids with T >= 1, "
            f"got shape {tuple(ids.shape)}"
        )
    return ids


def _crop(ids: Tensor, n_new: int, block_size: int) -> Tensor:
    """Keep the last block_size - n_new + 1 prompt tokens: the model then sees at most block_size.

    The last new token is never fed back, so prompt + n_new - 1 positions must fit.
    """
    keep = block_size - n_new + 1
    if keep < 1:
        raise ValueError(
            f"max_new_tokens={n_new} exceeds the model's block_size={block_size}: "
            "the continuation alone would not fit the context"
        )
    return ids[:, -keep:]  # (B, <= keep)


def filter_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Tensor:
    """logits (B, V) -> logits / temperature with removed tokens set to -inf.

    top-k keeps exactly the k largest (ties broken by index); top-p (nucleus) then keeps the
    smallest set of most probable tokens whose mass reaches p, always at least one token. The
    order temperature -> top-k -> top-p is HF transformers' order.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use greedy for argmax), got {temperature!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    logits = logits / temperature  # (B, V)
    V = logits.size(-1)
    if 0 < top_k < V:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        probs = F.softmax(sorted_logits.double(), dim=-1)  # float64: stable cumulative sums
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the more probable tokens
        drop_sorted = mass_before >= top_p - TOP_P_TOLERANCE  # p already reached without it
        drop_sorted[..., 0] = False  # the most probable token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def penalize_logits(
    logits: Tensor, ids: Tensor, no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0
) -> Tensor:
    """logits (B, V) of the token after ids (B, L) -> logits with the repetition levers applied.

    repetition_penalty: the logit of each token id present in the row of `ids` (once, however
    often it occurs) becomes logit / penalty if logit > 0 else logit * penalty.
    no_repeat_ngram_size n: a token that would complete an n-gram already in the row gets
    -inf (n = 1 bans every token of the row). A row whose every token would be banned keeps
    them all (something must be emitted). Both off (0 and 1.0) return `logits` itself.
    """
    if no_repeat_ngram_size == 0 and repetition_penalty == 1.0:
        return logits
    logits = logits.float()  # (B, V)
    if repetition_penalty != 1.0:
        seen = logits.gather(-1, ids)  # (B, L) logits of the tokens already in each row
        seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        logits = logits.scatter(-1, ids, seen)  # a repeated id writes the same value
    if no_repeat_ngram_size > 0:
        banned = _ngram_bans(ids, no_repeat_ngram_size, logits.size(-1))  # (B, V)
        banned &= ~banned.all(dim=-1, keepdim=True)
        logits = logits.masked_fill(banned, float("-inf"))
    return logits


def _ngram_bans(ids: Tensor, n: int, vocab_size: int) -> Tensor:
    """(B, V) bool: True for a token that, after ids (B, L), repeats an n-gram of its row."""
    B, L = ids.shape
    counts = torch.zeros(B, vocab_size, dtype=torch.long, device=ids.device)  # (B, V)
    if n > L:  # no complete n-gram yet
        return counts.bool()
    grams = ids.unfold(1, n, 1)  # (B, L - n + 1, n): every n-gram of each row
    prefix = ids[:, L - n + 1 :]  # (B, n - 1): the start of the n-gram the next token ends
    hit = (grams[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)  # (B, L - n + 1)
    return counts.scatter_add_(1, grams[..., -1], hit.long()) > 0


# --------------------------------------------------------------------------------------
# Greedy and sampling
# --------------------------------------------------------------------------------------


class _Stepper:
    """Next-token logits for a growing batch of sequences, with or without a KV cache."""

    def __init__(self, model: GPT, ids: Tensor, n_new: int, use_cache: bool) -> None:
        self.model, self.ids = model, ids  # (B, T)
        self.cache: KVCache | None = None
        if use_cache:
            device, dtype = _model_device_dtype(model)
            max_len = ids.size(1) + n_new - 1  # the last new token is never fed
            self.cache = KVCache.empty(model.config, ids.size(0), max(max_len, 1), device, dtype)
        self.fed = 0  # tokens of self.ids already in the cache

    def logits(self) -> Tensor:
        """Logits (B, V) of the token after the last one in `ids`."""
        if self.cache is None:
            return self.model(self.ids)[0][:, -1]  # full forward: the reference path
        out = self.model(self.ids[:, self.fed :], cache=self.cache)[0][:, -1]
        self.fed = self.ids.size(1)
        return out

    def append(self, tokens: Tensor, parents: Tensor | None = None) -> None:
        """Add tokens (B',) as the next position; `parents` (B',) picks each row's history."""
        if parents is not None:
            self.ids = self.ids.index_select(0, parents)
            if self.cache is not None:
                self.cache.reorder(parents)
        self.ids = torch.cat((self.ids, tokens.unsqueeze(1)), dim=1)  # (B', T + 1)


def generate(
    model: GPT,
    prompt_ids: list[int] | Tensor,
    cfg: DecodingConfig,
    *,
    eos_id: int | None = None,
    length_penalty: float = 1.0,
    prefer_finished: bool = False,
    use_cache: bool = True,
) -> Tensor | list[int]:
    """Generate up to cfg.max_new_tokens ids after the prompt; returns only the new ids.

    A list prompt gives a list (ending at eos when one was emitted); a (B, T) tensor gives a
    (B, n) tensor, n <= max_new_tokens, where rows that finished early are padded with eos.
    A sequence stops after it emits `eos_id`, decoding when every sequence has. The prompt is
    cropped from the left so prompt and continuation fit block_size. "beam" returns each
    row's best beam, scored with `length_penalty` (sum log p / length**length_penalty); with
    `prefer_finished`, the best beam that ended with eos when one did.
    cfg's repetition levers apply to every strategy (`penalize_logits`).
    """
    if not isinstance(cfg, DecodingConfig):
        raise TypeError(f"cfg must be a DecodingConfig, got {type(cfg).__name__}")
    _check_eos(eos_id, model.config.vocab_size)
    _check_length_penalty(length_penalty)
    device, _ = _model_device_dtype(model)
    ids = _crop(_as_batch(prompt_ids, device), cfg.max_new_tokens, model.config.block_size)
    if cfg.strategy == "beam":
        beam_args = (cfg.num_beams, cfg.max_new_tokens, length_penalty, eos_id, use_cache)
        levers = dict(
            no_repeat_ngram_size=cfg.no_repeat_ngram_size,
            repetition_penalty=cfg.repetition_penalty,
            prefer_finished=prefer_finished,
        )
        rows = [beam_search(model, row.tolist(), *beam_args, **levers)[0][0] for row in ids]
        if isinstance(prompt_ids, list):
            return rows[0]
        n = max(len(r) for r in rows)
        pad = eos_id if eos_id is not None else 0  # rows differ only after an eos
        return torch.tensor([r + [pad] * (n - len(r)) for r in rows], device=device)
    with _inference(model):
        out = _decode(model, ids, cfg, eos_id, use_cache)  # (B, n)
    if isinstance(prompt_ids, list):
        return out[0].tolist()
    return out


def _decode(
    model: GPT, ids: Tensor, cfg: DecodingConfig, eos_id: int | None, use_cache: bool
) -> Tensor:
    """Greedy or sampled decoding of a (B, T) batch -> new ids (B, n)."""
    gen = None
    if cfg.strategy == "sample":
        gen = torch.Generator(device=ids.device).manual_seed(cfg.seed)
    stepper = _Stepper(model, ids, cfg.max_new_tokens, use_cache)
    finished = torch.zeros(ids.size(0), dtype=torch.bool, device=ids.device)  # (B,)
    new: list[Tensor] = []
    for step in range(cfg.max_new_tokens):
        logits = stepper.logits()  # (B, V)
        logits = penalize_logits(
            logits, stepper.ids, cfg.no_repeat_ngram_size, cfg.repetition_penalty
        )  # (B, V)
        if gen is None:
            tok = logits.argmax(dim=-1)  # (B,)
        else:
            filtered = filter_logits(logits.float(), cfg.temperature, cfg.top_k, cfg.top_p)
            probs = F.softmax(filtered, dim=-1)
            tok = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # (B,)
        if eos_id is not None:
            tok = tok.masked_fill(finished, eos_id)  # finished rows are padded with eos
            finished |= tok == eos_id
        new.append(tok)
        if bool(finished.all()) or step == cfg.max_new_tokens - 1:
            break
        stepper.append(tok)
    return torch.stack(new, dim=1)  # (B, n)


# --------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------


def _beam_score(logprob_sum: float, length: int, length_penalty: float) -> float:
    """sum log p / length**length_penalty; length = generated tokens (eos included)."""
    return logprob_sum / (length**length_penalty)


def beam_search(
    model: GPT,
    prompt_ids: list[int] | Tensor,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
    use_cache: bool = True,
    early_stopping: bool = True,
    *,
    no_repeat_ngram_size: int = 0,
    repetition_penalty: float = 1.0,
    prefer_finished: bool = False,
) -> list[tuple[list[int], float]]:
    """The `num_beams` best continuations of one prompt with their scores, best first.

    Each step extends every live beam by every token: each beam's eos extension is scored as a
    finished hypothesis (the `num_beams` best are kept), and the `num_beams` best other
    extensions by sum of log-probs stay live. Search stops at
    max_new_tokens or once no live beam can still beat the worst of `num_beams` finished ones:
    log-probs are <= 0, so a live beam's sum only falls, and its best possible score is that
    sum at the most favourable final length. With num_beams >= V**max_new_tokens every prefix
    survives, so the result is the exact most probable continuation. `early_stopping=False`
    always runs to max_new_tokens: the same result, slower (a reference for tests).
    The repetition levers (`penalize_logits`) adjust each beam's logits on that beam's own
    sequence before the log-softmax; an extension they ban (log p = -inf) is never kept.
    `prefer_finished` lists the beams that ended with eos first (best first), then the ones
    max_new_tokens cut off; the search itself is unchanged.
    """
    _check_beam_args(num_beams, max_new_tokens)
    _check_levers(no_repeat_ngram_size, repetition_penalty)
    device, _ = _model_device_dtype(model)
    ids = _as_batch(prompt_ids, device)
    if ids.size(0) != 1:
        raise ValueError(f"beam_search takes one prompt, got a batch of {ids.size(0)}")
    ids = _crop(ids, max_new_tokens, model.config.block_size)  # (1, T)
    _check_eos(eos_id, model.config.vocab_size)
    finished: list[tuple[list[int], float]] = []
    with _inference(model):
        stepper = _Stepper(model, ids, max_new_tokens, use_cache)
        beams: list[list[int]] = [[]]  # generated tokens of each live beam
        sums = torch.zeros(1, dtype=torch.float64, device=device)  # (W,) sum of log-probs
        for step in range(1, max_new_tokens + 1):  # step = length after this token
            logits = penalize_logits(
                stepper.logits(), stepper.ids, no_repeat_ngram_size, repetition_penalty
            )  # (W, V)
            logp = F.log_softmax(logits.double(), dim=-1)  # (W, V)
            V = logp.size(-1)
            if eos_id is not None:
                ended = _finish_with_eos(finished, beams, sums, logp, eos_id, step, length_penalty)
                finished = sorted(ended, key=lambda b: -b[1])[:num_beams]
            totals = (sums.unsqueeze(1) + logp).view(-1)  # (W * V,)
            # Candidates that stay live: all but eos (masked above) and banned tokens.
            n_live = int(torch.isfinite(totals).sum())
            sums, top_idx = totals.topk(min(num_beams, n_live))  # the best live extensions
            parents, tokens = top_idx // V, top_idx % V  # (W',) each
            beams = [[*beams[p], t] for p, t in zip(parents.tolist(), tokens.tolist(), strict=True)]
            if not beams or step == max_new_tokens:
                break
            if early_stopping and len(finished) == num_beams:
                bound = _best_reachable(sums.tolist(), step, max_new_tokens, length_penalty)
                if bound <= finished[-1][1]:
                    return finished  # live beams are unfinished: they cannot enter the list
            stepper.append(tokens, parents)
    live = [
        (seq, _beam_score(s, len(seq), length_penalty))
        for seq, s in zip(beams, sums.tolist(), strict=True)
    ]
    if prefer_finished:  # `finished` is already best first; cut-off beams only fill up
        return (finished + sorted(live, key=lambda b: -b[1]))[:num_beams]
    return sorted(finished + live, key=lambda b: -b[1])[:num_beams]


def _check_beam_args(num_beams: object, max_new_tokens: object) -> None:
    for name, value in (("num_beams", num_beams), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _finish_with_eos(
    finished: list[tuple[list[int], float]],
    beams: list[list[int]],
    sums: Tensor,
    logp: Tensor,
    eos_id: int,
    step: int,
    length_penalty: float,
) -> list[tuple[list[int], float]]:
    """Every live beam's eos extension added to `finished` as a scored hypothesis.

    A beam whose eos is banned (log p = -inf, `penalize_logits`) adds none. Then eos is masked
    out of `logp` (W, V) in place, so no live beam ends with it.
    """
    ended = list(finished)
    for beam, s in zip(beams, (sums + logp[:, eos_id]).tolist(), strict=True):
        if s > -math.inf:
            ended.append(([*beam, eos_id], _beam_score(s, step, length_penalty)))
    logp[:, eos_id] = float("-inf")
    return ended


def _best_reachable(
    live_sums: list[float], step: int, max_new_tokens: int, length_penalty: float
) -> float:
    """The best score a live beam can still reach: log-probs are <= 0, so its sum only falls.

    length_penalty > 0 favours the longest length, < 0 the shortest (the next step), 0 ignores
    length.
    """
    best_len = max_new_tokens if length_penalty > 0 else step + 1
    return _beam_score(max(live_sums), best_len, length_penalty)


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


def sequence_logprob(
    model: GPT, prompt_ids: list[int] | Tensor, continuation_ids: list[int] | Tensor
) -> float:
    """Sum of log p(continuation_i | prompt, continuation_<i) under the model, in nats.

    One full forward; the prompt is cropped from the left as in `generate`, so this scores
    exactly what decoding would have seen. Computed in float64 after the float32 logits.
    """
    device, _ = _model_device_dtype(model)
    cont = torch.as_tensor(continuation_ids, dtype=torch.long, device=device).view(-1)
    if cont.numel() == 0:
        return 0.0
    prompt = _as_batch(prompt_ids, device)
    if prompt.size(0) != 1:
        raise ValueError(f"sequence_logprob takes one prompt, got a batch of {prompt.size(0)}")
    prompt = _crop(prompt, cont.numel(), model.config.block_size)  # (1, P)
    P = prompt.size(1)
    with _inference(model):
        ids = torch.cat((prompt, cont.unsqueeze(0)), dim=1)[:, :-1]  # (1, P + C - 1)
        logits = model(ids)[0][0, P - 1 :]  # (C, V): predictions of the continuation
        logp = F.log_softmax(logits.double(), dim=-1)
        return float(logp.gather(-1, cont.unsqueeze(1)).sum())
