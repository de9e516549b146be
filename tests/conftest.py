"""Shared fixtures: throwaway project roots built from the repo's own params.yaml and presets."""

from __future__ import annotations

import os
import shutil
import sys
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


# The smallest GPT the pretrain tests train (22k params, a few ms a step on 2 cores).
TINY_GPT = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "pretrain.micro_batch_size=2",
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


def _restore_tracking_uri(before: str | None) -> None:
    if os.environ.get("MLFLOW_TRACKING_URI") == before:
        return
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if utils is not None:
        utils._tracking_uri = None  # back to "read it from the environment"


# MLflow's `set_tracking_uri` also sets `MLFLOW_TRACKING_URI` in `os.environ` (so that
# subprocesses inherit it), and every later test's subprocesses would log to that store: a
# test of "tracking is down" would find it up. These two undo it after each test and after
# each module (module fixtures, e.g. a served model, set it outside any one test).
@pytest.fixture(autouse=True, scope="module")
def _no_tracking_uri_leak_from_a_module() -> Iterator[None]:
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    _restore_tracking_uri(before)


@pytest.fixture(autouse=True)
def _no_tracking_uri_leak() -> Iterator[None]:
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    _restore_tracking_uri(before)


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


@pytest.fixture(scope="module")
def stack():
    """The team stack (tests/stack/stack_fixture.py): `lmforge stack up` once per module."""
    from stack_fixture import running_stack  # tests/stack is on sys.path for its own tests

    yield from running_stack()
