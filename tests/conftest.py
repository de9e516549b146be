"""Shared fixtures: throwaway project roots built from the repo's own params.yaml and presets."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_helpers import Procs

from pipeline.config import Config, load_config
from pipeline.config.params_file import apply_to_params

REPO = Path(__file__).resolve().parents[1]


def make_project(dest: Path, preset: str | None = "ci", overrides: list[str] | None = None) -> Path:
    """A project root at `dest`: the repo's params.yaml and presets with a preset applied."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", dest / "params.yaml")
    shutil.copytree(REPO / "presets", dest / "presets", dirs_exist_ok=True)
    apply_to_params(dest, preset, ["tracking.enabled=false", *(overrides or [])])
    return dest


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj")


def cfg_for(root: Path, *overrides: str) -> Config:
    return load_config(root, overrides=list(overrides))


# Small story-world data: enough for a tokenizer and a few training steps, fast on 2 cores.
SMALL_DATA = [
    "validate.sources=[{kind: storyworld, num_docs: 400}]",
    "synthesize.entropy_docs=200",
    "tokenizer.vocab_size=300",
]


def prepared_project(base: Path, overrides: list[str], stages: list) -> Path:
    """A project under `base` with SMALL_DATA + `overrides`, after running `stages` in order."""
    root = make_project(base / "proj", overrides=[*SMALL_DATA, *overrides])
    cfg = cfg_for(root)
    for stage in stages:
        stage.run(cfg)
    return root


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One temporary Prefect server for the whole session (~15-20 s to start on 2 cores).

    Yields its API URL. Session-scoped because each harness start costs that much, and the
    flow, sweep, deployment and orchestration tests can share one server.
    """
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry
        with prefect_test_harness(server_startup_timeout=120):
            yield str(get_current_settings().api.url)


FAULTS_DIR = Path(__file__).parent / "faults"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/faults/ is marked `faults`, so none can forget the mark."""
    for item in items:
        if FAULTS_DIR in Path(item.fspath).parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def procs() -> Iterator[Procs]:
    """Start processes with `procs.start([...])`; all still alive are stopped at teardown."""
    registry = Procs()
    try:
        yield registry
    finally:
        registry.stop_all()
