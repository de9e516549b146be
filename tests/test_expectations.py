"""Tests of the Great Expectations gate: regexes, helpers, and run_gate on planted bad data.

Each run_gate call builds one ephemeral GX context; the clean and the planted-bad runs are
module-scoped fixtures shared by most tests, so the file makes five runs in all.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.data.expectations import (
    AGGREGATE_KEYS,
    EMAIL_RE,
    PHONE_RE,
    GateResult,
    GateThresholds,
    ThresholdError,
    add_derived_columns,
    aggregates_frame,
    count_invalid_chars,
    printable_fraction,
    run_gate,
)

T = GateThresholds(
    min_chars=20,
    max_chars=2000,
    min_rows=100,
    max_rows=1_000_000,
    max_duplicate_fraction=0.1,
    min_printable_fraction=0.95,
    pii_mostly=0.99,
    min_rows_per_source=50,
)
N = 400
WORDS = ["the", "cat", "dog", "ran", "over", "hill", "blue", "king", "river", "stone", "dark"]
EMAIL = "jane.doe@example.com"
PHONE = "(555) 123-4567"


def clean_sample() -> pd.DataFrame:
    """N seeded documents from two sources, with 2 e-mails and 2 phones: under pii_mostly."""
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(8, 60))) + ".\nThe end." for _ in range(N)]
    texts[10] = f"Write to {EMAIL} for the map of the river."
    texts[11] = "Or to info@example.org, the old king said."
    texts[20] = f"Call {PHONE} before the dark hill falls."
    texts[21] = "His number was 555-987-6543 in the story."
    return pd.DataFrame(
        {
            "text": texts,
            "source": ["a" if i % 2 else "b" for i in range(N)],
            "doc_id": [f"doc{i}" for i in range(N)],
        }
    )


def clean_aggregates() -> dict[str, float | int]:
    return {
        "row_count": 10_000,
        "null_count": 0,
        "empty_count": 0,
        "duplicate_fraction": 0.01,
        "printable_fraction": 0.999,
        "email_fraction": 0.005,
        "phone_fraction": 0.005,
        "min_source_rows": 4_000,
        "length_out_of_range_fraction": 0.0,
        "unprintable_fraction": 0.0,
    }


def bad_sample() -> pd.DataFrame:
    """Plants one of each row-level defect; 8 e-mails and 8 phones are 2% > 1 - pii_mostly."""
    df = clean_sample()
    df.loc[0, "text"] = None
    df.loc[1, "text"] = ""
    df.loc[2, "text"] = "   \n "
    df.loc[3, "text"] = "x" * 5000
    df.loc[4, "text"] = "ok text " + "\x00\x07\ufffd" * 10  # 30 invalid of 38 chars
    for i in range(30, 38):
        df.loc[i, "text"] = f"Reach me at person{i}@mail.example.net any day."
    for i in range(40, 48):
        df.loc[i, "text"] = f"Dial +1 555 010 {1000 + i} for the castle."
    return df


BAD_AGGREGATES = {
    "row_count": 50,
    "null_count": 3,
    "empty_count": 7,
    "duplicate_fraction": 0.25,
    "printable_fraction": 0.9,
    "email_fraction": 0.02,
    "phone_fraction": 0.03,
    "min_source_rows": 10,
    "length_out_of_range_fraction": 0.004,
    "unprintable_fraction": 0.002,
}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[GateResult, Path]:
    docs = tmp_path_factory.mktemp("clean") / "data_docs"
    return run_gate(clean_sample(), clean_aggregates(), T, docs), docs


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> tuple[GateResult, Path]:
    docs = tmp_path_factory.mktemp("bad") / "data_docs"
    return run_gate(bad_sample(), BAD_AGGREGATES, T, docs), docs


def by_key(result: GateResult) -> dict[tuple[str, str, str], dict]:
    """Records keyed by (suite, column, expectation type); the regex disambiguates PII checks."""
    out = {}
    for rec in result.expectations:
        name = rec["expectation"]
        if rec["kwargs"].get("regex") in (EMAIL_RE, PHONE_RE):
            name += ":email" if rec["kwargs"]["regex"] == EMAIL_RE else ":phone"
        out[(rec["suite"], rec["column"], name)] = rec
    return out


# --- regexes and helpers -------------------------------------------------------------------

EMAILS = ["jane.doe@example.com", "A+tag@sub.example.co.uk", "write x_y%z@mail-1.org now"]
NOT_EMAILS = ["user@localhost", "@handle", "a @ b.com", "cost 3@5 apples", "x@y", "no mail"]
PHONES = [
    "555-123-4567",
    "(555) 123-4567",
    "+1 555 123 4567",
    "call 555.123.4567.",
    "1-800-555-1234",
    "(555)123-4567",
    "+44 20 7946 0958",
    "+49 30 12345678",
]
NOT_PHONES = [
    "In 1999 there were 2000 people.",
    "3 apples and 12 pears",
    "2024-01-15",
    "12,345,678",
    "version 1.2.3",
    "192.168.1.1",
    "id 5551234567",
    "ISBN 978-3-16-148410-0",
    "5555-123-4567",
    "555-123-45678",
    "pages 100-200",
    "+5 degrees",
]


@pytest.mark.parametrize("text", EMAILS)
def test_email_re_positive(text: str) -> None:
    assert re.search(EMAIL_RE, text)


@pytest.mark.parametrize("text", NOT_EMAILS)
def test_email_re_negative(text: str) -> None:
    assert not re.search(EMAIL_RE, text)


@pytest.mark.parametrize("text", PHONES)
def test_phone_re_positive(text: str) -> None:
    match = re.search(PHONE_RE, text)
    assert match and re.search(r"[0-9]{3}", match.group())  # the documented pre-filter holds


@pytest.mark.parametrize("text", NOT_PHONES)
def test_phone_re_negative(text: str) -> None:
    assert not re.search(PHONE_RE, text)


def test_regexes_agree_between_python_and_pandas() -> None:
    """GX runs them through pandas (pyarrow RE2 or re); the streaming pass through `re`."""
    texts = EMAILS + NOT_EMAILS + PHONES + NOT_PHONES + ["café 555-123-4567", "é x@y.fr"]
    series = pd.Series(texts, dtype="str")
    for pattern in (EMAIL_RE, PHONE_RE):
        expected = [bool(re.search(pattern, t)) for t in texts]
        assert series.str.contains(pattern).tolist() == expected


@pytest.mark.parametrize(
    ("text", "invalid"),
    [
        ("plain text\nwith\ttabs\r\n", 0),
        ("café – naïve 😀", 0),
        ("bell\x07 nul\x00 del\x7f", 3),
        ("decode \ufffd error", 1),
        ("zero\u200bwidth é", 1),
        ("", 0),
    ],
)
def test_count_invalid_chars(text: str, invalid: int) -> None:
    assert count_invalid_chars(text) == invalid


def test_printable_fraction() -> None:
    assert printable_fraction("") == 1.0
    assert printable_fraction("ab\x00\x01") == pytest.approx(0.5)


def test_add_derived_columns_keeps_input_and_handles_nulls() -> None:
    df = pd.DataFrame({"text": ["abc", None, "a\x00"], "source": "s", "doc_id": ["1", "2", "3"]})
    out = add_derived_columns(df)
    assert "n_chars" not in df.columns
    assert out["n_chars"].tolist()[::2] == [3, 2] and pd.isna(out["n_chars"][1])
    assert out["printable_fraction"][2] == pytest.approx(0.5)


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="doc_id"):
        add_derived_columns(pd.DataFrame({"text": ["a"], "source": ["s"]}))
    with pytest.raises(ValueError, match="min_source_rows"):
        aggregates_frame({k: 0 for k in AGGREGATE_KEYS if k != "min_source_rows"})
    with pytest.raises(TypeError, match="row_count"):
        aggregates_frame({**clean_aggregates(), "row_count": "many"})
    with pytest.raises(ThresholdError, match=r"validate\.min_chars"):
        GateThresholds(**{**T.__dict__, "min_chars": 5000})
    with pytest.raises(ThresholdError, match=r"validate\.pii_mostly"):
        GateThresholds(**{**T.__dict__, "pii_mostly": 1.5})


def test_import_is_cheap() -> None:
    code = "import sys, pipeline.data.expectations; print('great_expectations' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


# --- run_gate --------------------------------------------------------------------------------


def test_clean_data_passes(clean: tuple[GateResult, Path]) -> None:
    result, _ = clean
    assert result.success, result.failure_message()
    assert len([r for r in result.expectations if r["suite"] == "rows"]) == 6
    assert len([r for r in result.expectations if r["suite"] == "aggregates"]) == 10
    pii = by_key(result)[("rows", "text", "expect_column_values_to_not_match_regex:email")]
    assert pii["unexpected_count"] == 2  # seen, but within mostly=0.99
    assert "passed" in result.failure_message()


def test_bad_data_fails_exactly_the_planted_expectations(bad: tuple[GateResult, Path]) -> None:
    result, _ = bad
    assert not result.success
    failed = {k for k, r in by_key(result).items() if not r["success"]}
    rows = {
        ("rows", "text", "expect_column_values_to_not_be_null"),
        ("rows", "text", "expect_column_values_to_match_regex"),
        ("rows", "n_chars", "expect_column_values_to_be_between"),
        ("rows", "printable_fraction", "expect_column_values_to_be_between"),
        ("rows", "text", "expect_column_values_to_not_match_regex:email"),
        ("rows", "text", "expect_column_values_to_not_match_regex:phone"),
    }
    aggregates = {("aggregates", k) for k in AGGREGATE_KEYS}
    assert failed == rows | {k for k in by_key(result) if k[:2] in aggregates}


@pytest.mark.parametrize(
    ("column", "name", "count", "doc_ids"),
    [
        ("text", "expect_column_values_to_not_be_null", 1, ["doc0"]),
        ("text", "expect_column_values_to_match_regex", 2, ["doc1", "doc2"]),
        ("n_chars", "expect_column_values_to_be_between", 3, ["doc1", "doc2", "doc3"]),
        ("printable_fraction", "expect_column_values_to_be_between", 1, ["doc4"]),
        ("text", "expect_column_values_to_not_match_regex:email", 10, ["doc10", "doc11"]),
        ("text", "expect_column_values_to_not_match_regex:phone", 10, ["doc20", "doc21"]),
    ],
)
def test_row_failures_report_counts_and_doc_ids(
    bad: tuple[GateResult, Path], column: str, name: str, count: int, doc_ids: list[str]
) -> None:
    rec = by_key(bad[0])[("rows", column, name)]
    assert rec["unexpected_count"] == count
    assert rec["unexpected_doc_ids"][: len(doc_ids)] == doc_ids


def test_pii_share_is_over_mostly(bad: tuple[GateResult, Path]) -> None:
    rec = by_key(bad[0])[("rows", "text", "expect_column_values_to_not_match_regex:email")]
    assert rec["kwargs"]["mostly"] == 0.99
    assert rec["unexpected_percent"] == pytest.approx(100 * 10 / (N - 1))  # nulls excluded


def test_aggregate_failures_report_observed_values(bad: tuple[GateResult, Path]) -> None:
    recs = {r["column"]: r for r in bad[0].expectations if r["suite"] == "aggregates"}
    assert {c: r["observed_value"] for c, r in recs.items()} == BAD_AGGREGATES
    assert recs["duplicate_fraction"]["kwargs"]["max_value"] == T.max_duplicate_fraction
    assert recs["email_fraction"]["kwargs"]["max_value"] == pytest.approx(0.01)
    assert recs["min_source_rows"]["kwargs"]["min_value"] == T.min_rows_per_source


def test_failure_message_names_each_failure(bad: tuple[GateResult, Path]) -> None:
    result, _ = bad
    lines = result.failure_message().splitlines()
    # 12: the sample's length, printable and PII checks report but do not decide (their
    # exact shares, the aggregates, do)
    assert lines[0] == f"data gate failed: 12 of {len(result.expectations)} failed"
    for rec, line in zip(result.failures, lines[1:], strict=True):
        assert rec["expectation"] in line and f"] {rec['column']}:" in line
    text = "\n".join(lines)
    assert (
        "duplicate_fraction: expect_column_max_to_be_between: observed 0.25; expected <= 0.1"
        in text
    )
    assert "min_source_rows: expect_column_min_to_be_between: observed 10; expected >= 50" in text
    assert (
        "row_count: expect_column_max_to_be_between: observed 50; expected in [100, 1000000]"
        in text
    )
    assert "observed 1 unexpected rows (0.25%), e.g. doc_id doc0; expected" in text
    assert "n_chars:" not in text and "EMAIL_RE" not in text
    assert (
        "email_fraction: expect_column_max_to_be_between: observed 0.02, e.g. doc_id doc10, "
        "doc11, doc30, doc31, doc32; expected <= 0.01; set by validate.pii_mostly=0.99" in text
    )
    assert (
        "length_out_of_range_fraction: expect_column_max_to_be_between: observed 0.004, "
        "e.g. doc_id doc1, doc2, doc3; expected <= 0; set by validate.length_mostly=1.0, "
        "validate.min_chars=20, validate.max_chars=2000" in text
    )
    assert "unprintable_fraction" in text and "validate.printable_mostly=1.0" in text


def test_sampled_checks_over_tolerance_do_not_decide() -> None:
    """The sample's e-mail share (10 of 399) is over 1 - pii_mostly, but the exact share over
    the corpus (the aggregate) is within it: the gate passes and says what it saw; doc ids
    of any length are shown whole."""
    sample = bad_sample().iloc[5:]  # the e-mails and phones only
    sample.loc[30, "doc_id"] = "shakespeare:../shared/data/tinyshakespeare.txt:123456"
    result = run_gate(sample, clean_aggregates(), T, docs_dir=None)
    email = by_key(result)[("rows", "text", "expect_column_values_to_not_match_regex:email")]
    assert not email["success"] and email["decides"] is False
    assert result.success, result.failure_message()
    assert "within tolerance" in result.failure_message()
    over = run_gate(sample, {**clean_aggregates(), "email_fraction": 0.011}, T, docs_dir=None)
    assert not over.success
    (line,) = over.failure_message().splitlines()[1:]
    assert "shakespeare:../shared/data/tinyshakespeare.txt:123456," in line
    assert line.endswith("set by validate.pii_mostly=0.99")


def test_records_are_strict_json(clean: tuple[GateResult, Path], bad: tuple[GateResult, Path]):
    keys = {"suite", "expectation", "column", "kwargs", "success", "observed_value"}
    keys |= {"unexpected_count", "unexpected_percent", "decides"}
    for rec in clean[0].expectations + bad[0].expectations:
        assert keys <= rec.keys()
        json.dumps(rec, allow_nan=False)


def test_data_docs_written_without_document_text(
    clean: tuple[GateResult, Path], bad: tuple[GateResult, Path]
) -> None:
    for _, docs in (clean, bad):
        index = (docs / "index.html").read_text()
        assert "rows" in index and "aggregates" in index
        assert len(list((docs / "validations").rglob("*.html"))) == 2
    pages = "".join(p.read_text() for p in (bad[1] / "validations").rglob("*.html"))
    assert "10 unexpected values found" in pages  # counts are shown, document text never is
    assert "person30@mail.example.net" not in pages and EMAIL not in pages


@pytest.mark.parametrize(
    ("key", "value"),
    [("duplicate_fraction", 0.5), ("min_source_rows", 3), ("printable_fraction", None)],
)
def test_single_aggregate_fails_alone(
    key: str, value: float | None, capfd: pytest.CaptureFixture[str]
) -> None:
    """Duplicates, a small source and a missing figure each fail only their own check."""
    sample = clean_sample().iloc[100:200]  # no PII rows
    result = run_gate(sample, {**clean_aggregates(), key: value}, T, docs_dir=None)
    assert [(r["suite"], r["column"]) for r in result.failures] == [("aggregates", key)]
    assert result.failures[0]["observed_value"] == value
    assert "Calculating Metrics" not in capfd.readouterr().err  # no tqdm bars
