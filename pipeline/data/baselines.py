"""Classical baselines on the test split: what a transformer must beat to be worth its compute.

    dvc repro evaluate          # reports/evaluate.json -> "baselines"

Three models, each fitted on (or conditioned on) the real training split
(`<validated>/train.parquet`), then scored on every document of the test split
(`<validated>/test.parquet`), in bits per UTF-8 byte, the unit of the model's test score:
- `ngram`: the character n-gram with the hyperparameters of the mimic synthesize fits
  (`synthesize.mimic`: order, smoothing, k, discount); the end of each document is
  predicted too, as the model predicts its end-of-text token;
- `unigram`: character frequencies with add-one smoothing, the floor any LM must clear;
- `xz`: `xz -9` (LZMA preset 9) conditioned on the training split, i.e. the extra bytes
  the compressed stream needs for the test split after the training split; one newline
  separates documents.

Characters of the test split that training never holds get only the smoothing's mass
(`NGramModel.fit(extra_symbols=...)`): the baselines know the test's character set, a
small advantage that can only make the transformer's lead smaller, never larger.

`gain_over_ngram` is the n-gram's bits/byte minus the model's: the register gate's relative
check (`register.gate.min_gain_over_ngram`) reads it. It compares like with like only
when the model scores the whole test shard (`evaluate.test_windows: 0`, the default);
`model_scores_whole_split` records whether it did. The model's windows also cut its
context at every window start, while the n-gram sees each document from its start: the
comparison leans towards the baseline.
"""

from __future__ import annotations

import lzma
import math
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.core.errors import LmforgeError
from pipeline.core.names import split_parquet
from pipeline.data.ngram import NGramModel
from pipeline.data.texts import open_texts

XZ_PRESET = 9  # `xz -9`
UNIGRAM_K = 1.0  # add-one (Laplace) smoothing of the unigram
DOC_SEPARATOR = "\n"  # between documents in the xz stream (its bytes are not counted)


def read_texts(path: Path) -> list[str]:
    """Every document of a validated split; an empty or unreadable file is a clear error."""
    texts = open_texts(path).read(columns=["text"]).column("text").to_pylist()
    if not texts:
        raise LmforgeError(f"{path}: no documents; a baseline needs at least one")
    return texts


def utf8_bytes(docs: list[str]) -> int:
    return sum(len(d.encode("utf-8", "surrogatepass")) for d in docs)


def xz_bits_per_byte(train: list[str], test: list[str], preset: int = XZ_PRESET) -> float:
    """Bits per test byte that LZMA needs for `test` after it has seen `train`.

    8 * (|xz(train + test)| - |xz(train)|) / bytes(test): the container's fixed header and
    footer appear in both streams, so they cancel.
    """
    before = DOC_SEPARATOR.join(train).encode("utf-8", "surrogatepass")
    after = before + (DOC_SEPARATOR + DOC_SEPARATOR.join(test)).encode("utf-8", "surrogatepass")
    extra = len(lzma.compress(after, preset=preset)) - len(lzma.compress(before, preset=preset))
    return 8.0 * extra / utf8_bytes(test)


def unseen_chars(train: list[str], test: list[str]) -> set[str]:
    """The characters of `test` that `train` never holds."""
    return set("".join(test)) - set("".join(train))


def fitted_ngram(
    train: list[str], unseen: set[str], order: int, smoothing: str, k: float, d: float
) -> NGramModel:
    """An n-gram fitted on `train` whose vocabulary also holds the `unseen` test characters."""
    return NGramModel(order, smoothing, k, d).fit(train, extra_symbols=unseen)  # type: ignore[arg-type]


def classical_baselines(
    cfg: Config, model_bits_per_byte: float, model_whole_split: bool
) -> dict[str, Any]:
    """The three baselines' test bits/byte, what they were fitted on, and the model's gain.

    `model_whole_split`: whether `model_bits_per_byte` covers the whole test shard (else
    it is a prefix, `evaluate.test_windows`, and the gain compares different text).
    """
    validated = cfg.path("validated")
    train = read_texts(validated / split_parquet("train"))
    test = read_texts(validated / split_parquet("test"))
    m, unseen = cfg.synthesize.mimic, unseen_chars(train, test)
    ngram = fitted_ngram(train, unseen, m.order, m.smoothing, m.k, m.discount)
    unigram = fitted_ngram(train, unseen, 1, "add_k", UNIGRAM_K, m.discount)
    ngram_bpb = ngram.bits_per_byte(test)
    if not math.isfinite(ngram_bpb):  # cannot happen with every test character in the vocab
        raise LmforgeError("n-gram baseline: a test document has probability 0")
    return {
        "ngram": {
            "bits_per_byte": ngram_bpb,
            "order": m.order,
            "smoothing": m.smoothing,
        },
        "unigram": {"bits_per_byte": unigram.bits_per_byte(test), "smoothing": "add_one"},
        "xz": {"bits_per_byte": xz_bits_per_byte(train, test), "preset": XZ_PRESET},
        "train_docs": len(train),
        "test_docs": len(test),
        "test_bytes": utf8_bytes(test),
        "unseen_test_chars": len(unseen),
        "model_scores_whole_split": model_whole_split,
        "gain_over_ngram": ngram_bpb - model_bits_per_byte,
    }
