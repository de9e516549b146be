"""Decoding with every strategy, the quality of what comes out, and task accuracy.

`decode_all` continues each prompt with greedy, beam, temperature, top-k and top-p
decoding; `generation_quality` scores each strategy's texts against held-out references
(`pipeline/eval/generation.py`); `task_scores` scores the fine-tuning test split (answer
loss, and exact match where an answer is determined).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial

import torch
from tokenizers import Tokenizer

from pipeline.config import Config, DecodingConfig
from pipeline.core.names import FINETUNE_TEST
from pipeline.eval.generation import (
    distinct_n,
    mmd2,
    ngram_features,
    precision_recall_knn,
    repetition_rate,
    validity_rate,
)
from pipeline.eval.lm import LN2
from pipeline.eval.scoring import LogitsFilter, model_device
from pipeline.model.generate import filter_logits, generate
from pipeline.model.gpt import GPT
from pipeline.text.task_data import evaluate_task, read_examples, tokenize
from pipeline.text.tokenizer import decode, encode_docs


def strategies(cfg: Config, max_new_tokens: int, seed: int) -> dict[str, DecodingConfig]:
    """The evaluated decoding strategies: each changes one setting of plain greedy decoding
    (every filter off); the repetition levers are evaluate's, the same for every strategy."""
    e = cfg.evaluate
    greedy = DecodingConfig(
        "greedy",
        max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        num_beams=1,
        seed=seed,
        no_repeat_ngram_size=e.no_repeat_ngram_size,
        repetition_penalty=e.repetition_penalty,
    )
    return {
        "greedy": greedy,
        "beam": replace(greedy, strategy="beam", num_beams=e.num_beams),
        "temperature": replace(greedy, strategy="sample", temperature=e.temperature),
        "top_k": replace(greedy, strategy="sample", top_k=e.top_k),
        "top_p": replace(greedy, strategy="sample", top_p=e.top_p),
    }


def sampling_filters(cfg: Config) -> dict[str, LogitsFilter]:
    """Each sampling strategy's next-token distribution as a logits filter, for its KL rate.

    Empty when a repetition lever is on: the distribution then depends on the text so far
    in a way a per-position filter does not express, and no KL is claimed for it.
    """
    e = cfg.evaluate
    if e.no_repeat_ngram_size or e.repetition_penalty != 1.0:
        return {}
    return {
        name: partial(filter_logits, temperature=d.temperature, top_k=d.top_k, top_p=d.top_p)
        for name, d in strategies(cfg, 1, 0).items()
        if d.strategy == "sample"
    }


def decode_all(
    model: GPT, tok: Tokenizer, eot: int, prompts: list[str], cfg: Config, seed: int
) -> dict[str, list[str]]:
    """Generations (prompt + continuation) per decoding strategy; sampling uses `seed`."""
    e, T = cfg.evaluate, model.config.block_size
    prompt_ids = encode_docs(tok, prompts)
    out: dict[str, list[str]] = {}
    for name, dcfg in strategies(cfg, e.max_new_tokens, seed).items():
        texts = []
        for p, ids in zip(prompts, prompt_ids, strict=True):
            n = continuation_budget(e.max_new_tokens, T, 1 + len(ids))
            # A longer prompt is cropped to fit T; length_penalty scores the beam strategy only.
            # The budget holds a whole story, so a beam it cut off is never the answer while
            # one that ended exists (prefer_finished).
            new = generate(
                model,
                [eot, *ids],
                replace(dcfg, max_new_tokens=n),
                eos_id=eot,
                length_penalty=e.length_penalty,
                prefer_finished=True,
            )
            texts.append(p + decode(tok, _until(new, eot)))
        out[name] = texts
    return out


def continuation_budget(max_new_tokens: int, block_size: int, context_len: int) -> int:
    """New tokens for a prompt of `context_len` ids (end-of-text start included).

    As many as still fit in one window of `block_size`, so the model sees the whole
    prompt and everything it wrote (a story world story is scored whole only if it ends
    within the budget). A prompt longer than half the window keeps half of it: the
    prompt is then cropped from the left.
    """
    return min(max_new_tokens, max(block_size // 2, block_size - context_len))


def _until(ids: Sequence[int] | torch.Tensor, eot: int) -> list[int]:
    """The ids before the first `eot` (all of them when there is none)."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    return ids[: ids.index(eot)] if eot in ids else ids


def generation_quality(
    gens: dict[str, list[str]], refs: list[str], is_valid: Callable[[str], bool] | None
) -> dict[str, dict[str, float]]:
    """Per strategy: distinct-n, repetition, MMD and precision/recall against `refs`.

    With `is_valid` (the source grammar's check, when the corpus has one) also the validity
    rate, the share of generations the grammar can produce.
    """
    ref_feats = ngram_features(refs)
    table = {}
    for name, texts in gens.items():
        feats = ngram_features(texts)
        row = {
            "distinct_1": distinct_n(texts, 1),
            "distinct_2": distinct_n(texts, 2),
            "repetition_4": repetition_rate(texts, 4),
            "mmd2": mmd2(feats, ref_feats),
            **precision_recall_knn(ref_feats, feats),
        }
        if is_valid is not None:
            row["validity_rate"] = validity_rate(texts, is_valid)
        table[name] = row
    return table


def task_scores(model: GPT, tok: Tokenizer, eot: int, cfg: Config, kind: str) -> dict | None:
    """The fine-tuning test split (`<synthetic>/finetune_test.jsonl`) scored; None if absent.

    Every task gets its answer loss (nats/token) and bits per answer byte (the end-of-text
    token after each answer is scored too and has 0 bytes, as on the test shard). Exact
    match is a skill only when an answer is determined (`kind` "qa", the story world's
    questions); a real-text continuation has many right answers, so it gets none.
    """
    path = cfg.path("synthetic") / FINETUNE_TEST
    if not path.is_file():
        return None
    rows = read_examples(path)
    task = tokenize(tok, rows, eot, model.config.block_size)
    r = evaluate_task(model, task, eot, 32, model_device(model))
    answer_bytes = sum(len(row["answer"].encode("utf-8")) for row in rows)
    scores = {
        "kind": kind,
        "examples": len(rows),
        "answer_loss": r["answer_loss"],
        "answer_bits_per_byte": r["answer_loss"] * r["answer_tokens"] / LN2 / answer_bytes,
    }
    if kind == "qa":
        scores["exact_match"] = r["task_accuracy"]
    return scores
