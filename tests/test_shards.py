"""Token shards: round trips, the document convention, corruption and meta checks, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.errors import LmforgeError
from pipeline.core.io import file_md5
from pipeline.text.shards import (
    FORMAT_VERSION,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    ShardError,
    ShardWriter,
    check_text_bytes,
    load_split,
    read_header,
    read_meta,
    read_shard,
    text_bytes,
    token_dtype,
    write_meta,
)


def write_shard(path: Path, tokens, dtype=np.uint16) -> Path:
    with ShardWriter(path, dtype) as w:
        w.write(tokens)
    return path


def meta_for(split: str, path: Path, dtype: str, vocab: int = 100) -> dict:
    _, count = read_header(path)
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "vocab_size": vocab,
        "eot_id": 0,
        "special_tokens": ["<|endoftext|>"],
        "splits": {split: {"file": path.name, "tokens": count, "md5": file_md5(path)}},
    }


def patch_header(path: Path, **fields) -> None:
    """Rewrite header fields in place (magic, version, code, count)."""
    raw = path.read_bytes()
    magic, version, code, count = HEADER.unpack(raw[:HEADER_SIZE])
    vals = {"magic": magic, "version": version, "code": code, "count": count, **fields}
    header = HEADER.pack(vals["magic"], vals["version"], vals["code"], vals["count"])
    path.write_bytes(header + raw[HEADER_SIZE:])


@pytest.mark.parametrize(
    ("dtype", "top"), [(np.uint16, 65535), (np.uint32, 2**32 - 1)], ids=["uint16", "uint32"]
)
def test_round_trip(tmp_path, dtype, top):
    path = tmp_path / "s.bin"
    with ShardWriter(path, dtype) as w:
        w.write([0, 1, top])
        w.write(np.array([5, 6], dtype=np.int64))
        w.write(np.array([7], dtype=dtype))
    tokens = read_shard(path)  # (6,) dtype
    assert tokens.dtype == np.dtype(dtype) and isinstance(tokens, np.memmap)
    assert tokens.tolist() == [0, 1, top, 5, 6, 7]
    assert path.stat().st_size == HEADER_SIZE + 6 * np.dtype(dtype).itemsize
    assert path.read_bytes()[:8] == MAGIC
    with pytest.raises(ValueError):  # read-only map: training can never scribble on the data
        tokens[0] = 3


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(1, 65535), max_size=20), max_size=20))
def test_documents_are_followed_by_eot(tmp_path_factory, docs):
    path = tmp_path_factory.mktemp("docs") / "s.bin"
    with ShardWriter(path, np.uint16) as w:
        w.write_docs(docs, eot_id=0)
    tokens = read_shard(path).tolist()
    assert tokens == [t for d in docs for t in [*d, 0]]
    # The convention: every document starts at the shard start or right after an EOT.
    assert tokens.count(0) == len(docs)
    assert not tokens or tokens[-1] == 0


def test_token_dtype_follows_vocab_size():
    assert token_dtype(2048) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(200_000) == np.uint32


def test_out_of_range_ids_are_rejected(tmp_path):
    path = tmp_path / "s.bin"
    for bad in ([70000], np.array([70000]), np.array([-1]), [-1]):
        with pytest.raises(ShardError, match="outside"), ShardWriter(path, np.uint16) as w:
            w.write(bad)
        assert not path.exists()
    with pytest.raises(ShardError, match="expected uint16 or uint32"):
        ShardWriter(path, np.int32)


def test_empty_shard(tmp_path):
    path = write_shard(tmp_path / "s.bin", [])
    assert read_shard(path).shape == (0,)


def test_missing_and_truncated_shards_name_the_file(tmp_path):
    path = tmp_path / "s.bin"
    with pytest.raises(ShardError, match=r"s\.bin: token shard not found"):
        read_shard(path)
    write_shard(path, list(range(100)))
    path.write_bytes(path.read_bytes()[:-1])  # one byte short
    with pytest.raises(ShardError, match=r"s\.bin: truncated or corrupt: 231 bytes.*100 uint16"):
        read_shard(path)
    path.write_bytes(b"LMFSH")  # shorter than a header
    with pytest.raises(ShardError, match=r"s\.bin: truncated: 5 bytes"):
        read_shard(path)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"magic": b"NOTSHARD"}, "not a token shard"),
        ({"version": 2}, "unsupported shard format version 2"),
        ({"code": 3}, "unknown dtype code 3"),
        ({"count": 99}, "header says 99"),
    ],
)
def test_corrupt_header_names_the_file(tmp_path, fields, message):
    path = write_shard(tmp_path / "s.bin", list(range(100)))
    patch_header(path, **fields)
    with pytest.raises(ShardError, match=rf"s\.bin: .*{message}"):
        read_shard(path)


def test_header_that_disagrees_with_meta(tmp_path):
    path = write_shard(tmp_path / "train.bin", list(range(100)))
    meta = meta_for("train", path, "uint16")
    write_meta(tmp_path, meta)
    assert load_split(tmp_path, "train", verify=True).tolist() == list(range(100))
    entry = meta["splits"]["train"]
    with pytest.raises(ShardError, match=r"train\.bin: header says 100 tokens, meta\.json says 7"):
        read_shard(path, {**entry, "tokens": 7})
    with pytest.raises(
        ShardError, match=r"train\.bin: header dtype uint16, meta\.json says uint32"
    ):
        read_shard(path, {**entry, "dtype": "uint32"})
    write_meta(tmp_path, {**meta, "dtype": "uint32"})
    with pytest.raises(ShardError, match=r"meta\.json says uint32"):
        load_split(tmp_path, "train")
    with pytest.raises(ShardError, match="no split 'val'; known splits: train"):
        load_split(tmp_path, "val")


def test_verify_catches_flipped_bytes(tmp_path):
    path = write_shard(tmp_path / "train.bin", list(range(100)))
    write_meta(tmp_path, meta_for("train", path, "uint16"))
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert load_split(tmp_path, "train").shape == (100,)  # header and size still agree
    with pytest.raises(ShardError, match=r"train\.bin: content md5 .* does not match"):
        load_split(tmp_path, "train", verify=True)
    with pytest.raises(ShardError, match="needs the expected md5"):
        read_shard(path, verify=True)


def test_failure_inside_writer_leaves_previous_file(tmp_path):
    path = tmp_path / "s.bin"
    with pytest.raises(RuntimeError), ShardWriter(path, np.uint16) as w:
        w.write([1, 2, 3])
        raise RuntimeError("boom")
    assert not path.exists()
    write_shard(path, [4, 5])
    before = path.read_bytes()
    with pytest.raises(RuntimeError), ShardWriter(path, np.uint16) as w:
        w.write(list(range(1000)))
        raise RuntimeError("boom")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]  # no temporary file left


def test_meta_errors_name_the_file(tmp_path):
    with pytest.raises(ShardError, match=r"meta\.json: not found"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{oops")
    with pytest.raises(ShardError, match=r"meta\.json: not valid JSON"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ShardError, match=r"meta\.json: missing keys \['dtype'"):
        read_meta(tmp_path)
    assert issubclass(ShardError, LmforgeError) and issubclass(ShardError, ValueError)


def test_text_bytes_sums_the_table_and_a_mismatch_names_the_shard(tmp_path):
    table = np.array([0, 1, 2, 3, 4], dtype=np.int64)  # id 0 is the separator
    path = write_shard(tmp_path / "val.bin", [3, 1, 0, 4, 4, 2, 0])
    tokens = read_shard(path)
    assert text_bytes(tokens, table) == 3 + 1 + 4 + 4 + 2  # = 14
    assert text_bytes(tokens, table, chunk=2) == 14  # chunked reads add up the same
    check_text_bytes(path, tokens, table, 14)
    with pytest.raises(ShardError, match=r"val\.bin: its tokens stand for 14 bytes.*says 13"):
        check_text_bytes(path, tokens, table, 13)
    with pytest.raises(ShardError, match="token id 4 is outside the byte table of 4 ids"):
        text_bytes(tokens, table[:4])
