"""The `text` column of a corpus parquet file, streamed in record batches.

    ParquetTexts(Path("data/validated/val.parquet")).batches(1000)

The tokenizer stage reads its splits through this (it is the `TextSource` that
`pipeline.text.encode` encodes; the text package itself may not import pyarrow). One record
batch is in memory at a time, so memory is bounded by the batch, not the file. The file is
opened and checked at each use, so a bad file is an error where it is read, naming it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.errors import LmforgeError


def open_texts(path: Path) -> pq.ParquetFile:
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

    Arrow strings are UTF-8, so the byte count comes from the column without re-encoding.
    """
    pf = open_texts(path)
    for batch in pf.iter_batches(batch_size=batch_docs, columns=["text"]):
        col = batch.column(0)
        if col.null_count:
            raise LmforgeError(f"{path}: {col.null_count} null texts in a batch; expected none")
        n_bytes = pc.sum(pc.binary_length(col)).as_py() or 0
        yield col.to_pylist(), int(n_bytes)


@dataclass(frozen=True)
class ParquetTexts:
    """The documents of one parquet file (a `pipeline.text.encode.TextSource`)."""

    path: Path

    def num_docs(self) -> int:
        """The file's row count, from its footer (nothing is read)."""
        return open_texts(self.path).metadata.num_rows

    def batches(self, batch_docs: int) -> Iterator[tuple[list[str], int]]:
        """(texts, their UTF-8 byte count) per record batch of at most `batch_docs` rows."""
        return iter_text_batches(self.path, batch_docs)
