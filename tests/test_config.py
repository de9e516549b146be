"""Config: the strict loader, presets, overrides and the params.yaml writer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import REPO, make_project

from pipeline.config import ConfigError, load_config, preset_overrides
from pipeline.config.params_file import apply_to_params


def test_repo_params_load_with_every_preset():
    for preset in ("default", "ci", "shakespeare"):
        cfg = load_config(REPO, preset=preset)
        assert cfg.root == REPO
        assert cfg.validate.sources


def test_unknown_key_is_named_with_a_suggestion(project):
    with pytest.raises(ConfigError) as e:
        load_config(project, overrides=["validate.max_char=10"])
    msg = str(e.value)
    assert "validate.max_char: unknown key" in msg
    assert "did you mean 'validate.max_chars'" in msg


def test_wrong_type_names_key_and_expected_type(project):
    with pytest.raises(ConfigError, match=r"validate\.chunk_rows: expected an integer, got 'many'"):
        load_config(project, overrides=["validate.chunk_rows=many"])
    with pytest.raises(ConfigError, match=r"tracking\.enabled: expected true or false, got 1"):
        load_config(project, overrides=["tracking.enabled=1"])


def test_out_of_range_value_names_bounds(project):
    with pytest.raises(ConfigError, match=r"validate\.pii_mostly: expected a value in \[0, 1\]"):
        load_config(project, overrides=["validate.pii_mostly=1.5"])


def test_literal_and_list_entries_are_checked(project):
    with pytest.raises(ConfigError, match=r"validate\.sources\[0\]\.kind: expected one of"):
        load_config(project, overrides=["validate.sources=[{kind: pdf, path: x}]"])
    with pytest.raises(ConfigError, match=r"validate\.sources\[0\]\.path: expected a file"):
        load_config(project, overrides=["validate.sources=[{kind: txt}]"])


def test_every_error_is_reported_at_once(project):
    with pytest.raises(ConfigError) as e:
        load_config(project, overrides=["seed=-1", "validate.min_chars=x", "nope=1"])
    msg = str(e.value)
    assert "seed:" in msg and "validate.min_chars:" in msg and "nope: unknown key" in msg


def test_missing_key_is_an_error(project):
    data = yaml.safe_load((project / "params.yaml").read_text())
    del data["validate"]["chunk_rows"]
    (project / "params.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"validate\.chunk_rows: missing; expected an integer"):
        load_config(project)


def test_cross_key_constraints(project):
    with pytest.raises(ConfigError, match=r"validate\.min_chars: 500 exceeds validate\.max_chars"):
        load_config(project, overrides=["validate.min_chars=500", "validate.max_chars=100"])


def test_bad_override_syntax(project):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(project, overrides=["validate.min_chars"])
    with pytest.raises(ConfigError, match=r"seed is not a mapping"):
        load_config(project, overrides=["seed.x=1"])


def test_unknown_preset_lists_known_ones(project):
    with pytest.raises(ConfigError, match=r"preset .huge.*known presets: ci, default"):
        load_config(project, preset="huge")


def test_size_presets_set_the_same_keys():
    """Switching between size presets always fully determines the run's size."""

    def keys(d, prefix=""):
        return {
            k2
            for k, v in d.items()
            for k2 in (keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k])
        }

    assert keys(preset_overrides(REPO, "ci")) == keys(preset_overrides(REPO, "default"))
    # A preset writes into params.yaml, so `--preset default` after `--preset shakespeare`
    # restores only the keys default sets: it must set every key another preset changes.
    for preset in ("ci", "shakespeare"):
        assert keys(preset_overrides(REPO, preset)) <= keys(preset_overrides(REPO, "default"))


def test_default_preset_is_the_committed_params():
    assert load_config(REPO, preset="default") == load_config(REPO)


def test_overrides_are_typed_from_yaml(project):
    cfg = load_config(
        project, overrides=["synthesize.synthetic_share=0.3", "synthesize.generators=[mimic]"]
    )
    assert cfg.synthesize.synthetic_share == 0.3
    assert cfg.synthesize.generators == ["mimic"]


def test_params_writer_keeps_comments_and_reports_changes(tmp_path):
    root = make_project(tmp_path / "p", preset=None)
    changed = apply_to_params(root, "ci", ["seed=7"])
    assert "seed" in changed and "validate.sources" in changed
    text = (root / "params.yaml").read_text()
    assert "# lmforge configuration" in text and "# MLFLOW_TRACKING_URI" in text
    cfg = load_config(root)
    assert cfg.seed == 7 and cfg.validate.sources[0].num_docs == 2000
    assert apply_to_params(root, "ci", ["seed=7"]) == []  # idempotent


def test_params_writer_rejects_bad_values_without_writing(tmp_path):
    root = make_project(tmp_path / "p", preset=None)
    before = (root / "params.yaml").read_bytes()
    with pytest.raises(ConfigError, match=r"validate\.min_chars"):
        apply_to_params(root, None, ["validate.min_chars=-3"])
    assert (root / "params.yaml").read_bytes() == before


def test_cli_config_show_and_bad_key(project):
    cmd = [sys.executable, "-m", "flows.cli"]
    ok = subprocess.run(
        [*cmd, "config", "show", "--set", "seed=5"], cwd=project, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["seed"] == 5
    bad = subprocess.run(
        [*cmd, "config", "show", "--set", "validate.bogus=1"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "validate.bogus: unknown key" in bad.stderr


# Values at and past each bound of the decoding settings (pipeline/config/schema.py).
DECODING_EDGES = {
    "strategy": ["beam", "nucleus", 3],
    "max_new_tokens": [1, 0, 2.0, True],
    "temperature": [5e-5, 1e-4, 1, 10.0, 10.5, 0, -1.0, float("nan"), float("inf")],
    "top_k": [0, 5, -1, 1.5],
    "top_p": [0.005, 0.01, 1.0, 1.01, 0.0],
    "num_beams": [1, 64, 65, 0],
    "seed": [0, 2**63 - 1, 2**63, -1],
    "no_repeat_ngram_size": [0, 3, -1, 2.5, True],
    "repetition_penalty": [1.0, 1.3, 10.0, 10.5, 0.0, -1.0, float("nan")],
}


def test_register_decoding_and_a_served_request_obey_one_rule():
    """A value params.yaml's register.decoding accepts is one a request accepts, and the
    reverse (one DecodingConfig, one check); both errors name the field."""
    from pipeline.config.loader import build_config, read_yaml
    from pipeline.serve.textgen import GenerationParams, GenerationRequestError

    data = read_yaml(REPO / "params.yaml")
    base = dict(data["register"]["decoding"])
    for key, values in DECODING_EDGES.items():
        for value in values:
            data["register"]["decoding"] = {**base, key: value}
            try:
                cfg = build_config(data, REPO)
                in_params = None
            except ConfigError as e:
                in_params = str(e)
            try:
                GenerationParams.from_mapping({key: value})
                in_request = None
            except GenerationRequestError as e:
                in_request = e
            assert (in_params is None) == (in_request is None), (key, value, in_params)
            if in_request is not None:
                assert in_request.field == key, (key, value, in_request)
                assert f"register.decoding.{key}: expected" in in_params, in_params
            else:
                assert getattr(cfg.register.decoding, key) == value


def test_preset_merge_semantics():
    """Mappings merge key by key, lists and scalars replace, new keys are added (the schema
    rejects them later), and neither input is changed."""
    from pipeline.config.loader import deep_merge

    base = {"a": {"b": 1, "c": [1, 2], "d": {"e": 1}}, "f": 2}
    over = {"a": {"c": [3], "d": {"g": 4}, "b": {"x": 1}}, "f": {"y": 2}, "h": None}
    snapshot = yaml.safe_dump([base, over])
    merged = deep_merge(base, over)
    assert merged == {
        "a": {"b": {"x": 1}, "c": [3], "d": {"e": 1, "g": 4}},  # a mapping replaces a scalar
        "f": {"y": 2},
        "h": None,  # a new key, even with a null value
    }
    assert yaml.safe_dump([base, over]) == snapshot
    merged["a"]["c"].append(9)  # the result shares nothing with the inputs
    assert over["a"]["c"] == [3]
    with pytest.raises(ConfigError, match=r"h: unknown key"):
        load_config(REPO, overrides=["h=1"])


def test_params_writer_writes_what_the_loader_resolves(tmp_path):
    """params.yaml after `apply_to_params` holds exactly the data the loader resolves from the
    same preset and overrides (one merge), and unchanged keys keep their comments."""
    from pipeline.config.loader import resolve_data

    root = make_project(tmp_path / "p", preset=None)
    overrides = ["seed=7", "validate.sources=[{kind: storyworld, num_docs: 300}]"]
    overrides += ["finetune.max_steps=3", "pretrain.resume=false"]
    expected = resolve_data(root, "ci", overrides)
    apply_to_params(root, "ci", overrides)
    assert yaml.safe_load((root / "params.yaml").read_text()) == expected
    assert "# lmforge configuration" in (root / "params.yaml").read_text()
