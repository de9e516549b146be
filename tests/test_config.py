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
