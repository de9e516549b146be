"""Byte-level BPE tokenizer: training, loading, encoding and decoding.

A thin layer over Hugging Face `tokenizers` (the Rust engine does the work; nothing here
re-implements BPE). The choices that matter for the rest of the pipeline:

- **Byte level.** Text is mapped to its UTF-8 bytes (GPT-2's byte-to-unicode table) before
  BPE, and all 256 byte symbols are in the initial alphabet, so *any* Unicode string
  encodes, with no unknown token, and `decode(encode(s)) == s` exactly.
- **Special tokens first.** The special tokens of `tokenizer.special_tokens` get ids
  0, 1, ... in order; the first is the document separator (by default `<|endoftext|>`;
  meta.json records it as `special_tokens[0]` / `eot_id`, read with `end_of_text`).
- **Document text is data.** `encode_docs` encodes a literal `<|endoftext|>` inside a
  document as ordinary bytes, never as the separator id, so a corpus cannot forge document
  boundaries and the number of separators in a shard always equals its number of documents.
- **Deterministic.** The same texts and settings give a byte-identical `tokenizer.json`.
- **Exact bytes per token.** `token_byte_lengths` gives the number of UTF-8 bytes each id
  stands for (special tokens: 0), so bits per byte divides by the exact byte count of the
  scored tokens rather than an average.

Core module: imports only the standard library, numpy and `tokenizers` (the GPU machine
has nothing else), plus `pipeline.core.errors`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.core.errors import LmforgeError

if TYPE_CHECKING:
    import torch

# The default first entry of `tokenizer.special_tokens` (params.yaml), for tests and tools that
# train a throwaway tokenizer. Nothing that loads a trained tokenizer uses it: the end-of-text
# token of a trained one is `end_of_text`'s answer, from its meta.json.
EOT = "<|endoftext|>"
NUM_BYTES = 256  # the byte-level alphabet: every vocabulary holds at least these symbols


class TokenizerError(LmforgeError, ValueError):
    """A tokenizer file or tokenizer setting is unusable; the message names the file or key."""


def _check_specials(special_tokens: Sequence[str], vocab_size: int) -> None:
    if not special_tokens:
        raise TokenizerError("special_tokens: expected at least the end-of-text token")
    if len(set(special_tokens)) != len(special_tokens) or not all(special_tokens):
        raise TokenizerError(
            f"special_tokens: expected distinct non-empty strings, got {special_tokens!r}"
        )
    if vocab_size < NUM_BYTES + len(special_tokens):
        raise TokenizerError(
            f"vocab_size: {vocab_size} is below the {NUM_BYTES} byte symbols plus "
            f"{len(special_tokens)} special token(s)"
        )


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE pipeline: ByteLevel pre-tokenizer and decoder, no normalizer.

    No normalizer, because normalizing (NFC, lower-casing...) would break the exact round
    trip; the validate stage already NFC-normalizes the corpus.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: list[str],
    min_frequency: int,
    *,
    length: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE on `texts` (any iterable: it is streamed, never held whole).

    `length` is the number of texts if known; `tokenizers` only uses it for its progress
    estimate. The special tokens get ids 0..len-1 in the given order (checked). The result
    can hold fewer than `vocab_size` entries when the corpus runs out of frequent pairs;
    use `tok.get_vocab_size()` for the real size.
    """
    _check_specials(special_tokens, vocab_size)
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # bars redraw in place; stage logs are read as files
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    for want, token in enumerate(special_tokens):
        got = tok.token_to_id(token)
        if got != want:  # the shard format and meta.json rely on this order
            raise TokenizerError(f"special token {token!r} got id {got}, expected {want}")
    return tok


def load_tokenizer(path: Path | str) -> Tokenizer:
    """Load a `tokenizer.json`; errors name the file and say what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(data, dict) or "model" not in data:
        raise TokenizerError(f"{path}: not a tokenizer (expected a JSON object with a 'model')")
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises a bare Exception with serde's message
        raise TokenizerError(f"{path}: not a valid tokenizer: {e}") from None


def _as_data(tok: Tokenizer) -> Tokenizer:
    """Make special-token strings inside texts encode as ordinary bytes (see module doc)."""
    if not tok.encode_special_tokens:
        tok.encode_special_tokens = True
    return tok


def encode_docs(tok: Tokenizer, docs: list[str]) -> list[list[int]]:
    """Token ids of each document, in parallel (Rust threads), with no special tokens added.

    Sets `tok.encode_special_tokens = True`, so a literal `<|endoftext|>` in a document is
    encoded as text; separators are added by the caller (see `pipeline.text.shards`).
    """
    _as_data(tok)
    # encode_batch_fast skips the character offsets, which nothing here needs.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [e.ids for e in encode(docs, add_special_tokens=False)]


def decode(tok: Tokenizer, ids: Sequence[int] | Any) -> str:
    """Text of `ids` (a list or a 1-D integer array); special tokens are kept as their text."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return tok.decode(list(ids), skip_special_tokens=False)


def bytes_per_token(tok: Tokenizer, texts: Iterable[str], batch_docs: int = 1000) -> float:
    """UTF-8 bytes per token over `texts`, separators excluded: the tokenizer's compression.

    A descriptive figure only: bits per byte divides by the exact bytes of the scored
    tokens (`token_byte_lengths`), since an average over one text set is wrong for another.
    """
    n_bytes = n_tokens = 0
    for batch in _batched(texts, batch_docs):
        n_bytes += sum(len(t.encode("utf-8")) for t in batch)
        n_tokens += sum(len(ids) for ids in encode_docs(tok, batch))
    if n_tokens == 0:
        raise ValueError("bytes_per_token: no tokens (empty texts)")
    return n_bytes / n_tokens


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """(V,) int64: how many bytes of raw UTF-8 text each token id stands for.

    Byte-level BPE spells every ordinary token in GPT-2's byte-to-unicode alphabet, one
    character per byte, so a token's byte length is the length of its vocabulary string.
    That also holds for a token that is part of a multi-byte character (one of the four
    bytes of an emoji counts 1), where decoding the token alone would give U+FFFD instead.

    Special tokens (the document separator `<|endoftext|>`, ...) count 0 bytes: they are
    not text. The tokenizer stage uses the same convention for each split's `bytes` in
    meta.json (the UTF-8 bytes of the documents, separators excluded), so summing this
    table over a shard gives exactly that figure. A non-special added token counts the
    UTF-8 bytes of its content. This is the table of nanochat's `evaluate_bpb`.
    """
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    added = tok.get_added_tokens_decoder()  # {id: AddedToken}
    lengths = np.zeros(tok.get_vocab_size(), dtype=np.int64)  # (V,)
    for i in range(len(lengths)):
        if i in added:
            token = added[i]
            lengths[i] = 0 if token.special else len(token.content.encode("utf-8"))
            continue
        piece = tok.id_to_token(i)
        if piece is None or not set(piece) <= alphabet:
            raise TokenizerError(
                f"token id {i} ({piece!r}) is not spelled in the byte-level alphabet; "
                "expected a byte-level BPE made by `train_bpe`"
            )
        lengths[i] = len(piece)
    return lengths


def target_bytes(targets: torch.Tensor, token_bytes: torch.Tensor, ignore_index: int = -1):
    """Exact UTF-8 bytes the scored target tokens stand for: ``sum token_bytes[y]``.

    Args:
        targets: integer target ids of any shape; entries equal to ``ignore_index``
            (padding) are not scored and count no bytes.
        token_bytes: (V,) bytes per token id (`token_byte_lengths`), on the same device as
            ``targets``.

    Returns a 0-dim int64 tensor on that device (no host sync, so it can be summed across
    batches and processes before one ``.item()``). Ids are not range-checked here (that
    would sync): callers check the shard against the table once (``shards.check_text_bytes``).
    Tensor methods only, so this module does not import torch (the tokenizer stage never
    needs it).
    """
    y = targets.reshape(-1)  # (N,)
    keep = y != ignore_index  # (N,)
    # Padding is mapped to id 0 and masked out, so no gather reads out of range.
    ids = y.masked_fill(~keep, 0)
    return (token_bytes.long()[ids] * keep).sum()


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    """Lists of up to `n` consecutive items (itertools.batched is Python 3.12+)."""
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def special_token_ids(tok: Tokenizer, special_tokens: Sequence[str]) -> dict[str, int]:
    """{token: id} for the given special tokens; an unknown one is a TokenizerError."""
    ids = {t: tok.token_to_id(t) for t in special_tokens}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise TokenizerError(f"special tokens {missing!r} are not in the tokenizer's vocabulary")
    return ids  # type: ignore[return-value]


def end_of_text(tok: Tokenizer, meta: Mapping[str, Any] | None, where: str) -> tuple[str, int]:
    """(token, id) of the end-of-text token (the document separator) of a trained tokenizer.

    The one source is the tokenizer's meta.json, which the tokenizer stage writes from
    `tokenizer.special_tokens`: `special_tokens[0]` and `eot_id`, checked against `tok`. With
    no meta (`meta` None: a model package registered before packages shipped meta.json), it is
    the special token at id 0, where `train_bpe` puts the first of `tokenizer.special_tokens`.
    `where` names the meta.json (or tokenizer) file in errors.
    """
    if meta is None:
        first = tok.get_added_tokens_decoder().get(0)
        if first is None or not first.special:
            raise TokenizerError(
                f"{where}: no special token at id 0; expected the end-of-text token (the first "
                "of tokenizer.special_tokens) there, as `train_bpe` places it"
            )
        return first.content, 0
    specials, eot_id = meta.get("special_tokens"), meta.get("eot_id")
    if not isinstance(specials, list) or not specials or not isinstance(specials[0], str):
        raise TokenizerError(
            f"{where}: special_tokens: expected a non-empty list of strings (the first is the "
            f"end-of-text token, from tokenizer.special_tokens), got {specials!r}"
        )
    got = tok.token_to_id(specials[0])
    if got is None or got != eot_id:
        raise TokenizerError(
            f"{where}: eot_id {eot_id!r} is not the tokenizer's id of special_tokens[0] "
            f"{specials[0]!r} (got {got!r}); is this meta.json from the same tokenizer?"
        )
    return specials[0], got
