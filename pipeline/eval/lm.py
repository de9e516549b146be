"""Hand-written evaluation metrics: LM scores, KL to a known source, calibration, generation.

Everything here is plain torch + numpy + stdlib so the evaluate stage runs on the GPU
benchmark machine too (matplotlib is only tried inside ``reliability_png``). Sums are taken
in float64 so reports are stable to many digits and bit-identical on re-runs on CPU.

Groups:
1. ``lm_scores`` / ``target_bytes`` / ``loss_by_position``: cross-entropy, perplexity,
   bits per token and the tokenizer-independent bits per byte of a token stream, the
   latter over the exact bytes of the scored tokens (nanochat's ``evaluate_bpb``).
2. ``kl_rate``: KL divergence rate (bits/byte) from an exactly scored source P to a model Q,
   on fresh documents drawn from P, with a delta-method confidence interval.
3. ``calibration`` / ``CalibrationAccumulator`` / ``reliability_png``: expected calibration
   error, Brier score, predictive entropy and the reliability diagram.
4. ``distinct_n``, ``repetition_rate``, ``ngram_features``, ``mmd2``, ``mmd2_test``,
   ``precision_recall_knn``: diversity, degeneration and distribution match of generations.
5. ``exact_match`` and 6. ``validity_rate``: task accuracy and grammar validity.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

LN2 = math.log(2.0)
_CHUNK_FLOATS = 1 << 22  # rows per calibration chunk are sized to ~32 MiB of float64


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


def target_bytes(
    targets: torch.Tensor, token_bytes: torch.Tensor, ignore_index: int = -1
) -> torch.Tensor:
    """Exact UTF-8 bytes the scored target tokens stand for: ``sum token_bytes[y]``.

    Args:
        targets: integer target ids of any shape; entries equal to ``ignore_index``
            (padding) are not scored and count no bytes.
        token_bytes: (V,) bytes per token id (``pipeline.text.tokenizer.token_byte_lengths``),
            on the same device as ``targets``.

    Returns a 0-dim int64 tensor on that device (no host sync, so it can be summed across
    batches and processes before one ``.item()``). Ids are not range-checked here (that
    would sync): callers check the shard against the table once (``shards.check_text_bytes``).
    """
    y = targets.reshape(-1)  # (N,)
    keep = y != ignore_index  # (N,)
    # Padding is mapped to id 0 and masked out, so no gather reads out of range.
    ids = torch.where(keep, y, torch.zeros_like(y))
    return (token_bytes.to(torch.int64)[ids] * keep).sum()


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
    q = _as_vector("model_nll_bits", model_nll_bits)  # (n,)
    p = _as_vector("source_nll_bits", source_nll_bits)  # (n,)
    b = _as_vector("n_bytes", n_bytes)  # (n,)
    if not len(q) == len(p) == len(b):
        raise ValueError(
            f"kl_rate: model_nll_bits, source_nll_bits and n_bytes must have one entry per "
            f"document, got lengths {len(q)}, {len(p)} and {len(b)}"
        )
    n = len(q)
    if n < 2:
        raise ValueError(f"kl_rate: need at least 2 documents for a standard error, got {n}")
    if not np.isfinite(p).all():
        bad = int(np.flatnonzero(~np.isfinite(p))[0])
        raise ValueError(f"kl_rate: source_nll_bits[{bad}] is not finite; docs must come from P")
    if np.any(b < 0) or b.sum() <= 0:
        raise ValueError("kl_rate: n_bytes must be >= 0 per document with a positive total")
    total_bytes = float(b.sum())
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


# ---------------------------------------------------------------------------------------
# 3. Calibration
# ---------------------------------------------------------------------------------------
class CalibrationAccumulator:
    """Streaming calibration statistics over next-token predictions; O(n_bins) memory.

    Feed it batches with ``update(logits, targets)`` (or ``update_probs``) and read the same
    numbers as ``calibration`` would give on the concatenated batches with ``result()``.
    Rows whose target equals ``ignore_index`` (padding) are skipped.

    Per prediction with top-1 confidence ``c = max_v p_v``, prediction ``argmax_v p_v`` and
    target y it adds ``c`` and ``1[argmax = y]`` to the equal-width bin of ``c`` (bin k is
    ``[k/n_bins, (k+1)/n_bins)``, the last one closed at 1), plus the Brier term
    ``sum_v (p_v - 1[v=y])^2 = sum_v p_v^2 - 2 p_y + 1``, the entropy ``-sum_v p_v ln p_v``
    and the loss ``-ln p_y``.
    """

    def __init__(self, n_bins: int = 15, ignore_index: int = -100) -> None:
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
        self.n_bins, self.ignore_index = n_bins, ignore_index
        self.bin_count = torch.zeros(n_bins, dtype=torch.int64)  # (n_bins,)
        self.bin_conf = torch.zeros(n_bins, dtype=torch.float64)  # (n_bins,) sum of c
        self.bin_correct = torch.zeros(n_bins, dtype=torch.float64)  # (n_bins,) sum of hits
        self.brier_sum = self.entropy_sum = self.nll_sum = 0.0
        self.count = 0

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> CalibrationAccumulator:
        """Add (N, V) unnormalized logits and their (N,) integer targets."""
        return self._update(logits, targets, from_logits=True)

    def update_probs(self, probs: torch.Tensor, targets: torch.Tensor) -> CalibrationAccumulator:
        """Add (N, V) probability vectors (rows summing to 1) and their (N,) targets."""
        return self._update(probs, targets, from_logits=False)

    def _update(
        self, scores: torch.Tensor, targets: torch.Tensor, from_logits: bool
    ) -> CalibrationAccumulator:
        if scores.dim() != 2 or targets.dim() != 1 or scores.size(0) != targets.size(0):
            raise ValueError(
                f"calibration: expected (N, V) scores and (N,) targets, got "
                f"{tuple(scores.shape)} and {tuple(targets.shape)}"
            )
        scores, targets = scores.detach(), targets.detach().to(torch.int64)
        keep = targets != self.ignore_index  # (N,)
        if not bool(keep.all()):
            scores, targets = scores[keep], targets[keep]
        V = scores.size(1)
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= V):
            raise ValueError(f"calibration: targets must lie in [0, {V}) or be ignore_index")
        rows = max(1, _CHUNK_FLOATS // max(V, 1))
        for start in range(0, targets.numel(), rows):
            self._add_chunk(
                scores[start : start + rows], targets[start : start + rows], from_logits
            )
        return self

    def _add_chunk(self, scores: torch.Tensor, y: torch.Tensor, from_logits: bool) -> None:
        s = scores.to(torch.float64)  # (n, V)
        if from_logits:
            logp = torch.log_softmax(s, dim=-1)  # (n, V)
            p = logp.exp()
            plogp = p * logp  # (n, V)
        else:
            p = s
            plogp = torch.special.xlogy(p, p)  # (n, V), 0 log 0 = 0
        conf, pred = p.max(dim=-1)  # (n,), (n,)
        p_y = p.gather(1, y[:, None]).squeeze(1)  # (n,)
        hit = (pred == y).to(torch.float64)  # (n,)
        idx = (conf * self.n_bins).floor().to(torch.int64).clamp_(0, self.n_bins - 1)  # (n,)
        self.bin_count += torch.bincount(idx, minlength=self.n_bins)
        self.bin_conf.index_add_(0, idx, conf)
        self.bin_correct.index_add_(0, idx, hit)
        self.brier_sum += float(((p * p).sum(-1) - 2.0 * p_y + 1.0).sum())
        self.entropy_sum -= float(plogp.sum())
        self.nll_sum -= float(p_y.log().sum())
        self.count += y.numel()

    def result(self) -> dict[str, Any]:
        """ECE, MCE, Brier, entropy, accuracy, NLL and the reliability diagram.

        ``ece = sum_k (n_k / N) |acc_k - conf_k|`` over equal-width confidence bins: how
        far, on average over predictions, the stated confidence is from the hit rate. It
        is 0 for a calibrated model and is the headline number of Guo et al. (2017).
        ``mce`` is the largest per-bin gap. ``brier`` is the mean multiclass Brier score
        (a proper scoring rule, 0 for confident correct answers, at most 2).
        ``entropy`` is the mean predictive entropy in nats (ln V for a uniform model).
        ``diagram`` lists every bin as {lower, upper, count, confidence, accuracy}; the
        last two are None for empty bins.
        """
        if self.count == 0:
            raise ValueError("calibration: no predictions were added")
        N, diagram, ece, mce = self.count, [], 0.0, 0.0
        for k in range(self.n_bins):
            n_k = int(self.bin_count[k])
            conf = acc = None
            if n_k:
                conf = float(self.bin_conf[k]) / n_k
                acc = float(self.bin_correct[k]) / n_k
                ece += n_k / N * abs(acc - conf)
                mce = max(mce, abs(acc - conf))
            lower, upper = k / self.n_bins, (k + 1) / self.n_bins
            diagram.append(
                {"lower": lower, "upper": upper, "count": n_k, "confidence": conf, "accuracy": acc}
            )
        return {
            "ece": ece,
            "mce": mce,
            "brier": self.brier_sum / N,
            "entropy": self.entropy_sum / N,
            "accuracy": float(self.bin_correct.sum()) / N,
            "confidence": float(self.bin_conf.sum()) / N,
            "nll": self.nll_sum / N,
            "count": N,
            "diagram": diagram,
        }


def calibration(
    probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15, ignore_index: int = -100
) -> dict[str, Any]:
    """Calibration of (N, V) next-token probabilities against (N,) targets (one shot).

    See ``CalibrationAccumulator.result`` for the formulas; this is the accumulator fed
    once, so the streaming and one-shot numbers cannot disagree.
    """
    acc = CalibrationAccumulator(n_bins, ignore_index)
    return acc.update_probs(probs, targets).result()


def reliability_png(
    diagram: Sequence[dict[str, Any]], path: str | Path, title: str = "reliability diagram"
) -> Path | None:
    """Draw accuracy vs confidence per bin (with the diagonal) and the bin counts.

    Returns the written path, or None when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    lower = [b["lower"] for b in diagram]
    width = [b["upper"] - b["lower"] for b in diagram]
    acc = [b["accuracy"] or 0.0 for b in diagram]
    conf = [b["confidence"] if b["confidence"] is not None else math.nan for b in diagram]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.bar(lower, acc, width=width, align="edge", edgecolor="black", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    centers = [lo + w / 2 for lo, w in zip(lower, width, strict=True)]
    top.plot(centers, conf, "o", ms=3, color="tab:red", label="mean confidence")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(title)
    top.legend(loc="upper left")
    bottom.bar(lower, [b["count"] for b in diagram], width=width, align="edge", color="gray")
    bottom.set_xlabel("top-1 confidence")
    bottom.set_ylabel("count")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------
# 4. Generation quality
# ---------------------------------------------------------------------------------------
def _word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = text.split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / total word n-grams, all texts pooled.

    Words are whitespace-separated; n-grams never cross text boundaries. 1.0 means no
    n-gram is ever repeated, values near 0 mean the generator says the same thing over and
    over. Returns 0.0 when the texts hold no n-gram at all.
    """
    _check_n(n)
    grams = [g for t in texts for g in _word_ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(texts: Iterable[str], n: int = 4) -> float:
    """Share of each text's word n-grams already seen earlier in that text, averaged.

    Catches the looping degeneration of greedy/beam decoding ("the cat sat. the cat sat.")
    that distinct-n, pooled over texts, can hide. Texts with no n-gram are skipped; 0.0 when
    no text has one.
    """
    _check_n(n)
    rates = []
    for text in texts:
        grams = _word_ngrams(text, n)
        if not grams:
            continue
        seen: set[tuple[str, ...]] = set()
        repeats = 0
        for g in grams:
            repeats += g in seen
            seen.add(g)
        rates.append(repeats / len(grams))
    return float(np.mean(rates)) if rates else 0.0


def ngram_features(
    texts: Sequence[str], n: Sequence[int] = (1, 2, 3), dim: int = 2**12
) -> np.ndarray:
    """(len(texts), dim) hashed character n-gram counts, each row L2-normalized.

    Every character n-gram g of each order in ``n`` is counted in bucket
    ``crc32(f"{order}:{g}") % dim``: a stable hash (Python's ``hash`` is salted per process
    and would make features, hence MMD, differ between runs). Normalizing removes the
    length of a text, so the features describe its style and vocabulary. An empty text is a
    zero row.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    for order in n:
        _check_n(order)
    feats = np.zeros((len(texts), dim), dtype=np.float64)  # (M, dim)
    for row, text in enumerate(texts):
        buckets = [
            zlib.crc32(f"{order}:{text[i : i + order]}".encode("utf-8", "surrogatepass")) % dim
            for order in n
            for i in range(len(text) - order + 1)
        ]
        if buckets:
            feats[row] = np.bincount(buckets, minlength=dim)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)  # (M, 1)
    return feats / np.where(norms > 0, norms, 1.0)


def _sq_dists(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """(m, n) squared Euclidean distances between rows of A (m, d) and B (n, d)."""
    d2 = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * (A @ B.T)
    return np.maximum(d2, 0.0)


def _two_samples(X: np.ndarray, Y: np.ndarray, need: int) -> tuple[np.ndarray, np.ndarray]:
    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"expected (m, d) and (n, d) feature arrays, got {X.shape} and {Y.shape}")
    if len(X) < need or len(Y) < need:
        raise ValueError(f"need at least {need} samples on each side, got {len(X)} and {len(Y)}")
    return X, Y


def _median_gamma(d2: np.ndarray) -> float:
    """RBF gamma ``1 / (2 sigma^2)`` with sigma^2 = median squared distance of distinct pairs."""
    med = float(np.median(d2[np.triu_indices(len(d2), k=1)]))
    return 1.0 / (2.0 * med) if med > 0 else 1.0


def _mmd2_from_kernel(K: np.ndarray, m: int) -> float:
    """Unbiased MMD^2 from the pooled (m+n, m+n) kernel matrix, X first."""
    n = len(K) - m
    kxx = (K[:m, :m].sum() - np.trace(K[:m, :m])) / (m * (m - 1))
    kyy = (K[m:, m:].sum() - np.trace(K[m:, m:])) / (n * (n - 1))
    return float(kxx + kyy - 2.0 * K[:m, m:].mean())


def mmd2(X: np.ndarray, Y: np.ndarray, gamma: float | None = None) -> float:
    """Unbiased squared maximum mean discrepancy with the RBF kernel (Gretton et al. 2012).

    With ``k(x, y) = exp(-gamma ||x - y||^2)``, X (m, d) and Y (n, d):

        MMD^2_u = sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (n(n-1))
                  - 2 sum_{i,j} k(x_i, y_j) / (mn)

    an unbiased estimate of the squared distance between the kernel mean embeddings of the
    two distributions: 0 in expectation when they are equal (so it can be slightly
    negative), positive when they differ. ``gamma=None`` uses the median heuristic on the
    pooled sample, ``gamma = 1 / (2 median ||a - b||^2)``.
    """
    X, Y = _two_samples(X, Y, 2)
    Z = np.concatenate([X, Y])  # (m+n, d)
    d2 = _sq_dists(Z, Z)  # (m+n, m+n)
    g = _median_gamma(d2) if gamma is None else float(gamma)
    return _mmd2_from_kernel(np.exp(-g * d2), len(X))


def mmd2_test(
    X: np.ndarray,
    Y: np.ndarray,
    gamma: float | None = None,
    num_permutations: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """MMD^2 with a permutation-test p-value for H0: X and Y come from one distribution.

    Under H0 the split into X and Y is exchangeable, so the statistic recomputed on random
    re-splits of the pooled sample is a draw from its null distribution;
    ``p = (1 + #{null >= observed}) / (1 + num_permutations)``. Also returns the null's
    95% quantile, the threshold an MMD^2 must pass to count as a difference at level 0.05.
    """
    X, Y = _two_samples(X, Y, 2)
    m, N = len(X), len(X) + len(Y)
    Z = np.concatenate([X, Y])  # (N, d)
    d2 = _sq_dists(Z, Z)  # (N, N)
    g = _median_gamma(d2) if gamma is None else float(gamma)
    K = np.exp(-g * d2)  # (N, N)
    observed = _mmd2_from_kernel(K, m)
    rng = np.random.default_rng(seed)
    K0 = K - np.diag(np.diag(K))  # (N, N) zero diagonal: the i != j sums
    A = np.zeros((num_permutations, N))  # (P, N) indicator of the X side per permutation
    for row in range(num_permutations):
        A[row, rng.permutation(N)[:m]] = 1.0
    B = 1.0 - A  # (P, N)
    KA, KB = A @ K0, B @ K0  # (P, N)
    n = N - m
    null = (
        (KA * A).sum(1) / (m * (m - 1))
        + (KB * B).sum(1) / (n * (n - 1))
        - 2 * (KA * B).sum(1) / (m * n)
    )  # (P,)
    return {
        "mmd2": observed,
        "p_value": float((1 + np.sum(null >= observed)) / (1 + num_permutations)),
        "null_q95": float(np.quantile(null, 0.95)),
        "gamma": g,
    }


def precision_recall_knn(
    real_feats: np.ndarray, gen_feats: np.ndarray, k: int = 3
) -> dict[str, float]:
    """Improved precision and recall of Kynkäänniemi et al. (2019) with k-NN manifolds.

    Each sample's radius is the distance to its k-th nearest neighbour within its own set;
    a set's manifold is the union of those balls. Precision = share of generated samples
    inside the real manifold (are generations realistic?); recall = share of real samples
    inside the generated manifold (does the generator cover the data?). Mode collapse lowers
    recall, garbage lowers precision; one number like MMD cannot tell the two apart.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    R, G = _two_samples(real_feats, gen_feats, k + 1)

    def radii(A: np.ndarray) -> np.ndarray:  # (len(A),) squared k-NN radii
        d2 = _sq_dists(A, A)
        np.fill_diagonal(d2, np.inf)
        return np.partition(d2, k - 1, axis=1)[:, k - 1]

    cross = _sq_dists(G, R)  # (g, r)
    eps = 1e-12  # identical points must count as inside despite rounding in _sq_dists
    real_r, gen_r = radii(R) + eps, radii(G) + eps  # (r,), (g,)
    precision = np.any(cross <= real_r[None, :], axis=1).mean()  # some real ball holds g
    cross_rg = cross.T  # (r, g)
    recall = np.any(cross_rg <= gen_r[None, :], axis=1).mean()  # some generated ball holds r
    return {"precision": float(precision), "recall": float(recall)}


# ---------------------------------------------------------------------------------------
# 5. Exact match and 6. validity
# ---------------------------------------------------------------------------------------
def _normalize(text: str) -> str:
    return " ".join(text.split()).lower()


def exact_match(
    predictions: Sequence[str], references: Sequence[str], normalize: bool = True
) -> float:
    """Share of predictions equal to their reference.

    With ``normalize`` both sides are stripped, lowercased and have runs of whitespace
    collapsed to one space first, so "The  park " matches "the park" (formatting is not
    what a QA task measures).
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"exact_match: {len(predictions)} predictions for {len(references)} references"
        )
    if not predictions:
        raise ValueError("exact_match: no predictions")
    f = _normalize if normalize else (lambda s: s)
    return sum(f(p) == f(r) for p, r in zip(predictions, references, strict=True)) / len(
        predictions
    )


def validity_rate(texts: Sequence[str], is_valid: Callable[[str], bool]) -> float:
    """Share of texts the source grammar can produce (e.g. ``StoryWorld.is_valid``).

    A generated story with probability 0 under the story world is a hallucination: it
    breaks the world's rules (gives an object nobody holds, misspells a name, ...).
    """
    texts = list(texts)
    if not texts:
        raise ValueError("validity_rate: no texts")
    return sum(bool(is_valid(t)) for t in texts) / len(texts)
