"""Language-model scores of a token stream and the KL rate to a known source.

Everything here is plain torch + numpy + stdlib so the evaluate stage runs on the GPU
benchmark machine too. Sums are taken in float64 so reports are stable to many digits and
bit-identical on re-runs on CPU. Calibration lives in ``calibration.py``, the quality of
generated text in ``generation.py``.

1. ``lm_scores`` / ``target_bytes`` / ``loss_by_position``: cross-entropy, perplexity,
   bits per token and the tokenizer-independent bits per byte of a token stream, the
   latter over the exact bytes of the scored tokens (nanochat's ``evaluate_bpb``).
2. ``kl_rate``: KL divergence rate (bits/byte) from an exactly scored source P to a model Q,
   on fresh documents drawn from P, with a delta-method confidence interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

# The exact byte count lives with the token->bytes table it reads (text/, below train and
# eval); re-exported here beside the scores that divide by it.
from pipeline.text.tokenizer import target_bytes as target_bytes

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------
# 1. Language-model scores on token streams
# ---------------------------------------------------------------------------------------
def lm_scores(nll_per_token: torch.Tensor, n_bytes: int) -> dict[str, float]:
    """Cross-entropy, perplexity, bits/token and bits/byte of a scored token stream.

    With per-token losses ``l_i = -ln q(x_i | x_<i)`` (nats) over N tokens that decode to
    ``n_bytes`` UTF-8 bytes:

    - ``cross_entropy = (1/N) sum_i l_i`` (nats/token), the training objective;
    - ``perplexity = exp(cross_entropy)``, the effective number of equally likely choices
      (a uniform model over V tokens has perplexity exactly V);
    - ``bits_per_token = cross_entropy / ln 2``;
    - ``bits_per_byte = sum_i l_i / ln 2 / n_bytes``: the code length of the text per byte.
      Unlike the per-token numbers it does not depend on the tokenizer (a larger vocabulary
      makes fewer, harder tokens), so models with different tokenizers compare on it.

    ``n_bytes`` must be the exact byte count of the N scored tokens (``target_bytes``), not
    N times an average bytes/token: windows of a stream are not average. Separators count
    0 bytes but their loss stays in the sum: the model has to code where a document ends,
    so the numerator is the code length of the stream, and the KL rate (which counts the
    end-of-document event on both sides) uses the same convention. nanochat's
    ``evaluate_bpb`` drops the separators' loss instead; here it would make a model that
    never predicts the end of a document look better than it is.

    Args:
        nll_per_token: (N,) negative log-likelihoods in nats.
        n_bytes: number of UTF-8 bytes the N tokens stand for (> 0).
    """
    nll = torch.as_tensor(nll_per_token).detach().to(torch.float64).reshape(-1)  # (N,)
    if nll.numel() == 0:
        raise ValueError("lm_scores: nll_per_token is empty; need at least one token")
    if not torch.isfinite(nll).all():
        raise ValueError("lm_scores: nll_per_token holds NaN or inf values")
    if isinstance(n_bytes, bool) or not isinstance(n_bytes, int | np.integer) or n_bytes <= 0:
        raise ValueError(f"lm_scores: n_bytes must be a positive integer, got {n_bytes!r}")
    total = float(nll.sum())
    ce = total / nll.numel()
    return {
        "cross_entropy": ce,
        "perplexity": math.exp(ce),
        "bits_per_token": ce / LN2,
        "bits_per_byte": total / LN2 / int(n_bytes),
        "num_tokens": int(nll.numel()),
        "num_bytes": int(n_bytes),
    }


def loss_by_position(nll: torch.Tensor) -> list[float]:
    """Mean loss at each position t of a (B, T) batch: ``[mean_b nll[b, t] for t]``.

    A falling curve shows how much the model uses its context; a flat tail beyond some t
    says the extra context stops helping (or that the model cannot attend that far).
    """
    if nll.dim() != 2 or nll.numel() == 0:
        raise ValueError(
            f"loss_by_position: expected a non-empty (B, T) tensor, got {tuple(nll.shape)}"
        )
    return nll.detach().to(torch.float64).mean(dim=0).tolist()  # (T,)


# ---------------------------------------------------------------------------------------
# 2. KL rate against a known source
# ---------------------------------------------------------------------------------------
def _as_vector(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if np.isnan(arr).any():
        raise ValueError(f"kl_rate: {name} holds NaN values")
    return arr


def kl_rate(
    model_nll_bits: Sequence[float],
    source_nll_bits: Sequence[float],
    n_bytes: Sequence[int],
    z: float = 1.96,
) -> dict[str, float]:
    """KL divergence rate from the true source P to a model Q, in bits per byte, with a CI.

    For documents ``x_1..x_n`` drawn fresh from P, given ``q_i = -log2 Q(x_i)``,
    ``p_i = -log2 P(x_i)`` (both including the end-of-document event) and ``b_i`` bytes:

        KL rate = E_P[log2 P(x) - log2 Q(x)] / E_P[bytes(x)]  ~  sum_i (q_i - p_i) / sum_i b_i

    i.e. the model's bits/byte minus the source's entropy rate measured on the same docs.
    Scoring both on the same documents is what makes the estimate precise: the per-document
    noise of ``q_i`` and ``p_i`` largely cancels in ``d_i = q_i - p_i``. It is a ratio of
    means, so its standard error comes from the delta method:

        R = d_bar / b_bar,   Var(R) ~ Var(d_i - R * b_i) / (n * b_bar^2)

    and the interval is ``R +- z * se``. A model equal to the source gets exactly 0 with a
    zero-width interval; a model that gives a document probability 0 gets ``inf``.
    """
    q, p, b = _kl_inputs(model_nll_bits, source_nll_bits, n_bytes)  # (n,) each
    n, total_bytes = len(q), float(b.sum())
    source_bpb = float(p.sum()) / total_bytes
    if not np.isfinite(q).all():  # Q(x) = 0 for some x drawn from P: infinite KL
        inf = math.inf
        return {
            "kl_bits_per_byte": inf,
            "stderr": inf,
            "ci_low": inf,
            "ci_high": inf,
            "model_bits_per_byte": inf,
            "source_bits_per_byte": source_bpb,
            "num_docs": n,
        }
    d = q - p  # (n,) per-document excess code length in bits
    rate = float(d.sum()) / total_bytes
    resid = d - rate * b  # (n,) linearized ratio-estimator errors
    stderr = float(np.sqrt(resid.var(ddof=1) / n) / b.mean())
    return {
        "kl_bits_per_byte": rate,
        "stderr": stderr,
        "ci_low": rate - z * stderr,
        "ci_high": rate + z * stderr,
        "model_bits_per_byte": float(q.sum()) / total_bytes,
        "source_bits_per_byte": source_bpb,
        "num_docs": n,
    }


def _kl_inputs(
    model_nll_bits: Sequence[float], source_nll_bits: Sequence[float], n_bytes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kl_rate's inputs as checked (n,) float64 vectors: one entry per document, n >= 2,
    finite source code lengths (the documents come from P), byte counts >= 0 summing > 0."""
    q = _as_vector("model_nll_bits", model_nll_bits)  # (n,)
    p = _as_vector("source_nll_bits", source_nll_bits)  # (n,)
    b = _as_vector("n_bytes", n_bytes)  # (n,)
    if not len(q) == len(p) == len(b):
        raise ValueError(
            f"kl_rate: model_nll_bits, source_nll_bits and n_bytes must have one entry per "
            f"document, got lengths {len(q)}, {len(p)} and {len(b)}"
        )
    if len(q) < 2:
        raise ValueError(f"kl_rate: need at least 2 documents for a standard error, got {len(q)}")
    if not np.isfinite(p).all():
        bad = int(np.flatnonzero(~np.isfinite(p))[0])
        raise ValueError(f"kl_rate: source_nll_bits[{bad}] is not finite; docs must come from P")
    if np.any(b < 0) or b.sum() <= 0:
        raise ValueError("kl_rate: n_bytes must be >= 0 per document with a positive total")
    return q, p, b
