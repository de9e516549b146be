"""One streaming pass over the corpus: exact aggregates, a seeded sample, cleaning and splits.

Great Expectations is slow on very large frames, so the validate stage never hands it the
whole corpus. Instead this pass, in constant memory per chunk, computes:

- exact aggregates over every row (counts of nulls, empties, duplicates, PII matches,
  printable characters, lengths out of range, rows per source), checked by GX as a table;
- a seeded reservoir sample of raw rows, checked by GX row by row;
- the cleaned rows (NFC, stripped, deduplicated, filtered), routed to train/val/test by a
  hash of the normalized text, so a document's split never depends on the order of the
  corpus, and identical documents (removed anyway) could never straddle two splits.
"""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa

from pipeline.config import ValidateConfig
from pipeline.data.expectations import EMAIL_RE, PHONE_RE, count_invalid_chars

SPLITS = ("train", "val", "test")
_EMAIL = re.compile(EMAIL_RE)
_PHONE = re.compile(PHONE_RE)
_THREE_DIGITS = re.compile(r"\d{3}")  # cheap pre-check: no phone number without it


def normalize(text: str, strip: bool) -> str:
    """NFC form (so visually equal strings compare equal), optionally stripped."""
    if not text.isascii() and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text.strip() if strip else text


def has_email(text: str) -> bool:
    return "@" in text and _EMAIL.search(text) is not None


def has_phone(text: str) -> bool:
    return _THREE_DIGITS.search(text) is not None and _PHONE.search(text) is not None


def text_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def split_of(digest: bytes, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from the document's hash: uniform in [0, 1) by its first 8 bytes."""
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


@dataclass
class CorpusScan:
    """Accumulates aggregates, a reservoir sample and cleaned split rows over chunks."""

    cfg: ValidateConfig
    seed: int
    rows: int = 0
    nulls: int = 0
    empties: int = 0
    duplicates: int = 0
    emails: int = 0
    phones: int = 0
    out_of_range: int = 0
    unprintable: int = 0
    chars: int = 0
    printable: int = 0
    per_source: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)
    kept_bytes: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    _seen: set = field(default_factory=set)
    _sample: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def add(self, table: pa.Table) -> dict[str, pa.Table]:
        """Scan one chunk; return its cleaned rows grouped by split."""
        out: dict[str, list[tuple[str, str, str]]] = {s: [] for s in SPLITS}
        cols = table.to_pydict()
        for text, source, doc_id in zip(cols["text"], cols["source"], cols["doc_id"], strict=True):
            clean = None if text is None else normalize(text, self.cfg.strip_whitespace)
            # The GX sample sees normalized text, so its lengths agree with the aggregates.
            self._reservoir((clean, source, doc_id))
            digest = None if clean is None else text_digest(clean)
            reason = self._scan_row(clean, digest, source)
            if reason is not None:
                self.dropped[reason] += 1
                continue
            split = split_of(digest, self.cfg.val_fraction, self.cfg.test_fraction)
            out[split].append((clean, source, doc_id))
            self.kept[split] += 1
            self.kept_bytes[split] += len(clean.encode("utf-8"))
        return {s: _to_table(r) for s, r in out.items() if r}

    def _scan_row(self, clean: str | None, digest: bytes | None, source: str) -> str | None:
        """Update aggregates for one normalized row; return why it is dropped, or None."""
        self.rows += 1
        self.per_source[source] += 1
        if clean is None:
            self.nulls += 1
            return "null"
        if not clean.strip():
            self.empties += 1
            return "empty"
        n = len(clean)
        ok = n - count_invalid_chars(clean)
        self.chars += n
        self.printable += ok
        email, phone = has_email(clean), has_phone(clean)
        self.emails += email
        self.phones += phone
        if digest in self._seen:
            self.duplicates += 1
            return "duplicate"
        self._seen.add(digest)
        # Each quality check is counted on its own (a short unprintable document counts for
        # both), so each exact share is what its `validate.*_mostly` tolerance bounds.
        unprintable = ok < self.cfg.min_printable_fraction * n
        self.unprintable += unprintable
        if not self.cfg.min_chars <= n <= self.cfg.max_chars:
            self.out_of_range += 1
            return "length"
        if unprintable:
            return "unprintable"
        if self.cfg.drop_pii and (email or phone):
            return "pii"
        return None

    def _reservoir(self, row: tuple) -> None:
        """Algorithm R: a uniform sample of `gx_sample_rows` rows, seeded."""
        k = self.cfg.gx_sample_rows
        if len(self._sample) < k:
            self._sample.append(row)
        else:
            j = self._rng.randrange(self.rows + 1)  # rows counted before this one
            if j < k:
                self._sample[j] = row

    def aggregates(self) -> dict[str, float | int]:
        """Exact corpus-level figures, in the form the GX aggregate suite expects."""
        n = max(self.rows, 1)
        return {
            "row_count": self.rows,
            "null_count": self.nulls,
            "empty_count": self.empties,
            "duplicate_fraction": self.duplicates / n,
            "printable_fraction": self.printable / max(self.chars, 1),
            "email_fraction": self.emails / n,
            "phone_fraction": self.phones / n,
            "min_source_rows": min(self.per_source.values(), default=0),
            "length_out_of_range_fraction": self.out_of_range / n,
            "unprintable_fraction": self.unprintable / n,
        }

    def sample_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self._sample, columns=["text", "source", "doc_id"])


def _to_table(rows: list[tuple[str, str, str]]) -> pa.Table:
    text, source, doc_id = zip(*rows, strict=True)
    return pa.table({"text": list(text), "source": list(source), "doc_id": list(doc_id)})
