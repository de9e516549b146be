"""Stage validate: the gate, cleaning, disjoint splits, and intact outputs on failure."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import cfg_for

from pipeline.core.errors import GateFailed
from pipeline.core.io import tree_md5
from pipeline.data.clean import split_of, text_digest
from pipeline.data.expectations import GateThresholds
from pipeline.stages import validate

CLEAN_DOCS = [f"Document number {i} talks about topic {i % 7} at some length." for i in range(300)]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def jsonl_cfg(project, *extra):
    src = "validate.sources=[{kind: jsonl, name: local, path: corpus.jsonl}]"
    return cfg_for(project, src, "validate.min_rows=10", *extra)


def splits(cfg) -> dict[str, list[str]]:
    out = {}
    for s in ("train", "val", "test"):
        out[s] = pq.read_table(cfg.path("validated") / f"{s}.parquet").column("text").to_pylist()
    return out


def test_clean_corpus_passes_and_writes_outputs(project):
    write_jsonl(
        project / "corpus.jsonl", [*CLEAN_DOCS, "  Café with trailing space  ", CLEAN_DOCS[0]]
    )
    cfg = jsonl_cfg(project)
    summary = validate.run(cfg)
    parts = splits(cfg)
    all_docs = parts["train"] + parts["val"] + parts["test"]
    assert len(all_docs) == len(set(all_docs)) == 301  # the duplicate is removed
    assert "Café with trailing space" in all_docs  # stripped and NFC
    assert summary["dropped"] == {"duplicate": 1}
    report = json.loads((cfg.path("reports") / "validate.json").read_text())
    assert report["gate"]["success"] is True
    assert report["aggregates"]["row_count"] == 302
    assert all("observed_value" in e for e in report["gate"]["expectations"])
    assert (cfg.path("data_docs") / "index.html").is_file()
    assert (cfg.path("validated") / "config.yaml").is_file()


def test_splits_are_disjoint_and_follow_the_document_hash(project):
    write_jsonl(project / "corpus.jsonl", CLEAN_DOCS)
    cfg = jsonl_cfg(project, "validate.val_fraction=0.2", "validate.test_fraction=0.2")
    validate.run(cfg)
    parts = splits(cfg)
    assert not set(parts["train"]) & set(parts["val"])
    assert not set(parts["train"]) & set(parts["test"])
    assert not set(parts["val"]) & set(parts["test"])
    for s, docs in parts.items():
        assert all(split_of(text_digest(d), 0.2, 0.2) == s for d in docs)
    assert 30 < len(parts["val"]) < 90 and 30 < len(parts["test"]) < 90


def test_rerun_is_bit_identical_and_order_independent(project):
    write_jsonl(project / "corpus.jsonl", CLEAN_DOCS)
    cfg = jsonl_cfg(project)

    def digests():
        report = (cfg.path("reports") / "validate.json").read_bytes()
        return tree_md5(cfg.path("validated")), tree_md5(cfg.path("data_docs")), report

    validate.run(cfg)
    first, first_splits = digests(), splits(cfg)
    validate.run(cfg)
    assert digests() == first  # Data Docs included: GX's render times and ids are pinned
    write_jsonl(project / "corpus.jsonl", CLEAN_DOCS[::-1])
    validate.run(cfg)
    assert {s: set(v) for s, v in splits(cfg).items()} == {
        s: set(v) for s, v in first_splits.items()
    }


@pytest.mark.parametrize(
    ("planted", "failed_expectation"),
    [
        ([None] * 5, "null_count"),
        ([""] * 5, "empty_count"),
        ([CLEAN_DOCS[0]] * 80, "duplicate_fraction"),
        ([f"mail me at person{i}@example.com now" for i in range(20)], "email_fraction"),
        ([f"call 555-123-{4000 + i} today please" for i in range(20)], "phone_fraction"),
    ],
)
def test_gate_fails_on_planted_bad_data_and_keeps_previous_outputs(
    project, planted, failed_expectation
):
    write_jsonl(project / "corpus.jsonl", CLEAN_DOCS)
    cfg = jsonl_cfg(project)
    validate.run(cfg)
    before = tree_md5(cfg.path("validated")), (cfg.path("reports") / "validate.json").read_bytes()

    (project / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in CLEAN_DOCS + planted)
    )
    with pytest.raises(GateFailed) as e:
        validate.run(cfg)
    assert failed_expectation in str(e.value)
    assert "unchanged" in str(e.value)
    after = tree_md5(cfg.path("validated")), (cfg.path("reports") / "validate.json").read_bytes()
    assert after == before
    failed = json.loads((cfg.path("reports") / "validate.failed.json").read_text())
    bad = [x for x in failed["gate"]["expectations"] if not x["success"]]
    assert any(failed_expectation in json.dumps(x) for x in bad)


def test_stage_main_exits_nonzero_with_a_readable_message(project, capsys, monkeypatch):
    write_jsonl(project / "corpus.jsonl", CLEAN_DOCS + [None] * 3)
    monkeypatch.chdir(project)
    code = validate.main(
        [
            "--set",
            "validate.sources=[{kind: jsonl, path: corpus.jsonl}]",
            "--set",
            "validate.min_rows=10",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "stage validate failed" in err and "null_count" in err
    assert validate.main(["--set", "validate.nope=1"]) == 2


def test_gate_thresholds_are_the_validate_keys_of_the_same_names(project):
    """The library builds the thresholds (synthesize uses them too, without the stage)."""
    cfg = cfg_for(project, "validate.min_chars=7", "validate.pii_mostly=0.5")
    t = GateThresholds.from_params(cfg.validate)
    assert (t.min_chars, t.pii_mostly) == (7, 0.5)
    v = cfg.validate
    assert (t.max_rows, t.min_rows_per_source) == (v.max_rows, v.min_rows_per_source)


def real_text_corpus() -> tuple[list[str], set[str], set[str]]:
    """1000 documents: 2% end in an e-mail signature, 0.5% carry control characters (BEL,
    backspace), as ordinary real text does; (texts, e-mail docs, control-char docs)."""
    texts = [
        f"Note {i}: the river ran past stone {i % 13} and the king {i % 5}." for i in range(1000)
    ]
    emails = {f"{texts[i]}\n-- \nwrite to person{i}@example.com" for i in range(0, 1000, 50)}
    controls = {f"{texts[i]} \x07\x08\x07 ding" for i in range(7, 1000, 200)}
    body = [t for i, t in enumerate(texts) if i % 50 and (i - 7) % 200]
    return body + sorted(emails) + sorted(controls), emails, controls


def test_real_text_within_the_tolerances_passes_and_reports_the_drops(project):
    texts, emails, controls = real_text_corpus()
    assert (len(emails), len(controls), len(texts)) == (20, 5, 1000)
    write_jsonl(project / "corpus.jsonl", texts)
    cfg = jsonl_cfg(project)
    summary = validate.run(cfg)
    assert summary["dropped"] == {"pii": 20, "unprintable": 5}
    kept = {t for docs in splits(cfg).values() for t in docs}
    assert len(kept) == 975 and not kept & (emails | controls)
    report = json.loads((cfg.path("reports") / "validate.json").read_text())
    assert report["dropped"] == {"pii": 20, "unprintable": 5}
    assert report["aggregates"]["email_fraction"] == 0.02
    assert report["aggregates"]["unprintable_fraction"] == 0.005
    assert report["gate"]["success"] is True


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (
            "validate.pii_mostly=0.99",
            "email_fraction: expect_column_max_to_be_between: observed 0.02, e.g. doc_id local:",
        ),
        ("validate.printable_mostly=0.999", "unprintable_fraction:"),
    ],
)
def test_real_text_over_a_tolerance_fails_naming_the_param(project, override, named):
    texts, _, _ = real_text_corpus()
    write_jsonl(project / "corpus.jsonl", texts)
    with pytest.raises(GateFailed) as e:
        validate.run(jsonl_cfg(project, override))
    message = str(e.value)
    assert named in message
    (line,) = [x for x in message.splitlines() if named.split(":")[0] + ":" in x]
    assert f"set by {override}" in line
    assert "data gate failed: 1 of" in message
