"""Scoring a model on text: the held-out test shard, and whole documents of a known source.

``test_scores`` cuts the test shard into windows and reports the LM scores and calibration;
``doc_bits`` gives each whole document's code length under the model (``scoring_windows``
says which model calls score every token once with full context), and ``source_kl``
compares those to the exact code lengths a source gives the same documents. The model runs
on its own device (bf16 autocast on CUDA); losses are summed on the CPU in float32/64.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from pipeline.config import Config
from pipeline.core.errors import LmforgeError
from pipeline.eval.calibration import CalibrationAccumulator
from pipeline.eval.lm import LN2, kl_rate, lm_scores, loss_by_position
from pipeline.model.gpt import GPT
from pipeline.text.tokenizer import encode_docs, target_bytes

# Documents of a source as (texts, -log2 P(text) in bits, end of document included).
SourceDocs = tuple[list[str], list[float]]


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are: inputs go there, scores come back to the CPU."""
    return next(model.parameters()).device


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (as in training), nothing on CPU: CPU scores stay float32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def test_scores(model: GPT, tokens: np.ndarray, cfg: Config, token_bytes: torch.Tensor) -> dict:
    """Cross-entropy, perplexity, bits/byte, loss by position and calibration on the test shard.

    The shard is cut into consecutive windows of T+1 tokens that overlap by one token; every
    token but the first of a window is predicted from the window's earlier tokens, so each
    token after the shard's first is scored exactly once. Bits per byte divides by the exact
    bytes of the scored target tokens (`token_bytes`, (V,), separators 0), not an average.
    """
    T = model.config.block_size
    n = (len(tokens) - 1) // T
    if cfg.evaluate.test_windows:
        n = min(n, cfg.evaluate.test_windows)
    if n < 1:
        raise LmforgeError(f"test shard has {len(tokens)} tokens; need more than {T + 1}")
    calib = CalibrationAccumulator(cfg.evaluate.calibration_bins)
    nll_rows = []
    n_bytes = torch.zeros((), dtype=torch.int64)
    dev = model_device(model)
    for start in range(0, n, 16):
        idx = range(start, min(start + 16, n))
        window = np.stack([tokens[i * T : i * T + T + 1] for i in idx]).astype(np.int64)
        chunk = torch.from_numpy(window)  # (B, T+1)
        x, y = chunk[:, :-1], chunk[:, 1:]
        with autocast(dev):
            logits = model(x.to(dev))[0].cpu()  # (B, T, V) float32
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")
        nll_rows.append(nll)  # (B, T)
        n_bytes += target_bytes(y, token_bytes)
        calib.update(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    nll = torch.cat(nll_rows)  # (n, T)
    return {
        **lm_scores(nll.reshape(-1), int(n_bytes)),
        "loss_by_position": loss_by_position(nll),
        "calibration": calib.result(),
        "tokens_scored": nll.numel(),
    }


def scoring_windows(n: int, T: int) -> list[tuple[int, int, int]]:
    """The model calls that score a sequence of `n` tokens once each: (start, length, first).

    A call feeds `seq[start : start + length]` and scores the targets of positions
    `first .. length-1`, i.e. tokens `seq[start + first + 1 .. start + length]`. Token t
    (1 <= t < n) is always predicted from its min(t, T) previous tokens, the most the
    model can see:

    - the first window feeds seq[:T] and scores tokens 1..T with all their history;
    - every later token t > T gets a window of its own, seq[t-T : t], and only its last
      position is scored (a stride of one token).

    Why stride 1: it is the only choice that gives every token the full context, which is
    the definition of the model's probability of a long document under a T-token window.
    A stride S > 1 (e.g. T/2) would be S times cheaper but would predict some tokens from
    as few as T-S of their previous tokens, i.e. score a weaker model than the one trained
    and bias the KL rate upwards. The cost is one length-T call per token beyond the first
    T, batched; at the default sizes story-world documents fit one window, and the report
    counts the documents that did not (`multi_window_docs`).
    """
    if n < 2:
        return []
    first = (0, min(n - 1, T), 0)
    return [first] + [(t - T, T, T - 1) for t in range(T + 1, n)]


# A change of the model's next-token logits, (N, V) -> (N, V), -inf for a token it never
# emits: a sampling strategy's distribution (temperature, top-k, top-p) as a function.
LogitsFilter = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def doc_bits(model: GPT, docs_ids: list[list[int]], eot: int, batch: int = 32) -> list[float]:
    """Total -log2 Q(doc) of each whole document, its end-of-text included, given a preceding EOT.

    Every token of `[EOT, *doc, EOT]` after the first is predicted exactly once, with
    min(t, block_size) tokens of context (see `scoring_windows`), however long the document.
    """
    return doc_bits_under(model, docs_ids, eot, {"model": None}, batch)["model"]


@torch.no_grad()
def doc_bits_under(
    model: GPT,
    docs_ids: list[list[int]],
    eot: int,
    filters: Mapping[str, LogitsFilter | None],
    batch: int = 32,
) -> dict[str, list[float]]:
    """`doc_bits` under each of `filters` (None: the model itself), from one set of forwards.

    A filter's distribution is the softmax of the filtered logits at every step, so a
    document's code length under it is the code length of that sampling process producing
    it; a token a filter removes costs inf bits.
    """
    T = model.config.block_size
    seqs = [[eot, *ids, eot] for ids in docs_ids]
    calls = [(d, w) for d, s in enumerate(seqs) for w in scoring_windows(len(s), T)]
    dev = model_device(model)
    totals = {name: [0.0] * len(seqs) for name in filters}  # nats per document
    for start in range(0, len(calls), batch):
        group = calls[start : start + batch]
        length = max(w[1] for _, w in group)
        x = torch.full((len(group), length), eot, dtype=torch.long)  # (B, L) padded inputs
        y = torch.full((len(group), length), -1, dtype=torch.long)  # (B, L) -1: not scored
        for row, (d, (s0, n, first)) in enumerate(group):
            s = torch.tensor(seqs[d][s0 : s0 + n + 1])  # (n+1,) inputs and their next tokens
            x[row, :n] = s[:-1]
            y[row, first:n] = s[1 + first :]
        with autocast(dev):
            logits = model(x.to(dev))[0].cpu()  # (B, L, V) float32
        scored = y != -1  # (B, L)
        row_of = scored.nonzero()[:, 0]  # (N,) the group row of each scored position
        for name, keep in filters.items():
            step = logits[scored] if keep is None else keep(logits[scored])  # (N, V)
            logp = torch.log_softmax(step.float(), dim=-1)  # (N, V)
            nll = -logp.gather(1, y[scored].unsqueeze(1)).squeeze(1).to(torch.float64)  # (N,)
            per_row = torch.zeros(len(group), dtype=torch.float64).index_add_(0, row_of, nll)
            for (d, _), value in zip(group, per_row.tolist(), strict=True):
                totals[name][d] += value  # summed in a fixed order: bit-identical re-runs
    return {name: [v / LN2 for v in nats] for name, nats in totals.items()}


def source_kl(
    model: GPT,
    tok: Tokenizer,
    eot: int,
    sources: dict[str, SourceDocs],
    sampling: Mapping[str, LogitsFilter] | None = None,
) -> dict[str, dict[str, Any]]:
    """KL rate (bits/byte, with CI) of the model to each exact source, on its documents.

    `sources` maps a source's name to fresh documents drawn from it and their exact code
    lengths under it (`pipeline.data.eval_inputs.exact_sources`); the result has the same
    keys in the same order. `sampling` (strategy name -> its logits filter) adds, per
    source, the KL rate of each strategy's sampling distribution on the same documents
    (`sampling.<strategy>`), with the share of documents it can never produce: a strategy
    that drops a token the source uses has an infinite KL, however rarely it does.
    """
    T, results = model.config.block_size, {}
    for name, (docs, source_bits) in sources.items():
        ids = encode_docs(tok, docs)
        bits = doc_bits_under(model, ids, eot, {"model": None, **(sampling or {})})
        n_bytes = [len(d.encode("utf-8")) for d in docs]
        results[name] = {
            **kl_rate(bits.pop("model"), source_bits, n_bytes),
            # whole documents are scored: this many needed more than one model window
            "multi_window_docs": sum(len(scoring_windows(len(d) + 2, T)) > 1 for d in ids),
        }
        if sampling:
            results[name]["sampling"] = {
                strategy: {
                    **kl_rate(q, source_bits, n_bytes),
                    "never_produced": float(np.mean(~np.isfinite(q))),
                }
                for strategy, q in bits.items()
            }
    return results
