"""Flat binary token shards: one file per split, memory-mapped by the training loop.

File layout (all little-endian):

    offset  size  field
    0       8     magic b"LMFSHARD"
    8       4     format version (uint32) = 1
    12      4     dtype code (uint32): 2 -> uint16, 4 -> uint32 (the item size in bytes)
    16      8     token count N (uint64)
    24      8     reserved, zero
    32      N*k   the tokens, k = item size

Tokens are uint16 when the vocabulary has at most 65535 entries, else uint32.

Document convention: the end-of-text id (EOT) is written *after* every document, so the
stream is `doc0 EOT doc1 EOT ... docN-1 EOT`. Every document is preceded by the start of the
shard or by an EOT, every shard ends with an EOT, and the number of EOTs equals the number
of documents (document text never yields the EOT id, see `pipeline.text.tokenizer`). A training
window that starts right after an EOT starts at a document boundary.

`meta.json` next to the shards describes them (vocabulary, EOT id, per-split token, byte and
document counts, each file's md5 as DVC records it); `read_shard` checks a shard against it.

Writes are atomic: a shard is streamed to a temporary sibling and renamed into place only
when complete, so a crash never leaves a half-written shard at the final path.

Core module: imports only the standard library and numpy (the GPU machine has no pyarrow).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from pipeline.core.errors import LmforgeError
from pipeline.core.io import atomic_write_json, file_md5, no_room_error
from pipeline.core.names import META_FILE

MAGIC = b"LMFSHARD"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, dtype code, token count, reserved
HEADER_SIZE = HEADER.size  # 32 bytes
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}  # dtype code = item size in bytes
_META_KEYS = ("format_version", "dtype", "vocab_size", "eot_id", "special_tokens", "splits")


class ShardError(LmforgeError, ValueError):
    """A shard or meta.json is missing, corrupt, or disagrees with its description."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest shard dtype that holds every id of a `vocab_size` vocabulary."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size: expected at least 1, got {vocab_size}")
    return _DTYPES[2] if vocab_size <= 65535 else _DTYPES[4]


def _dtype_code(dtype: Any) -> int:
    dt = np.dtype(dtype).newbyteorder("<")
    for code, known in _DTYPES.items():
        if dt == known:
            return code
    raise ShardError(f"shard dtype {np.dtype(dtype)}: expected uint16 or uint32")


class ShardWriter:
    """Stream tokens into a shard at `path`, atomically.

        with ShardWriter(path, np.uint16) as w:
            w.write_docs(encoded_docs, eot_id)

    Tokens go to a temporary file in the same folder; `close()` writes the token count into
    the header, fsyncs and renames it to `path`. If the block raises (or `abort()` is
    called) the temporary file is deleted and an existing file at `path` is left untouched.
    A full disk (or file-size limit) is raised as `OutputWriteError` naming `path`.
    """

    def __init__(self, path: Path | str, dtype: Any) -> None:
        self.path = Path(path)
        self.dtype = _DTYPES[_dtype_code(dtype)]
        self.tokens = 0
        self._aborted = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._file.write(b"\0" * HEADER_SIZE)  # patched with the real header by close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return
        self.abort()
        if exc is not None and (err := no_room_error(self.path, exc)) not in (None, exc):
            raise err from exc

    def _as_tokens(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """`ids` as a 1-D array of the shard dtype; out-of-range ids are a ShardError."""
        info = np.iinfo(self.dtype)
        if isinstance(ids, np.ndarray):
            if ids.dtype == self.dtype:
                return ids.reshape(-1)
            if ids.size and (ids.min() < 0 or ids.max() > info.max):
                raise ShardError(f"{self.path}: token ids outside [0, {info.max}] for {self.dtype}")
            return ids.astype(self.dtype).reshape(-1)
        try:
            return np.asarray(ids, dtype=self.dtype).reshape(-1)  # numpy 2 checks the range
        except OverflowError:
            raise ShardError(
                f"{self.path}: token ids outside [0, {info.max}] for {self.dtype}"
            ) from None

    def write(self, ids: Sequence[int] | np.ndarray) -> int:
        """Append tokens (a list or an integer array); returns how many were written."""
        if self._file.closed:
            raise ShardError(f"{self.path}: write after close")
        arr = np.ascontiguousarray(self._as_tokens(ids))  # (n,) uint16 | uint32
        self._file.write(arr.data)  # the array's own buffer: no copy
        self.tokens += arr.size
        return int(arr.size)

    def write_docs(self, docs: Iterable[Sequence[int]], eot_id: int) -> int:
        """Append documents, each followed by `eot_id` (the convention of this module)."""
        flat: list[int] = []
        for ids in docs:
            flat += ids
            flat.append(eot_id)
        return self.write(flat)

    def close(self) -> Path:
        """Finish the header, fsync and move the shard into place; returns its path."""
        if self._aborted:
            raise ShardError(f"{self.path}: close after abort; nothing was written")
        if self._file.closed:
            return self.path
        try:
            self._file.seek(0)
            self._file.write(HEADER.pack(MAGIC, FORMAT_VERSION, self.dtype.itemsize, self.tokens))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.path)
        except BaseException as e:
            self.abort()
            if (err := no_room_error(self.path, e)) not in (None, e):
                raise err from e
            raise
        _fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Drop everything written; `path` keeps whatever it held before."""
        self._aborted = True
        # Closing flushes the buffer, which fails again on a full disk; the file is closed
        # all the same, and the temporary must go whatever happened.
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


def _fsync_dir(folder: Path) -> None:
    """Persist a rename (POSIX); a no-op where folders cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_header(path: Path) -> tuple[np.dtype, int]:
    """(dtype, token count) of a shard, after checking magic, version, dtype and file size."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: token shard not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise ShardError(
            f"{path}: truncated: {size} bytes, shorter than the {HEADER_SIZE}-byte header"
        )
    magic, version, code, count = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ShardError(f"{path}: not a token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise ShardError(
            f"{path}: unsupported shard format version {version} (expected {FORMAT_VERSION})"
        )
    if code not in _DTYPES:
        raise ShardError(f"{path}: unknown dtype code {code} (expected 2 for uint16, 4 for uint32)")
    dtype = _DTYPES[code]
    want = HEADER_SIZE + count * dtype.itemsize
    if size != want:
        raise ShardError(
            f"{path}: truncated or corrupt: {size} bytes, but the header says {count} "
            f"{dtype.name} tokens ({want} bytes)"
        )
    return dtype, count


def _check_expected(path: Path, dtype: np.dtype, count: int, expected: Mapping[str, Any]) -> None:
    """Compare the header with the split's entry from meta.json."""
    if "tokens" in expected and int(expected["tokens"]) != count:
        raise ShardError(f"{path}: header says {count} tokens, meta.json says {expected['tokens']}")
    if "dtype" in expected and np.dtype(expected["dtype"]) != dtype:
        raise ShardError(f"{path}: header dtype {dtype.name}, meta.json says {expected['dtype']}")


def read_shard(
    path: Path | str, expected: Mapping[str, Any] | None = None, *, verify: bool = False
) -> np.ndarray:
    """The tokens of a shard as a read-only memmap, shape (N,), dtype uint16 or uint32.

    Always checks the header and the file size (cheap). With `expected` (the split's entry
    of meta.json, optionally with `dtype`), also checks the token count and dtype against
    it; with `verify=True`, also the md5 of the whole file (reads every byte: off by default,
    since DVC already hashes the shards). An empty shard gives an empty in-memory array,
    because a zero-length file region cannot be memory-mapped.
    """
    path = Path(path)
    dtype, count = read_header(path)
    if expected is not None:
        _check_expected(path, dtype, count, expected)
    if verify:
        want = (expected or {}).get("md5")
        if not want:
            raise ShardError(f"{path}: verify=True needs the expected md5 (from meta.json)")
        got = file_md5(path)
        if got != want:
            raise ShardError(
                f"{path}: content md5 {got} does not match meta.json ({want}): the shard was "
                "changed or damaged after the tokenizer stage wrote it; restore it with "
                "`dvc checkout` or rebuild it with `dvc repro --force tokenizer`"
            )
    if count == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(count,))


def text_bytes(tokens: np.ndarray, token_bytes: np.ndarray, chunk: int = 1 << 22) -> int:
    """UTF-8 bytes of text a token stream stands for, by a (V,) token->bytes table.

    With `pipeline.text.tokenizer.token_byte_lengths` (separators count 0) this equals a split's
    `bytes` in meta.json. Reads the stream in chunks, so a memory-mapped shard stays mapped.
    """
    table = np.asarray(token_bytes, dtype=np.int64)  # (V,)
    total = 0
    for start in range(0, len(tokens), chunk):
        ids = np.asarray(tokens[start : start + chunk])  # (n,) uint16 | uint32
        if ids.size and int(ids.max()) >= len(table):
            raise ShardError(
                f"token id {int(ids.max())} is outside the byte table of {len(table)} ids"
            )
        total += int(table[ids].sum())
    return total


def check_text_bytes(
    path: Path | str, tokens: np.ndarray, token_bytes: np.ndarray, expected: int
) -> None:
    """Fail unless the shard at `path` stands for `expected` bytes (meta.json's `bytes`).

    A mismatch means the tokenizer and the shards come from different tokenizer runs, and
    every bits-per-byte figure computed from them would be wrong.
    """
    got = text_bytes(tokens, token_bytes)
    if got != expected:
        raise ShardError(
            f"{path}: its tokens stand for {got} bytes by tokenizer.json's byte table, but "
            f"meta.json says {expected}; the tokenizer and shards do not belong together "
            "(run `dvc repro tokenizer`)"
        )


def write_meta(folder: Path | str, meta: Mapping[str, Any]) -> Path:
    """Write `meta.json` atomically (sorted keys, so equal content gives equal bytes)."""
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ShardError(f"{Path(folder) / META_FILE}: missing keys {missing}")
    return atomic_write_json(Path(folder) / META_FILE, dict(meta))


def read_meta(folder: Path | str) -> dict[str, Any]:
    """Read and check `meta.json`; errors name the file."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise ShardError(f"{path}: not found; run `dvc repro tokenizer` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ShardError(f"{path}: expected a JSON object")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ShardError(f"{path}: missing keys {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ShardError(
            f"{path}: format_version {meta['format_version']}, this code reads {FORMAT_VERSION}"
        )
    return meta


def load_split(folder: Path | str, split: str, *, verify: bool = False) -> np.ndarray:
    """The tokens of one split (`train`, `val`, `test`), checked against meta.json."""
    folder = Path(folder)
    meta = read_meta(folder)
    entry = meta["splits"].get(split)
    if entry is None:
        known = ", ".join(sorted(meta["splits"]))
        raise ShardError(f"{folder / META_FILE}: no split {split!r}; known splits: {known}")
    return read_shard(folder / entry["file"], {**entry, "dtype": meta["dtype"]}, verify=verify)
