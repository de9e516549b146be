"""Ingest: every source kind becomes the same (text, source, doc_id) table, with clear errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cfg_for

from pipeline.data.ingest import SourceError, iter_corpus


def read_all(cfg) -> pa.Table:
    return pa.concat_tables(list(iter_corpus(cfg)))


def source(root, **kw) -> str:
    return "validate.sources=" + json.dumps([kw])


def test_txt_modes(project):
    (project / "corpus").mkdir()
    (project / "corpus" / "a.txt").write_text(
        "First para\nstill first.\n\nSecond para.\n\n\nThird.\n"
    )
    (project / "corpus" / "b.txt").write_text("Only one.\n")
    for mode, expected in [
        ("paragraph", ["First para\nstill first.", "Second para.", "\nThird.\n", "Only one.\n"]),
        ("line", ["First para", "still first.", "Second para.", "Third.", "Only one."]),
        ("file", ["First para\nstill first.\n\nSecond para.\n\n\nThird.\n", "Only one.\n"]),
    ]:
        cfg = cfg_for(project, source(project, kind="txt", name="t", path="corpus", txt_mode=mode))
        t = read_all(cfg)
        assert t.column("text").to_pylist() == expected, mode
        assert set(t.column("source").to_pylist()) == {"t"}
        assert t.column("doc_id").to_pylist()[0] == "t:corpus/a.txt:0"


def test_jsonl_parquet_csv(project):
    rows = [{"body": "hello there", "n": 1}, {"body": "general kenobi", "n": 2}]
    (project / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), project / "a.parquet")
    (project / "a.csv").write_text("body,n\nhello there,1\ngeneral kenobi,2\n")
    for kind in ("jsonl", "parquet", "csv"):
        cfg = cfg_for(project, source(project, kind=kind, path=f"a.{kind}", text_field="body"))
        t = read_all(cfg)
        assert t.schema.names == ["text", "source", "doc_id"]
        assert t.column("text").to_pylist() == ["hello there", "general kenobi"], kind
        assert t.column("source").to_pylist() == [kind, kind]


def test_glob_and_max_docs(project):
    for i in range(3):
        (project / f"p{i}.jsonl").write_text(
            json.dumps({"text": f"doc {i} a"}) + "\n" + json.dumps({"text": f"doc {i} b"}) + "\n"
        )
    cfg = cfg_for(project, source(project, kind="jsonl", path="p*.jsonl", max_docs=5))
    assert read_all(cfg).column("text").to_pylist() == [
        "doc 0 a",
        "doc 0 b",
        "doc 1 a",
        "doc 1 b",
        "doc 2 a",
    ]


def test_storyworld_source_is_seeded(project):
    a = read_all(cfg_for(project, source(project, kind="storyworld", num_docs=50)))
    b = read_all(cfg_for(project, source(project, kind="storyworld", num_docs=50)))
    c = read_all(cfg_for(project, source(project, kind="storyworld", num_docs=50), "seed=99"))
    assert a.num_rows == 50 and a.equals(b)
    assert a.column("text").to_pylist() != c.column("text").to_pylist()


def test_missing_file_names_the_key_and_path(project):
    cfg = cfg_for(project, source(project, kind="parquet", path="nowhere/x.parquet"))
    with pytest.raises(
        SourceError, match=r"validate\.sources\[0\]\.path: no parquet files at .*nowhere"
    ):
        read_all(cfg)


def test_missing_text_field_names_the_columns(project):
    (project / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    cfg = cfg_for(project, source(project, kind="jsonl", path="a.jsonl"))
    with pytest.raises(SourceError, match=r"text_field: column 'text' not found.*\['body'\]"):
        read_all(cfg)


def test_corrupt_file_names_the_file(project):
    (project / "bad.parquet").write_bytes(b"this is not parquet")
    cfg = cfg_for(project, source(project, kind="parquet", path="bad.parquet"))
    with pytest.raises(SourceError, match=r"cannot read parquet file .*bad\.parquet"):
        read_all(cfg)


def test_hub_dataset_offline_gives_a_clear_error(project, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    cfg = cfg_for(project, source(project, kind="hub", dataset="roneneldan/TinyStories"))
    with pytest.raises(
        SourceError, match=r"cannot reach Hugging Face Hub dataset 'roneneldan/TinyStories'"
    ):
        read_all(cfg)
