"""Reproduce a pipeline run from its MLflow run id, and compare the two runs.

    lmforge reproduce <mlflow-run-id>            # a parent run or any stage's run

1. Read the run's tags: the git commit and the DVC experiment (`lmforge.dvc_experiment`).
2. Check out the experiment's commit (params.yaml, dvc.lock and metrics as the run left
   them; the plain commit when the experiment is unknown) in a separate git worktree, so
   the current work tree is never touched.
3. Pull the data from the DVC remote into the worktree: `dvc fetch`, every object checked
   against its md5 (`pull_verified`), then `dvc checkout`. A missing or corrupted object
   fails the reproduction, naming it, its output and its remote path; the worktree is
   then removed, so nothing half-populated is left.
4. `dvc repro --force`: every stage runs again, logging to the worktree's own MLflow store.
5. Print the metrics of the two runs side by side and compare the DVC hashes of every
   output. On CPU both must be identical; the command exits 1 when they are not.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config
from pipeline.core.errors import LmforgeError
from pipeline.core.nested import flatten


class ReproduceError(LmforgeError):
    """The run cannot be reproduced (unknown run, missing commit, failed command)."""


@dataclass
class Comparison:
    """Metrics of the original and the reproduced run, and the outputs whose hash differs."""

    rows: list[tuple[str, Any, Any]] = field(default_factory=list)  # (metric, original, new)
    hash_diffs: list[tuple[str, str, str]] = field(default_factory=list)  # (path, old, new)
    outputs_compared: int = 0

    @property
    def metric_diffs(self) -> list[tuple[str, Any, Any]]:
        return [r for r in self.rows if not _same(r[1], r[2])]

    @property
    def identical(self) -> bool:
        return not self.metric_diffs and not self.hash_diffs


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command; a failure raises with the command and the end of its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-3000:]
        raise ReproduceError(f"`{' '.join(cmd)}` failed in {cwd} (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def run_origin(cfg: Config, run_id: str) -> tuple[str, str]:
    """(git commit, DVC experiment name) of an MLflow run, from its tags."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.ops.tracking import server_error, tracking_uri

    where = tracking_uri(cfg)
    client = mlflow.MlflowClient(where)
    try:
        run = client.get_run(run_id)
    except Exception as e:
        # Refused credentials or an unreachable server say so; only the rest is "not found".
        if (clear := server_error(e, where)) is not None:
            raise clear from None
        if not isinstance(e, MlflowException):
            raise
        raise ReproduceError(f"MLflow run {run_id!r} not found at {where}: {e.message}") from None
    tags = run.data.tags
    commit = tags.get("lmforge.git_commit") or tags.get("mlflow.source.git.commit", "")
    if not commit:
        raise ReproduceError(
            f"run {run_id} has no lmforge.git_commit tag: it was not made by lmforge"
        )
    return commit, tags.get("lmforge.dvc_experiment", "")


def experiment_commit(root: Path, name: str) -> str | None:
    """The commit DVC saved experiment `name` as (refs/exps/.../<name>), or None."""
    if not name:
        return None
    refs = _run(["git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"], root)
    for line in refs.splitlines():
        ref, sha = line.split()
        if ref.rsplit("/", 1)[-1] == name:
            return sha
    return None


def add_worktree(root: Path, rev: str, dest: Path) -> Path:
    """A detached git worktree of `rev` at `dest`, with this repo's local DVC config."""
    _run(["git", "worktree", "add", "--detach", str(dest), rev], root)
    local_config = root / ".dvc" / "config.local"
    if local_config.is_file():  # e.g. the remote's URL, set with `dvc remote modify --local`
        shutil.copy2(local_config, dest / ".dvc" / "config.local")
    return dest


def dvc_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    for key in ("LMFORGE_PARENT_RUN_ID", "LMFORGE_FLOW_RUN_ID", "LMFORGE_DVC_EXPERIMENT"):
        env.pop(key, None)  # the reproduction is its own run, not a child of another
    return env


def lock_hashes(lock_text: str) -> dict[str, str]:
    """Output path -> DVC md5 from the text of a dvc.lock."""
    stages = (yaml.safe_load(lock_text) or {}).get("stages", {})
    return {
        out["path"]: out.get("md5", "")
        for stage in stages.values()
        for out in stage.get("outs", [])
    }


@dataclass(frozen=True)
class BadObject:
    """A DVC object of the run that the worktree cannot have intact."""

    output: str  # the output (or the file inside a directory output) it holds
    md5: str
    problem: str  # "missing from the remote" | "corrupted: ..." | why it could not be checked


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def object_path(store: Path, md5: str) -> Path:
    """Where DVC 3 keeps object `md5` in a cache or a local remote (files/md5/ab/cdef...)."""
    return store / "files" / "md5" / md5[:2] / md5[2:]


def _check(cache: Path, output: str, md5: str) -> BadObject | None:
    """Object `md5` in `cache`: None when present and its content's md5 is its name."""
    path = object_path(cache, md5)
    if not path.is_file():
        return BadObject(output, md5, "missing from the remote (never pushed, or deleted)")
    actual = file_md5(path)
    if actual != md5.removesuffix(".dir"):
        return BadObject(output, md5, f"corrupted: the fetched copy has md5 {actual}")
    return None


def _listing(md5: str, stores: list[Path]) -> list[dict[str, str]] | None:
    """The entries ({"relpath", "md5"}) of directory object `md5` from the first store that
    holds it intact. `dvc fetch` does not keep a listing whose files failed to download, so
    the run's own cache and a local remote folder are looked at too."""
    for store in stores:
        path = object_path(store, md5)
        if path.is_file() and file_md5(path) == md5.removesuffix(".dir"):
            return json.loads(path.read_text())
    return None


def check_fetched(cache: Path, outputs: dict[str, str], stores: list[Path]) -> list[BadObject]:
    """Every object of `outputs` (path -> md5 from dvc.lock) checked in the fetched `cache`."""
    bad: list[BadObject] = []
    for output, md5 in sorted(outputs.items()):
        problem = _check(cache, output, md5)
        if not md5.endswith(".dir"):
            bad += [problem] if problem else []
            continue
        entries = _listing(md5, [cache, *stores])
        if entries is None:  # the listing itself is lost: report it, its files are unknown
            bad.append(problem or BadObject(output, md5, "directory listing unreadable"))
            continue
        members = [_check(cache, f"{output}/{e['relpath']}", e["md5"]) for e in entries]
        members = [m for m in members if m]
        bad += members or ([problem] if problem else [])  # a lost listing, its files all here
    return bad


def cached_outputs(work: Path) -> dict[str, str]:
    """Output path -> md5 of the worktree's dvc.lock, for outputs kept in DVC's cache.

    An output with `cache: false` (a stage's reports/<stage>.json) is committed to git, so
    the worktree has it already; every other output comes from the remote.
    """
    tracked = set(_run(["git", "ls-files"], work).splitlines())
    outs = lock_hashes((work / "dvc.lock").read_text())
    return {p: md5 for p, md5 in outs.items() if md5 and p not in tracked}


def _dvc_stores(root: Path, work: Path, env: dict[str, str]) -> tuple[Path, str, list[Path]]:
    """(the worktree's cache, the default remote's location, local folders holding objects).

    The location is a resolved path for a local remote folder (DVC reads a relative URL
    from .dvc/), else the URL as configured; "" when there is no default remote.
    """
    cache = Path(_run(["dvc", "cache", "dir"], work, env).strip())
    named = subprocess.run(
        ["dvc", "remote", "default"], cwd=work, env=env, capture_output=True, text=True
    )
    listed = _run(["dvc", "remote", "list"], work, env).split("\n")
    urls = {parts[0]: parts[1] for line in listed if len(parts := line.split()) >= 2}
    url = urls.get(named.stdout.strip(), "") if named.returncode == 0 else ""
    stores = [root / ".dvc" / "cache"]  # the run's own cache, when it is still there
    if url and "://" not in url:
        url = str((work / ".dvc" / Path(url).expanduser()).resolve())
        stores.append(Path(url))
    return cache, url, stores


def pull_verified(root: Path, work: Path, env: dict[str, str]) -> None:
    """`dvc fetch`, every object of dvc.lock checked against its md5, then `dvc checkout`.

    DVC 3.67 does not check what it downloads unless the remote sets `verify = true`: a
    corrupted object is checked out as if it were good. A missing one fails `dvc pull` with
    only its md5. So the worktree's outputs are written only once every object is present
    and intact; otherwise ReproduceError names each object: the output it belongs to, its
    md5 and where it lives in the remote.
    """
    fetch = subprocess.run(["dvc", "fetch"], cwd=work, env=env, capture_output=True, text=True)
    cache, url, stores = _dvc_stores(root, work, env)
    bad = check_fetched(cache, cached_outputs(work), stores)
    if bad:
        lines = [
            f"  {b.output} (md5 {b.md5}, remote object {url}/files/md5/{b.md5[:2]}/{b.md5[2:]})"
            f": {b.problem}"
            for b in bad
        ]
        if fetch.returncode != 0:  # DVC's own words too: e.g. a network error, not a loss
            tail = (fetch.stdout + fetch.stderr).strip()[-1500:]
            lines.append(f"`dvc fetch` said (exit {fetch.returncode}):\n{tail}")
        raise ReproduceError(
            f"the DVC remote {url or '(no default remote)'} cannot give every output of this "
            f"run intact; {len(bad)} object(s):\n" + "\n".join(lines)
        )
    if fetch.returncode != 0:  # every object is here, but DVC still failed: say what it said
        tail = (fetch.stdout + fetch.stderr).strip()[-3000:]
        raise ReproduceError(f"`dvc fetch` failed in {work} (exit {fetch.returncode}):\n{tail}")
    _run(["dvc", "checkout"], work, env)


def metrics_at(root: Path, rev: str | None, files: list[str]) -> dict[str, Any]:
    """Flattened metrics files at git `rev` (None: the work tree at `root`)."""
    out: dict[str, Any] = {}
    for rel in files:
        if rev is None:
            path = root / rel
            text = path.read_text() if path.is_file() else None
        else:
            proc = subprocess.run(
                ["git", "show", f"{rev}:{rel}"], cwd=root, capture_output=True, text=True
            )
            text = proc.stdout if proc.returncode == 0 else None
        if text is not None:
            # numbers, strings, bools and None by "<stem>.<dotted key>"; lists (tables such as
            # the per-expectation rows) leave no key: they are compared through the hashes
            out |= flatten({Path(rel).stem: json.loads(text)}, lists="drop")
    return out


def compare(root: Path, rev: str, work: Path, metric_files: list[str]) -> Comparison:
    """Original (git `rev`) against the reproduction in `work`."""
    old_lock = _run(["git", "show", f"{rev}:dvc.lock"], root)
    old, new = lock_hashes(old_lock), lock_hashes((work / "dvc.lock").read_text())
    diffs = [(p, old.get(p, ""), new.get(p, "")) for p in sorted(set(old) | set(new))]
    before, after = metrics_at(root, rev, metric_files), metrics_at(work, None, metric_files)
    rows = [(k, before.get(k), after.get(k)) for k in sorted(set(before) | set(after))]
    return Comparison(
        rows=rows,
        hash_diffs=[d for d in diffs if d[1] != d[2]],
        outputs_compared=len(diffs),
    )


def metric_files(cfg: Config, root: Path) -> list[str]:
    """The DVC metrics files of dvc.yaml's stages, relative to the root."""
    reports = cfg.path("reports").relative_to(cfg.root)
    from pipeline.core.names import STAGES, report_json

    return [str(reports / report_json(stage)) for stage in STAGES]


def render(c: Comparison, original: str, reproduced: str) -> str:
    """A side-by-side table of the two runs' metrics and the verdict on the hashes."""
    width = max([len(r[0]) for r in c.rows] + [6])
    lines = [f"{'metric':<{width}}  {original[:24]:>24}  {reproduced[:24]:>24}  same"]
    for key, a, b in c.rows:
        mark = "yes" if _same(a, b) else "NO"
        lines.append(f"{key:<{width}}  {_cell(a):>24}  {_cell(b):>24}  {mark}")
    lines.append("")
    lines.append(
        f"DVC output hashes: {c.outputs_compared - len(c.hash_diffs)}/{c.outputs_compared} "
        "identical"
    )
    lines += [f"  {p}: {a} -> {b}" for p, a, b in c.hash_diffs]
    verdict = "IDENTICAL" if c.identical else f"DIFFERENT ({len(c.metric_diffs)} metrics)"
    lines.append(f"Reproduction: {verdict}")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.10g}"
    return "-" if v is None else str(v)[:24]


def reproduce(
    cfg: Config, run_id: str, workdir: Path | None = None, keep: bool = True
) -> tuple[Comparison, Path]:
    """Reproduce MLflow run `run_id` in a worktree; the comparison and the worktree path."""
    root = cfg.root.resolve()
    commit, experiment = run_origin(cfg, run_id)
    rev = experiment_commit(root, experiment) or commit
    if subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=root).returncode:
        raise ReproduceError(f"commit {rev} of run {run_id} is not in this repository")
    parent = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="lmforge-reproduce-"))
    work = parent / "repo"
    add_worktree(root, rev, work)
    env = dvc_env()
    try:
        pull_verified(root, work, env)
    except ReproduceError as e:  # nothing half-populated stays behind: no worktree at all
        _run(["git", "worktree", "remove", "--force", str(work)], root)
        if not workdir:
            parent.rmdir()
        raise ReproduceError(
            f"{e}\nNothing was checked out; the worktree {work} is removed."
        ) from None
    try:
        _run(["dvc", "repro", "--force"], work, env)
        comparison = compare(root, rev, work, metric_files(cfg, root))
    finally:
        if not keep:
            _run(["git", "worktree", "remove", "--force", str(work)], root)
    return comparison, work
