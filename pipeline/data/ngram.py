"""Smoothed character n-gram "mimic" model of a real corpus.

The synthesize stage fits this model on the validated training split and samples it to get
augmentation text whose *exact* next-symbol distribution is known, so the evaluate stage can
compute an exact KL between this source and a trained LM (a neural LM only gives estimates).

Conventions (shared by fitting, scoring and sampling, so they agree exactly):
- Symbols are the Unicode characters seen in training plus ``EOS`` (last index). There is no
  UNK symbol: a document with an unseen character has probability 0 (``log_prob`` = -inf).
  An unseen character in a *context* is fine: contexts containing it are simply unseen, so
  the model backs off to the suffix after it.
- Each document's context is padded with ``order - 1`` BOS ids, so the first characters get
  a proper distribution. BOS is never predicted and is not in ``vocab``.
- ``kneser_ney``: interpolated Kneser-Ney with one absolute discount D per level (standard,
  not "modified" KN). The highest order uses raw counts, lower orders use continuation
  counts N1+(. h w), and the recursion ends in the uniform distribution over the vocab, so
  every symbol has positive probability.
- ``add_k``: add-k on the longest suffix of the context seen in training (backing off to a
  shorter context when it is unseen); every level is normalized, hence so is the result.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np

EOS = "\x00EOS"
"""End-of-document symbol: 4 characters long, so it can never equal a text symbol (1 char)."""

Smoothing = Literal["kneser_ney", "add_k"]
_FORMAT = "lmforge.ngram/1"
_CACHE_FLOATS = 1 << 23  # a distribution cache holds at most ~64 MiB of float64, then clears


class _Level:
    """Counts of one context length m: context tuple -> (start, end, total) into flat arrays.

    ``rows`` (T, m+1) are unique, lexicographically sorted (context..., next) id rows, so the
    rows of one context are contiguous.
    """

    def __init__(self, rows: np.ndarray, vals: np.ndarray) -> None:
        self.next_ids = rows[:, -1].astype(np.intp)  # (T,)
        self.vals = vals  # (T,) float64 counts (raw or continuation)
        ctx = rows[:, :-1]  # (T, m)
        change = np.any(ctx[1:] != ctx[:-1], axis=1)  # (T-1,)
        starts = np.concatenate([[0], np.flatnonzero(change) + 1])  # (C,)
        ends = np.append(starts[1:], len(rows))
        totals = np.add.reduceat(vals, starts)
        keys = map(tuple, ctx[starts].tolist())
        self.index: dict[tuple[int, ...], tuple[int, int, float]] = {
            key: (s, e, t)
            for key, s, e, t in zip(
                keys, starts.tolist(), ends.tolist(), totals.tolist(), strict=True
            )
        }


class NGramModel:
    """Character n-gram model with exact, normalized next-symbol distributions.

    Args:
        order: n of the n-gram (>= 1); the context is the last ``order - 1`` symbols.
        smoothing: ``"kneser_ney"`` or ``"add_k"``.
        k: add-k pseudo-count (> 0), used by ``add_k``.
        discount: absolute discount D in (0, 1), used by ``kneser_ney``.

    No argument has a default: ``synthesize.mimic`` in params.yaml owns them all.
    """

    def __init__(self, order: int, smoothing: Smoothing, k: float, discount: float) -> None:
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"order must be an integer >= 1, got {order!r}")
        if smoothing not in ("kneser_ney", "add_k"):
            raise ValueError(f"smoothing must be 'kneser_ney' or 'add_k', got {smoothing!r}")
        if not (isinstance(k, int | float) and math.isfinite(k) and k > 0):
            raise ValueError(f"k must be a finite number > 0, got {k!r}")
        if not (isinstance(discount, int | float) and 0 < discount < 1):
            raise ValueError(f"discount must be in the open interval (0, 1), got {discount!r}")
        self.order, self.smoothing = order, smoothing
        self.k, self.discount = float(k), float(discount)
        self.vocab: list[str] = []
        self.eos_id = -1
        self._levels: list[_Level] = []
        self._cache: dict[tuple[int, ...], np.ndarray] = {}
        self._cdf_cache: dict[tuple[int, ...], np.ndarray] = {}

    def __repr__(self) -> str:
        return (
            f"NGramModel(order={self.order}, smoothing={self.smoothing!r}, k={self.k}, "
            f"discount={self.discount}, vocab_size={len(self.vocab)})"
        )

    # ----------------------------------------------------------------------------- fitting
    def fit(self, docs: Iterable[str], extra_symbols: Iterable[str] = ()) -> NGramModel:
        """Count the n-grams of ``docs`` (each padded with BOS and ended with EOS).

        ``extra_symbols``: characters to add to the vocabulary although ``docs`` never holds
        them (a baseline scored on text with characters training never saw). They have no
        counts, so only the smoothing gives them probability (the uniform end of the
        Kneser-Ney recursion, or add-k's k).
        """
        docs = list(docs)
        if not docs:
            raise ValueError("fit: docs is empty; need at least one document")
        for i, doc in enumerate(docs):
            if not isinstance(doc, str):
                raise TypeError(f"fit: docs[{i}] is {type(doc).__name__}, expected str")
        text = "".join(docs)
        extra = set(extra_symbols)
        if any(not isinstance(c, str) or len(c) != 1 for c in extra):
            raise ValueError("fit: extra_symbols must be single characters")
        self._set_vocab(sorted(set(text) | extra))
        codes = np.array([ord(c) for c in self.vocab[:-1]], dtype=np.int64)  # (V-1,) sorted
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")  # (N,)
        ids = np.searchsorted(codes, cps).astype(np.int32)  # (N,)
        grams = self._padded_ngrams(ids, np.array([len(d) for d in docs], dtype=np.int64))
        self._grams, counts = np.unique(grams, axis=0, return_counts=True)  # (G, n), (G,)
        self._counts = counts.astype(np.int64)
        self._build()
        return self

    def _set_vocab(self, chars: list[str]) -> None:
        self.vocab = [*chars, EOS]
        self.eos_id = len(chars)
        self._bos, self._unk = len(self.vocab), len(self.vocab) + 1  # never in vocab
        self._index = {c: i for i, c in enumerate(chars)}

    def _padded_ngrams(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """All (N + D, n) n-grams ending at a predicted symbol; each doc gets n-1 BOS + EOS."""
        n, n_docs = self.order, len(lengths)
        seq = np.full(len(ids) + n * n_docs, self._bos, dtype=np.int32)
        doc_of_char = np.repeat(np.arange(n_docs), lengths)  # (N,)
        seq[np.arange(len(ids)) + n * doc_of_char + n - 1] = ids
        seq[np.cumsum(lengths) + n * np.arange(n_docs) + n - 1] = self.eos_id
        windows = np.lib.stride_tricks.sliding_window_view(seq, n)  # (len(seq)-n+1, n)
        return windows[seq[n - 1 :] != self._bos]

    def _build(self) -> None:
        """Derive every level's table from the n-gram counts (raw and continuation)."""
        rows, raw = self._grams, self._counts.astype(np.float64)
        cont = raw
        self._levels = [None] * self.order  # type: ignore[list-item]
        for m in range(self.order - 1, -1, -1):
            top = m == self.order - 1
            use_raw = top or self.smoothing == "add_k"
            self._levels[m] = _Level(rows, raw if use_raw else cont)
            if m:
                rows, inv = np.unique(rows[:, 1:], axis=0, return_inverse=True)
                inv = inv.reshape(-1)
                raw = np.bincount(inv, weights=raw, minlength=len(rows))
                cont = np.bincount(inv, minlength=len(rows)).astype(np.float64)  # N1+(. h w)
        self._uniform = np.full(len(self.vocab), 1.0 / len(self.vocab))
        self._uniform.setflags(write=False)
        self._cache.clear()
        self._cdf_cache.clear()

    # ------------------------------------------------------------------------ distributions
    def _require_fit(self) -> None:
        if not self._levels:
            raise RuntimeError("NGramModel is not fitted: call fit() or load() first")

    def _context_ids(self, context: str) -> tuple[int, ...]:
        h = self.order - 1
        if h == 0:
            return ()
        tail = tuple(self._index.get(c, self._unk) for c in context[-h:])
        return (self._bos,) * (h - len(tail)) + tail

    def _dist(self, ctx: tuple[int, ...]) -> np.ndarray:
        """(V,) distribution given the last ``len(ctx)`` ids; cached, read-only."""
        p = self._cache.get(ctx)
        if p is not None:
            return p
        entry = self._levels[len(ctx)].index.get(ctx)
        lower = self._dist(ctx[1:]) if ctx else self._uniform
        if entry is None:
            p = lower  # unseen context: back off to the shorter one (both methods)
        else:
            s, e, total = entry
            nxt, vals = self._levels[len(ctx)].next_ids[s:e], self._levels[len(ctx)].vals[s:e]
            if self.smoothing == "kneser_ney":
                d = self.discount
                p = lower * (d * (e - s) / total)  # back-off mass D * N1+(h .) / c(h)
                p[nxt] += (vals - d) / total
            else:
                denom = total + self.k * len(self.vocab)
                p = np.full(len(self.vocab), self.k / denom)
                p[nxt] += vals / denom
            p.setflags(write=False)
        if len(self._cache) * len(self.vocab) >= _CACHE_FLOATS:
            self._cache.clear()
        self._cache[ctx] = p
        return p

    def log_prob(self, doc: str) -> float:
        """Exact natural-log probability of ``doc`` followed by EOS (-inf if unseen char)."""
        self._require_fit()
        ids = [self._index.get(c, -1) for c in doc]
        if -1 in ids:
            return -math.inf
        h, ctx, total = self.order - 1, (self._bos,) * (self.order - 1), 0.0
        for i in [*ids, self.eos_id]:
            total += math.log(self._dist(ctx)[i])
            if h:
                ctx = (*ctx[1:], i)
        return total

    def bits_per_byte(self, docs: Iterable[str]) -> float:
        """Sum of -log2 p(doc) (EOS included) over the sum of UTF-8 bytes of ``docs``.

        On samples of this model it estimates the mimic source's entropy rate, the floor a
        perfect LM of this source reaches; on real text it is the model's cross-entropy.
        """
        nats, n_bytes = 0.0, 0
        for doc in docs:
            nats -= self.log_prob(doc)
            n_bytes += len(doc.encode("utf-8", "surrogatepass"))
        if n_bytes == 0:
            raise ValueError("bits_per_byte: docs contain no bytes")
        return nats / math.log(2) / n_bytes

    # ----------------------------------------------------------------------------- sampling
    def _cdf(self, ctx: tuple[int, ...]) -> np.ndarray:
        cdf = self._cdf_cache.get(ctx)
        if cdf is None:
            cdf = np.cumsum(self._dist(ctx))
            cdf /= cdf[-1]  # cdf[-1] == 1.0 exactly, so a u in [0, 1) always lands in range
            if len(self._cdf_cache) * len(self.vocab) >= _CACHE_FLOATS:
                self._cdf_cache.clear()
            self._cdf_cache[ctx] = cdf
        return cdf

    def sample(self, rng: np.random.Generator, max_chars: int) -> str:
        """Sample one document: symbols until EOS, or stop after ``max_chars`` characters.

        A truncated sample is not drawn from the model's distribution (its EOS was never
        sampled), so users of exact KL / entropy should pick ``max_chars`` well above the
        typical document length and record how many samples hit it.
        """
        self._require_fit()
        if max_chars < 0:
            raise ValueError(f"max_chars must be >= 0, got {max_chars!r}")
        h, ctx, out = self.order - 1, (self._bos,) * (self.order - 1), []
        while len(out) < max_chars:
            i = int(np.searchsorted(self._cdf(ctx), rng.random(), side="right"))
            if i == self.eos_id:
                break
            out.append(i)
            if h:
                ctx = (*ctx[1:], i)
        return "".join([self.vocab[i] for i in out])

    def generate(self, num_docs: int, seed: int, max_chars: int) -> list[str]:
        """``num_docs`` samples from one ``np.random.default_rng(seed)``: same seed, same docs."""
        rng = np.random.default_rng(seed)
        return [self.sample(rng, max_chars) for _ in range(num_docs)]

    # ---------------------------------------------------------------------------- save/load
    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly state: hyper-parameters, vocab and the raw n-gram counts."""
        self._require_fit()
        return {
            "format": _FORMAT,
            "order": self.order,
            "smoothing": self.smoothing,
            "k": self.k,
            "discount": self.discount,
            "vocab": self.vocab[:-1],
            "ngrams": self._grams.reshape(-1).tolist(),  # flat (G * order,) ids, BOS = V
            "counts": self._counts.tolist(),  # (G,)
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> NGramModel:
        """Rebuild the exact model (bit-identical distributions) from ``state_dict()``."""
        if state.get("format") != _FORMAT:
            raise ValueError(f"state 'format' must be {_FORMAT!r}, got {state.get('format')!r}")
        for key in ("order", "smoothing", "k", "discount", "vocab", "ngrams", "counts"):
            if key not in state:
                raise ValueError(f"state is missing key {key!r}")
        model = cls(state["order"], state["smoothing"], state["k"], state["discount"])
        vocab = state["vocab"]
        if vocab != sorted(set(vocab)) or any(not isinstance(c, str) or len(c) != 1 for c in vocab):
            raise ValueError("state 'vocab' must be a sorted list of distinct single characters")
        model._set_vocab(list(vocab))
        grams = np.asarray(state["ngrams"], dtype=np.int64)
        counts = np.asarray(state["counts"], dtype=np.int64)
        if grams.size != counts.size * model.order or counts.size == 0 or np.any(counts < 1):
            raise ValueError(
                "state 'ngrams'/'counts' must hold len(counts) * order ids, counts >= 1"
            )
        grams = grams.reshape(-1, model.order).astype(np.int32)
        if grams.min() < 0 or grams.max() > model._bos or np.any(grams[:, -1] >= model._bos):
            raise ValueError("state 'ngrams' holds ids outside the vocab")
        model._grams, model._counts = grams, counts
        model._build()
        return model

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``state_dict()`` as JSON atomically (temp file, then ``os.replace``)."""
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.state_dict(), separators=(",", ":")), encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NGramModel:
        """Load a model written by ``save``; errors name the file."""
        path = Path(path)
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_state_dict(state)
        except (OSError, ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: not a valid n-gram model file ({err})") from err
