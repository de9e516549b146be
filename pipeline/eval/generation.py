"""Quality of generated text: diversity, degeneration, distribution match, validity.

``distinct_n``, ``repetition_rate``: diversity and looping of generations;
``ngram_features``, ``mmd2``, ``precision_recall_knn``: how close generations are to
held-out text as a distribution; ``validity_rate``: the share the source grammar can
produce. Plain numpy + stdlib; features use a stable hash so re-runs are bit-identical.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np


# ---------------------------------------------------------------------------------------
# Diversity, degeneration and distribution match
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
# Validity under the source grammar
# ---------------------------------------------------------------------------------------
def validity_rate(texts: Sequence[str], is_valid: Callable[[str], bool]) -> float:
    """Share of texts the source grammar can produce (e.g. ``StoryWorld.is_valid``).

    A generated story with probability 0 under the story world is a hallucination: it
    breaks the world's rules (gives an object nobody holds, misspells a name, ...).
    """
    texts = list(texts)
    if not texts:
        raise ValueError("validity_rate: no texts")
    return sum(bool(is_valid(t)) for t in texts) / len(texts)
