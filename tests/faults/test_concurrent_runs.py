"""Fault row 6: two `lmforge run` processes started at the same moment on one work tree.

Two real `lmforge run` processes (the installed console script, against the session's
Prefect server) start together in one project. Exactly one may run: the other must exit
non-zero, naming the holder (its pid, host and Prefect flow run), without touching
params.yaml or starting a stage; the first must complete.

The stages are stand-ins under the real stage names (tests/test_orchestration.py: each
writes its output and report), because what is under test is the workspace lock between
two real processes, not the stages.
"""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from fault_helpers import BIN, flow_env, flow_run_state, task_run_states, wait_for
from test_orchestration import _flow_project

from pipeline.config.params_file import apply_to_params
from pipeline.core.names import STAGES

pytestmark = pytest.mark.slow

HOLDER = re.compile(r"in use by another pipeline run: pid (\d+) on (\S+) \(flow run ([0-9a-f-]+)")


def flow_runs_with(**parameters) -> list:
    """The flow runs of `lm-pipeline` whose parameters include `parameters`."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = client.read_flow_runs(limit=200)
    return [r for r in found if all(r.parameters.get(k) == v for k, v in parameters.items())]


def test_second_concurrent_run_exits_at_once_naming_the_holder(tmp_path: Path, procs, prefect_api):
    root = _flow_project(tmp_path, commit=True, remote_ok=True)
    apply_to_params(root, None, ["tracking.enabled=false"])
    env = flow_env(prefect_api)
    runs = {}
    for n in (1, 2):  # each run sets its own seed: params.yaml shows which one ran
        runs[n] = procs.start(
            [str(BIN / "lmforge"), "run", "--no-push", "--set", f"seed={100 + n}"],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    # The first to exit is the one refused; the other still holds the work tree then.
    first = wait_for(
        lambda: next((n for n, p in runs.items() if p.poll() is not None), None),
        300,
        "one of the two runs to exit",
    )
    winner = runs[3 - first]
    assert winner.poll() is None, "the run holding the lock ended before the refused one"
    refused = runs[first].communicate(timeout=60)[0]
    assert runs[first].returncode == 1, refused[-3000:]
    holder = HOLDER.search(refused)
    assert holder, refused[-3000:]
    pid, host, flow_run_id = holder.groups()
    assert int(pid) == winner.pid and host == socket.gethostname()
    assert str(root.resolve()) in refused

    output = winner.communicate(timeout=300)[0]
    assert winner.returncode == 0, output[-3000:]
    assert flow_run_state(flow_run_id).is_completed()  # the named flow run is the winner's
    tasks = task_run_states(flow_run_id)
    assert set(STAGES) <= set(tasks) and all(tasks[s] == ["Completed"] for s in STAGES), tasks
    (refused_run,) = flow_runs_with(overrides=[f"seed={100 + first}"])
    assert refused_run.state.is_failed() and "WorkspaceBusy" in str(refused_run.state.message)
    assert task_run_states(str(refused_run.id)) == {}  # not even the parent run was opened
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["seed"] == 100 + (3 - first)  # the refused run changed nothing
