"""Fault matrix row 12: a missing and a corrupted object in the DVC remote, then a pull.

A throwaway project (the repo's params.yaml, a one-stage dvc.yaml whose outputs are a
directory, a file and a `cache: false` report) makes two versions of its outputs, pushes
both to a local remote folder, and then the remote is damaged for real: one file object of
v2's directory output is deleted, and bytes are flipped in v2's file object (its mode kept,
as bit rot would). The local cache is removed, so everything must come from the remote.

- `lmforge reproduce <run-id>` (a real process) of a run made at v2 exits 1 naming each
  damaged object (output, md5, remote path), removes its worktree, and leaves the user's
  work tree byte-identical.
- `dvc pull` at v2 in a clone holding v1's outputs exits non-zero naming the missing md5
  (not the output it belongs to), and v1's outputs stay byte-identical, with no partial
  file: DVC's behaviour, no code of ours. The missing object fails the whole fetch before
  any checkout. A corrupted object alone is another story: DVC 3.67 hashes what it
  downloads only with `verify = true` on the remote, so without it the corrupted file is
  checked out, exit 0, and `dvc status` is clean (measured by hand); `lmforge reproduce`
  checks every object itself.

    .venv/bin/python -m pytest tests/faults/test_dvc_remote.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import make_project
from dvc_helpers import dvc
from fault_helpers import flip_bytes, leftover_temporaries, md5_files

BIN = Path(sys.executable).parent
MAKE = """\
import json, os
v = open("version").read().strip()
os.makedirs("out/dir", exist_ok=True)
for i in range(3):
    open(f"out/dir/f{i}.txt", "w").write(f"{v} file {i}\\n" * 1000)
open("out/single.bin", "w").write(f"{v} single\\n" * 500)
json.dump({"version": v}, open("report.json", "w"))
"""
DVC_YAML = {
    "stages": {
        "make": {
            "cmd": "python make.py",
            "deps": ["make.py", "version"],
            "outs": ["out/dir", "out/single.bin"],
            "metrics": [{"report.json": {"cache": False}}],
        }
    }
}
OUTPUTS = ("out", "report.json", "dvc.lock")  # every file a pull could touch


def git(root: Path, *args: str) -> str:
    ident = ["-c", "user.name=t", "-c", "user.email=t@t"]
    done = subprocess.run(
        ["git", *ident, *args], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def make_version(root: Path, version: str) -> str:
    """Run the stage for `version`, commit and push it; the commit's sha."""
    (root / "version").write_text(version + "\n")
    ok(dvc(root, "repro", "-q"))
    git(root, "add", "-A")
    git(root, "commit", "-qm", version)
    ok(dvc(root, "push", "-q"))
    return git(root, "rev-parse", "HEAD").strip()


def remote_object(remote: Path, md5: str) -> Path:
    return remote / "files" / "md5" / md5[:2] / md5[2:]


def damage(remote: Path, lock_text: str) -> dict[str, str]:
    """Delete f1.txt's object of the directory output, flip bytes in single.bin's object.

    Returns {output path: md5} of the two damaged objects.
    """
    outs = {o["path"]: o["md5"] for o in yaml.safe_load(lock_text)["stages"]["make"]["outs"]}
    listing = json.loads(remote_object(remote, outs["out/dir"]).read_text())
    (f1,) = [e["md5"] for e in listing if e["relpath"] == "f1.txt"]
    remote_object(remote, f1).unlink()
    target = remote_object(remote, outs["out/single.bin"])
    mode = stat.S_IMODE(target.stat().st_mode)  # DVC pushes objects read-only
    target.chmod(mode | stat.S_IWUSR)
    flip_bytes(target, 5, count=3)
    target.chmod(mode)  # unchanged mode: DVC trusts a protected object without hashing it
    return {"out/dir/f1.txt": f1, "out/single.bin": outs["out/single.bin"]}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """A git + DVC project with v1 and v2 pushed, v2's remote objects damaged, no cache."""
    base = tmp_path_factory.mktemp("dvcremote")
    root, remote = make_project(base / "proj"), base / "remote"
    git(root, "init", "-q")
    ok(dvc(root, "init", "-q"))
    ok(dvc(root, "remote", "add", "-d", "local", str(remote)))
    (root / "make.py").write_text(MAKE)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (root / ".gitignore").write_text("mlflow.db\n")
    v1 = make_version(root, "v1")
    v2 = make_version(root, "v2")
    damaged = damage(remote, (root / "dvc.lock").read_text())
    shutil.rmtree(root / ".dvc" / "cache")  # everything must now come from the remote
    return {"root": root, "remote": remote, "v1": v1, "v2": v2, "damaged": damaged}


def test_reproduce_names_each_damaged_object_and_leaves_no_worktree(project, tmp_path):
    root, remote = project["root"], project["remote"]
    uri = f"sqlite:///{root / 'mlflow.db'}"  # the project's tracking.uri
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("made", str(tmp_path / "artifacts")))
    client.set_tag(run.info.run_id, "lmforge.git_commit", project["v2"])
    before = md5_files(root, *OUTPUTS)
    assert len(before) == 7  # out/.gitignore, 3 files of out/dir, out/single.bin, report, lock
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"HOME": str(tmp_path), "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(
        [str(BIN / "lmforge"), "reproduce", run.info.run_id, "--workdir", str(workdir)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    for output, md5 in project["damaged"].items():
        where = remote_object(remote, md5)
        assert f"{output} (md5 {md5}, remote object {where})" in out, out
    assert "out/dir/f1.txt (md5" in out and "missing from the remote" in out, out
    assert "out/single.bin (md5" in out and "corrupted: the fetched copy has md5" in out, out
    for intact in ("out/dir/f0.txt", "out/dir/f2.txt", "report.json"):
        assert f"{intact} (md5" not in out, out
    assert "worktree" in out and "is removed" in out, out
    assert list(workdir.iterdir()) == []  # no half-populated worktree
    assert git(root, "worktree", "list").count("\n") == 1  # only the user's work tree
    assert md5_files(root, *OUTPUTS) == before
    assert leftover_temporaries(root) == []


def test_dvc_pull_of_damaged_objects_fails_and_keeps_the_previous_outputs(project, tmp_path):
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project["root"]), str(clone))
    git(clone, "checkout", "-q", project["v1"])
    ok(dvc(clone, "pull", "-q"))  # v1's objects are intact
    before = md5_files(clone, "out")  # report.json is in git: it moves with the checkout
    git(clone, "checkout", "-q", project["v2"])
    pulled = dvc(clone, "pull")
    out = pulled.stdout + pulled.stderr
    assert pulled.returncode != 0, out
    assert project["damaged"]["out/dir/f1.txt"] in out, out  # DVC names the missing md5 only
    assert md5_files(clone, "out") == before  # v1's outputs, byte for byte, no more
    assert leftover_temporaries(clone) == []
