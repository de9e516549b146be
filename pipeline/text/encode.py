"""The tokenizer stage's work: train the BPE on the training mix, encode every split to shards.

    python -m pipeline.stages.tokenizer     # the stage (pipeline/stages/tokenizer.py)

`tokenize_into` writes into a folder (the stage hands it a temporary one that replaces
`paths.tokenizer/` atomically):
- `tokenizer.json`: the BPE (`pipeline.text.tokenizer.train_bpe`), trained on the train split;
- `train.bin`, `val.bin`, `test.bin`: the token shards (format in `pipeline/text/shards.py`),
  an end-of-text id after every document;
- `meta.json`: vocabulary size, EOT id, dtype, per-split tokens/bytes/docs/md5, bytes per
  token, and the md5 of the training file the tokenizer was trained on;
- `config.yaml`: the resolved config.

Texts come from a `TextSource` (the stage passes `pipeline.data.texts.ParquetTexts`; this
core module never reads parquet itself, since the GPU machine has no pyarrow). Everything
streams: BPE training keeps only word counts, and encoding holds at most two batches of
`tokenizer.encode_batch_docs` documents, so memory stays flat however large the corpus is.
On CPU a re-run is byte-identical.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tokenizers import Tokenizer

from pipeline.config import Config, save_resolved
from pipeline.core.errors import LmforgeError
from pipeline.core.io import atomic_write_text, file_md5
from pipeline.core.names import PRETRAIN_TRAIN, TOKENIZER_FILE, shard_file, split_parquet
from pipeline.core.progress import Progress
from pipeline.text.shards import FORMAT_VERSION, ShardWriter, token_dtype, write_meta
from pipeline.text.tokenizer import encode_docs, train_bpe

log = logging.getLogger(__name__)
STAGE = "tokenizer"
SPLITS = ("train", "val", "test")


class TextSource(Protocol):
    """The documents of one split, streamed (`pipeline.data.texts.ParquetTexts` is one)."""

    path: Path  # the file the documents come from (labels, the training corpus digest)

    def num_docs(self) -> int:
        """How many documents `batches` yields in all (for progress and ETA)."""
        ...

    def batches(self, batch_docs: int) -> Iterator[tuple[list[str], int]]:
        """(texts, their UTF-8 byte count) for consecutive batches of at most `batch_docs`."""
        ...


@dataclass(frozen=True)
class SplitStats:
    """What encoding one split produced; `tokens` counts the EOT after each document too."""

    tokens: int
    bytes: int  # UTF-8 bytes of the raw text
    docs: int

    @property
    def bytes_per_token(self) -> float | None:
        """Text bytes per text token (separators excluded); None for an empty split."""
        text_tokens = self.tokens - self.docs
        return self.bytes / text_tokens if text_tokens > 0 else None


def input_paths(cfg: Config) -> dict[str, Path]:
    """The parquet file each split is read from; a missing one is a clear error."""
    paths = {
        "train": cfg.path("synthetic") / PRETRAIN_TRAIN,
        "val": cfg.path("validated") / split_parquet("val"),
        "test": cfg.path("validated") / split_parquet("test"),
    }
    makers = {"train": "synthesize", "val": "validate", "test": "validate"}
    for split, path in paths.items():
        if not path.is_file():
            raise LmforgeError(
                f"{path}: {split} input not found; run `dvc repro {makers[split]}` first"
            )
    return paths


def iter_texts(source: TextSource, batch_docs: int, label: str) -> Iterator[str]:
    """Every text of `source`, streamed, with progress lines (for BPE training)."""
    progress = Progress(f"{STAGE}: train BPE, read {label}", source.num_docs(), " docs")
    for texts, _ in source.batches(batch_docs):
        yield from texts
        progress.update(len(texts))
    progress.close()


def encoded_batches(
    tok: Tokenizer, source: TextSource, batch_docs: int
) -> Iterator[tuple[list[list[int]], int]]:
    """(token ids per document, UTF-8 bytes) for each batch of `source`, in order.

    The next batch is encoded in a helper thread (the Rust encoder releases the GIL) while
    the caller turns the current one into shard bytes, so the Python-side work overlaps
    the encoding instead of leaving the encoder's cores idle. At most two batches are in
    memory. Order, and so the output, is the same as a plain loop.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
        pending: tuple[Future[list[list[int]]], int] | None = None
        for texts, size in source.batches(batch_docs):
            nxt = (pool.submit(encode_docs, tok, texts), size)
            if pending is not None:
                yield pending[0].result(), pending[1]
            pending = nxt
        if pending is not None:
            yield pending[0].result(), pending[1]


def encode_split(
    tok: Tokenizer,
    source: TextSource,
    dst: Path,
    eot_id: int,
    batch_docs: int,
    label: str = "",
) -> SplitStats:
    """Encode every text of `source` into shard `dst`, streaming in constant memory.

    Each document is followed by `eot_id` (the convention of `pipeline.text.shards`). The shard
    dtype follows the vocabulary size. The shard appears at `dst` only when complete.
    """
    dtype = token_dtype(tok.get_vocab_size())
    # Documents against the source's count (for the ETA), and bytes for MB/s.
    label = label or source.path.stem
    progress = Progress(f"{STAGE}: encode {label}", source.num_docs(), " docs")
    docs = n_bytes = 0
    with ShardWriter(dst, dtype) as writer:
        for ids, size in encoded_batches(tok, source, batch_docs):
            writer.write_docs(ids, eot_id)
            docs, n_bytes = docs + len(ids), n_bytes + size
            progress.update(len(ids), n_bytes=size)
    progress.close()
    return SplitStats(tokens=writer.tokens, bytes=n_bytes, docs=docs)


def train_tokenizer(cfg: Config, train: TextSource) -> Tokenizer:
    """BPE trained on the streamed training texts, with the configured special tokens."""
    t = cfg.tokenizer
    t0 = time.perf_counter()
    tok = train_bpe(
        iter_texts(train, t.encode_batch_docs, "train"),
        vocab_size=t.vocab_size,
        special_tokens=list(t.special_tokens),
        min_frequency=t.min_frequency,
        length=train.num_docs(),
    )
    log.info(
        "%s: trained BPE, %d tokens in %.1fs", STAGE, tok.get_vocab_size(), time.perf_counter() - t0
    )
    return tok


def tokenize_into(cfg: Config, out: Path, sources: dict[str, TextSource]) -> dict[str, Any]:
    """Train the BPE on `sources["train"]`, encode every split into folder `out`; meta.json."""
    t = cfg.tokenizer
    tok = train_tokenizer(cfg, sources["train"])
    atomic_write_text(out / TOKENIZER_FILE, tok.to_str(pretty=True))
    eot_id = tok.token_to_id(t.special_tokens[0])
    vocab_size = tok.get_vocab_size()
    splits: dict[str, dict[str, Any]] = {}
    bpt: dict[str, float | None] = {}
    for split in SPLITS:
        shard = out / shard_file(split)
        stats = encode_split(tok, sources[split], shard, eot_id, t.encode_batch_docs, split)
        splits[split] = {"file": shard.name, "md5": file_md5(shard), **dataclasses.asdict(stats)}
        bpt[split] = stats.bytes_per_token
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": token_dtype(vocab_size).name,
        "vocab_size": vocab_size,
        "eot_id": eot_id,
        "special_tokens": list(t.special_tokens),  # id = position in this list
        "splits": splits,
        "bytes_per_token": bpt,
        "train_corpus_digest": file_md5(sources["train"].path),
    }
    write_meta(out, meta)
    save_resolved(cfg, out)
    return meta


def build_report(meta: dict[str, Any]) -> dict[str, Any]:
    """reports/tokenizer.json: deterministic figures only, so DVC sees a re-run as unchanged."""
    return {
        "vocab_size": meta["vocab_size"],
        "eot_id": meta["eot_id"],
        "dtype": meta["dtype"],
        "splits": {
            s: {k: e[k] for k in ("tokens", "bytes", "docs")} for s, e in meta["splits"].items()
        },
        "bytes_per_token_val": meta["bytes_per_token"]["val"],
        "train_corpus_digest": meta["train_corpus_digest"],
    }
