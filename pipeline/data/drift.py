"""Drift and contamination checks between a synthetic set and the validated real corpus.

The synthesize stage runs these before its output is used: augmentation text that drifts
far from the real corpus (odd characters, wrong document lengths) wastes or harms training,
and synthetic text that copies the validation/test splits leaks them into training and
makes the evaluation numbers optimistic.

Pure Python + numpy, so it runs anywhere the pipeline core runs.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np


# ------------------------------------------------------------------------------------ drift
def _char_counts(docs: Iterable[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for doc in docs:
        counts.update(doc)
    return counts


def unigram_kl(p_docs: Iterable[str], q_docs: Iterable[str], smoothing: float = 1e-6) -> float:
    """KL(P || Q) in bits between the character-unigram distributions of two document sets.

    Both distributions live on the union of their characters and are mixed with a uniform
    floor, ``(1 - smoothing) * freq + smoothing / |union|``, so the KL is finite; a character
    that P uses and Q never does costs about ``log2(|union| / smoothing)`` bits per use.

    Direction: call it with P = synthetic, Q = real. KL(P || Q) is the expected extra bits
    per character of coding synthetic text with a code built for the real text; it is large
    when the synthetic set puts mass where the real corpus has little (invented symbols,
    skewed frequencies), the failure that hurts augmentation. Rare real characters missing
    from the synthetic set cost almost nothing in this direction, which is acceptable for
    augmentation that is mixed with real text.
    """
    if not 0 < smoothing < 1:
        raise ValueError(f"smoothing must be in the open interval (0, 1), got {smoothing!r}")
    p_counts, q_counts = _char_counts(p_docs), _char_counts(q_docs)
    for name, counts in (("p_docs", p_counts), ("q_docs", q_counts)):
        if not counts:
            raise ValueError(f"unigram_kl: {name} has no characters")
    vocab = sorted(p_counts.keys() | q_counts.keys())
    p = _smoothed([p_counts[c] for c in vocab], smoothing)  # (V,)
    q = _smoothed([q_counts[c] for c in vocab], smoothing)  # (V,)
    return float(max(np.sum(p * np.log2(p / q)), 0.0))


def _smoothed(counts: list[int], smoothing: float) -> np.ndarray:
    freq = np.asarray(counts, dtype=np.float64)
    return (1 - smoothing) * freq / freq.sum() + smoothing / len(freq)


def length_distance(a_lengths: Iterable[float], b_lengths: Iterable[float]) -> float:
    """1-Wasserstein distance between the distributions of log(1 + length).

    On a log scale the distance is scale-free and readable: if every length in one set is
    s times the other's, the distance is about ``|ln s|`` (0.1 ~ lengths 10% off; 0.69 ~ a
    factor of 2). It is 0 for identical distributions, symmetric, and grows smoothly with a
    shift, unlike the KS statistic, which saturates at 1 once the supports separate.
    Lengths are meant to be UTF-8 byte lengths.
    """
    a, b = _log_lengths(a_lengths, "a_lengths"), _log_lengths(b_lengths, "b_lengths")
    grid = np.sort(np.concatenate([a, b]))  # (Na + Nb,)
    cdf_a = np.searchsorted(a, grid[:-1], side="right") / len(a)  # (Na + Nb - 1,)
    cdf_b = np.searchsorted(b, grid[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(grid)))


def _log_lengths(lengths: Iterable[float], name: str) -> np.ndarray:
    arr = np.asarray(list(lengths), dtype=np.float64)
    if arr.size == 0:
        raise ValueError(f"length_distance: {name} is empty")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"length_distance: {name} must be finite and >= 0")
    return np.sort(np.log1p(arr))


# ---------------------------------------------------------------------------- contamination
def _words(doc: str) -> list[str]:
    """Lowercase whitespace-split tokens: the normalization of GPT-3-style overlap checks."""
    return doc.lower().split()


def _hash(text: str) -> int:
    """64-bit blake2b digest as an unsigned int (collision odds ~N*M/2^64: negligible)."""
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )


def _ngrams(words: Sequence[str], n: int) -> list[str]:
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


@dataclass
class LeakExample:
    """One contaminated document: ``kind`` is "exact" or "ngram"; ``text`` the shared text."""

    doc_index: int
    kind: Literal["exact", "ngram"]
    text: str


@dataclass
class ContaminationReport:
    """Counts of leaking documents (each document counted once, exact match first)."""

    n_docs: int
    n: int
    exact_duplicates: int
    ngram_overlaps: int
    examples: list[LeakExample] = field(default_factory=list)

    @property
    def contaminated(self) -> int:
        return self.exact_duplicates + self.ngram_overlaps

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["contaminated"] = self.contaminated
        out["contaminated_fraction"] = self.contaminated / self.n_docs if self.n_docs else 0.0
        return out


class NGramIndex:
    """Hashes of every word n-gram and every whole normalized document of reference docs.

    Built from the validation and test splits. Only 64-bit hashes are kept, in sorted
    ``uint64`` arrays (8 bytes per n-gram, about 7x less than a Python set of ints), so the
    index stays small for large reference sets. Empty documents (no words) are ignored.
    ``n`` has no default: ``synthesize.contamination_ngram`` in params.yaml owns it.
    """

    def __init__(self, reference_docs: Iterable[str], n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        self.n = n
        doc_hashes: list[int] = []
        gram_hashes: list[int] = []
        for doc in reference_docs:
            words = _words(doc)
            if words:
                doc_hashes.append(_hash(" ".join(words)))
                gram_hashes.extend(_hash(g) for g in _ngrams(words, n))
        self._docs = np.unique(np.array(doc_hashes, dtype=np.uint64))  # (D,) sorted
        self._grams = np.unique(np.array(gram_hashes, dtype=np.uint64))  # (G,) sorted

    def __len__(self) -> int:
        """Number of distinct reference n-grams."""
        return len(self._grams)

    @staticmethod
    def _contains(table: np.ndarray, hashes: list[int]) -> np.ndarray:
        """(len(hashes),) bool: which hashes are in the sorted ``table``."""
        if not len(table) or not hashes:
            return np.zeros(len(hashes), dtype=bool)
        query = np.array(hashes, dtype=np.uint64)
        pos = np.minimum(np.searchsorted(table, query), len(table) - 1)
        return table[pos] == query

    def find_leaks(self, docs: Iterable[str], max_report: int = 20) -> ContaminationReport:
        """Count docs that equal a reference doc or share at least one word n-gram with one.

        Docs shorter than ``n`` words have no n-gram and are only checked for exact equality
        (after lowercasing and collapsing whitespace). Up to ``max_report`` examples are kept.
        """
        if max_report < 0:
            raise ValueError(f"max_report must be >= 0, got {max_report!r}")
        report = ContaminationReport(n_docs=0, n=self.n, exact_duplicates=0, ngram_overlaps=0)
        for index, doc in enumerate(docs):
            report.n_docs += 1
            words = _words(doc)
            if not words:
                continue
            normalized = " ".join(words)
            if self._contains(self._docs, [_hash(normalized)])[0]:
                report.exact_duplicates += 1
                self._add_example(report, max_report, LeakExample(index, "exact", normalized))
                continue
            grams = _ngrams(words, self.n)
            hits = np.flatnonzero(self._contains(self._grams, [_hash(g) for g in grams]))
            if hits.size:
                report.ngram_overlaps += 1
                self._add_example(report, max_report, LeakExample(index, "ngram", grams[hits[0]]))
        return report

    @staticmethod
    def _add_example(report: ContaminationReport, max_report: int, example: LeakExample) -> None:
        if len(report.examples) < max_report:
            example.text = example.text[:300]
            report.examples.append(example)
