"""Decoding with every strategy, the quality of what comes out, and task accuracy.

`decode_all` continues each prompt with greedy, beam, temperature, top-k and top-p
decoding; `generation_quality` scores each strategy's texts against held-out references
(`pipeline/eval/generation.py`); `task_accuracy` is the exact-match accuracy on the
fine-tuning test split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

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
from pipeline.model.generate import generate
from pipeline.model.gpt import GPT
from pipeline.text.task_data import evaluate_task, read_examples, tokenize
from pipeline.text.tokenizer import decode, encode_docs


def decode_all(
    model: GPT, tok: Tokenizer, eot: int, prompts: list[str], cfg: Config, seed: int
) -> dict[str, list[str]]:
    """Generations (prompt + continuation) per decoding strategy; sampling uses `seed`."""
    e, T = cfg.evaluate, model.config.block_size
    # Prompt and continuation share the context: leave at least half of it to the prompt.
    n = min(e.max_new_tokens, T // 2)
    # Each strategy changes one setting of plain greedy decoding (every filter off).
    greedy = DecodingConfig(
        "greedy", n, temperature=1.0, top_k=0, top_p=1.0, num_beams=1, seed=seed
    )
    strategies = {
        "greedy": greedy,
        "beam": replace(greedy, strategy="beam", num_beams=e.num_beams),
        "temperature": replace(greedy, strategy="sample", temperature=e.temperature),
        "top_k": replace(greedy, strategy="sample", top_k=e.top_k),
        "top_p": replace(greedy, strategy="sample", top_p=e.top_p),
    }
    prompt_ids = encode_docs(tok, prompts)
    out: dict[str, list[str]] = {}
    for name, dcfg in strategies.items():
        texts = []
        for p, ids in zip(prompts, prompt_ids, strict=True):
            # The prompt is cropped to fit T; length_penalty scores the beam strategy only.
            new = generate(model, [eot, *ids], dcfg, eos_id=eot, length_penalty=e.length_penalty)
            texts.append(p + decode(tok, _until(new, eot)))
        out[name] = texts
    return out


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


def task_accuracy(model: GPT, tok: Tokenizer, eot: int, cfg: Config) -> float | None:
    """Exact-match accuracy on `<synthetic>/finetune_test.jsonl`; None when there is none."""
    path = cfg.path("synthetic") / FINETUNE_TEST
    if not path.is_file():
        return None
    task = tokenize(tok, read_examples(path), eot, model.config.block_size)
    return evaluate_task(model, task, eot, 32, torch.device("cpu"))["task_accuracy"]
