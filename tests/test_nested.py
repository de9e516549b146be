"""pipeline.core.nested: the one walker of nested reports and params, against hand-written dicts.

Each expected dict below is written out by hand from the rule in the docstring (what the
callers need: MLflow params and metrics, the reproduction's comparison, the sweep's drift
check, the flow's summary), never computed by the code under test.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml

from pipeline.core.nested import dig, flatten

# A report with every kind of leaf the stages write: numbers, a bool, None, a string, an
# infinite KL, a NaN, lists of numbers, a table (list of mappings), empty containers, and
# an int key (YAML reads `1:` as an int).
REPORT = {
    "test": {"ppl": 3, "bits_per_byte": 1.25, "ok": True, "note": None},
    "source_kl": {"kl": math.inf, "gap": math.nan, "name": "storyworld"},
    "losses": [2.0, 1.5],
    "rows": [{"suite": "a", "passed": True}, {"suite": "b", "n": 4}],
    "empty_list": [],
    "empty": {},
    1: {"x": 7},
}


def test_flatten_keeps_lists_as_values_by_default() -> None:
    assert flatten(REPORT) == {
        "test.ppl": 3,
        "test.bits_per_byte": 1.25,
        "test.ok": True,
        "test.note": None,
        "source_kl.kl": math.inf,
        "source_kl.gap": REPORT["source_kl"]["gap"],  # the same NaN object (NaN != NaN)
        "source_kl.name": "storyworld",
        "losses": [2.0, 1.5],
        "rows": [{"suite": "a", "passed": True}, {"suite": "b", "n": 4}],
        "empty_list": [],
        "1.x": 7,
    }


def test_flatten_indexes_tables_only_with_lists_index() -> None:
    out = flatten(REPORT, lists="index")
    assert {k: v for k, v in out.items() if k.startswith(("rows", "losses", "empty"))} == {
        "losses": [2.0, 1.5],  # a list of numbers stays one value
        "rows.0.suite": "a",
        "rows.0.passed": True,
        "rows.1.suite": "b",
        "rows.1.n": 4,
        "empty_list": [],  # an empty list is no table
    }
    # a list mixing mappings and scalars is no table either
    assert flatten({"m": [{"a": 1}, 2]}, lists="index") == {"m": [{"a": 1}, 2]}


def test_flatten_drops_lists() -> None:
    assert flatten(REPORT, lists="drop") == {
        "test.ppl": 3,
        "test.bits_per_byte": 1.25,
        "test.ok": True,
        "test.note": None,
        "source_kl.kl": math.inf,
        "source_kl.gap": REPORT["source_kl"]["gap"],
        "source_kl.name": "storyworld",
        "1.x": 7,
    }


def test_numbers_only_keeps_finite_numbers_as_floats() -> None:
    out = flatten(REPORT, numbers_only=True)
    # bools, None, strings, lists, inf and NaN are left out; the int 3 becomes 3.0
    assert out == {"test.ppl": 3.0, "test.bits_per_byte": 1.25, "1.x": 7.0}
    assert all(type(v) is float for v in out.values())
    # numbers inside a table count only when the table is indexed
    assert flatten({"rows": [{"n": 4}]}, numbers_only=True, lists="index") == {"rows.0.n": 4.0}


def test_flatten_separator_and_prefix() -> None:
    assert flatten({"a": {"b": {"c": 1}}}, sep="/") == {"a/b/c": 1}
    assert flatten({"a": {"b": 1}}, prefix="evaluate.") == {"evaluate.a.b": 1}
    assert flatten({}) == {}
    assert flatten({"only": {}}) == {}  # an empty section leaves no key
    assert flatten({"section": None}) == {"section": None}  # a missing section is one key


def test_flatten_of_a_json_report_read_back() -> None:
    """What reproduce compares: a metrics file through json, under its file stem."""
    text = json.dumps({"gate": {"passed": False, "checks": [{"x": 1}]}, "n": 2})
    assert flatten({"register": json.loads(text)}, lists="drop") == {
        "register.gate.passed": False,
        "register.n": 2,
    }


def test_flatten_of_yaml_with_int_keys() -> None:
    data = yaml.safe_load("sweep:\n  2: {lr: 1.0e-3}\n  flags: [true, false]\n")
    assert flatten(data) == {"sweep.2.lr": 0.001, "sweep.flags": [True, False]}


def test_dig() -> None:
    assert dig(REPORT, "test.bits_per_byte") == 1.25
    assert dig(REPORT, ("test", "ok")) is True
    assert dig(REPORT, ("test", "note"), default="absent") is None  # present, and None
    assert dig(REPORT, (1, "x")) == 7  # a non-string key needs the tuple form
    assert dig(REPORT, "test") == REPORT["test"]  # a mapping is returned as it is
    assert dig(REPORT, ()) is REPORT
    assert dig({"a.b": 1}, ("a.b",)) == 1  # a key holding the separator
    assert dig({"a": {"b": 1}}, "a/b", sep="/") == 1


@pytest.mark.parametrize(
    "path",
    ["missing", "test.missing", "test.ppl.deeper", "losses.0", "test.note.x", "rows.0.suite"],
)
def test_dig_default_when_missing_or_not_a_mapping(path: str) -> None:
    assert dig(REPORT, path) is None
    assert dig(REPORT, path, default=-1) == -1
