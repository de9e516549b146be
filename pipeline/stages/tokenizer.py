"""Stage `tokenizer`: train a byte-level BPE on the training mix and encode the corpus to shards.

    dvc repro tokenizer
    python -m pipeline.stages.tokenizer --set tokenizer.vocab_size=4096

Reads `paths.synthetic/pretrain_train.parquet` (the training split mixed with synthetic
data, from synthesize) and `paths.validated/{val,test}.parquet`, and writes to
`paths.tokenizer/`:
- `tokenizer.json`: the BPE (Hugging Face `tokenizers` format), trained on the train mix;
- `train.bin`, `val.bin`, `test.bin`: the token shards (format in `pipeline/text/shards.py`:
  a 32-byte header, then uint16/uint32 tokens, an `<|endoftext|>` after every document);
- `meta.json`: vocabulary size, EOT id, dtype, per-split tokens/bytes/docs/md5, bytes per
  token, and the md5 of the training parquet the tokenizer was trained on;
- `config.yaml`: the resolved config.

Everything streams: texts are read from parquet in record batches, BPE training keeps only
word counts, and encoding holds one batch of `tokenizer.encode_batch_docs` documents at a
time, so memory stays flat however large the corpus is. The folder is replaced atomically:
a failed run leaves the previous outputs in place. On CPU a re-run is byte-identical.

`reports/tokenizer.json` holds the deterministic figures (no timings) DVC tracks as metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from pipeline.config import Config, save_resolved
from pipeline.core.errors import LmforgeError
from pipeline.core.io import atomic_dir, atomic_write_json, atomic_write_text, file_md5
from pipeline.core.names import (
    META_FILE,
    PRETRAIN_TRAIN,
    TOKENIZER_FILE,
    report_json,
    shard_file,
    split_parquet,
)
from pipeline.core.progress import Progress
from pipeline.ops.stage_runner import stage_main
from pipeline.ops.tracking import start_run
from pipeline.text.shards import FORMAT_VERSION, ShardWriter, token_dtype, write_meta
from pipeline.text.tokenizer import encode_docs, train_bpe

log = logging.getLogger(__name__)
STAGE = "tokenizer"
SPLITS = ("train", "val", "test")


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


def _open_texts(path: Path) -> pq.ParquetFile:
    """The parquet file, checked to have a `text` column of strings."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError on a non-parquet file
        raise LmforgeError(f"{path}: cannot read as parquet ({e})") from None
    if "text" not in pf.schema_arrow.names:
        raise LmforgeError(f"{path}: no 'text' column (columns: {pf.schema_arrow.names})")
    return pf


def iter_text_batches(path: Path, batch_docs: int) -> Iterator[tuple[list[str], int]]:
    """(texts, their UTF-8 byte count) for consecutive record batches of at most `batch_docs`.

    Reads one record batch at a time, so memory is bounded by the batch, not the file.
    Arrow strings are UTF-8, so the byte count comes from the column without re-encoding.
    """
    pf = _open_texts(path)
    for batch in pf.iter_batches(batch_size=batch_docs, columns=["text"]):
        col = batch.column(0)
        if col.null_count:
            raise LmforgeError(f"{path}: {col.null_count} null texts in a batch; expected none")
        n_bytes = pc.sum(pc.binary_length(col)).as_py() or 0
        yield col.to_pylist(), int(n_bytes)


def iter_texts(path: Path, batch_docs: int, label: str) -> Iterator[str]:
    """Every text of a parquet file, streamed, with progress lines (for BPE training)."""
    progress = Progress(f"{STAGE}: train BPE, read {label}", _num_rows(path), " docs")
    for texts, _ in iter_text_batches(path, batch_docs):
        yield from texts
        progress.update(len(texts))
    progress.close()


def _num_rows(path: Path) -> int:
    return _open_texts(path).metadata.num_rows


def encoded_batches(
    tok: Tokenizer, src: Path, batch_docs: int
) -> Iterator[tuple[list[list[int]], int]]:
    """(token ids per document, UTF-8 bytes) for each record batch of `src`, in order.

    The next batch is encoded in a helper thread (the Rust encoder releases the GIL) while
    the caller turns the current one into shard bytes, so the Python-side work overlaps
    the encoding instead of leaving the encoder's cores idle. At most two batches are in
    memory. Order, and so the output, is the same as a plain loop.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
        pending: tuple[Future[list[list[int]]], int] | None = None
        for texts, size in iter_text_batches(src, batch_docs):
            nxt = (pool.submit(encode_docs, tok, texts), size)
            if pending is not None:
                yield pending[0].result(), pending[1]
            pending = nxt
        if pending is not None:
            yield pending[0].result(), pending[1]


def encode_split(
    tok: Tokenizer, src: Path, dst: Path, eot_id: int, batch_docs: int, label: str = ""
) -> SplitStats:
    """Encode every text of parquet `src` into shard `dst`, streaming in constant memory.

    Each document is followed by `eot_id` (the convention of `pipeline.text.shards`). The shard
    dtype follows the vocabulary size. The shard appears at `dst` only when complete.
    """
    dtype = token_dtype(tok.get_vocab_size())
    # Documents against the parquet's row count (for the ETA), and bytes for MB/s.
    progress = Progress(f"{STAGE}: encode {label or src.stem}", _num_rows(src), " docs")
    docs = n_bytes = 0
    with ShardWriter(dst, dtype) as writer:
        for ids, size in encoded_batches(tok, src, batch_docs):
            writer.write_docs(ids, eot_id)
            docs, n_bytes = docs + len(ids), n_bytes + size
            progress.update(len(ids), n_bytes=size)
    progress.close()
    return SplitStats(tokens=writer.tokens, bytes=n_bytes, docs=docs)


def train_tokenizer(cfg: Config, train_path: Path) -> Tokenizer:
    """BPE trained on the streamed training texts, with the configured special tokens."""
    t = cfg.tokenizer
    t0 = time.perf_counter()
    tok = train_bpe(
        iter_texts(train_path, t.encode_batch_docs, "train"),
        vocab_size=t.vocab_size,
        special_tokens=list(t.special_tokens),
        min_frequency=t.min_frequency,
        length=_num_rows(train_path),
    )
    log.info(
        "%s: trained BPE, %d tokens in %.1fs", STAGE, tok.get_vocab_size(), time.perf_counter() - t0
    )
    return tok


def tokenize_into(cfg: Config, out: Path, inputs: dict[str, Path]) -> dict[str, Any]:
    """Do the stage's work into folder `out`; return the contents of meta.json."""
    t = cfg.tokenizer
    tok = train_tokenizer(cfg, inputs["train"])
    atomic_write_text(out / TOKENIZER_FILE, tok.to_str(pretty=True))
    eot_id = tok.token_to_id(t.special_tokens[0])
    vocab_size = tok.get_vocab_size()
    splits: dict[str, dict[str, Any]] = {}
    bpt: dict[str, float | None] = {}
    for split in SPLITS:
        shard = out / shard_file(split)
        stats = encode_split(tok, inputs[split], shard, eot_id, t.encode_batch_docs, split)
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
        "train_corpus_digest": file_md5(inputs["train"]),
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


def run(cfg: Config) -> dict[str, Any]:
    """Train the tokenizer and write the shards; a failure leaves the old outputs intact."""
    inputs = input_paths(cfg)
    out_dir = cfg.path("tokenizer")
    with start_run(cfg, STAGE) as tracker:
        tracker.log_params({"seed": cfg.seed, STAGE: dataclasses.asdict(cfg.tokenizer)})
        with atomic_dir(out_dir) as out:
            meta = tokenize_into(cfg, out, inputs)
        report = build_report(meta)
        report_path = atomic_write_json(cfg.path("reports") / report_json(STAGE), report)
        tracker.set_tags({"lmforge.train_corpus_digest": meta["train_corpus_digest"]})
        tracker.log_metrics(
            {
                "vocab_size": report["vocab_size"],
                "bytes_per_token_val": report["bytes_per_token_val"],
                **{f"tokens_{s}": e["tokens"] for s, e in report["splits"].items()},
            }
        )
        for name in (TOKENIZER_FILE, META_FILE):  # under tokenizer/: the report has
            tracker.log_artifact(out_dir / name, STAGE)  # the same file name as the BPE
        tracker.log_artifact(report_path, "reports")
        for split, path in inputs.items():
            tracker.log_dataset(path, f"text-{split}", split)
            tracker.log_dataset(out_dir / shard_file(split), f"tokens-{split}", f"tokens-{split}")
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
