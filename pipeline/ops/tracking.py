"""A thin MLflow edge: one run per stage, joined to the pipeline's parent run when there is one.

The pipeline flow opens a parent run and hands its id to stage processes through the
environment (`LMFORGE_PARENT_RUN_ID`); each stage then logs as a child run. Metrics are
buffered and sent with `log_batch` (one HTTP call per ~1000 values, not one per step),
datasets are logged with the DVC md5 of their file as the digest and a context of
training, validation or test, and every run is tagged with the git commit and the DVC stage.

`mlflow ui` reads MLflow's own tags: the experiment's `mlflow.experimentKind` (else MLflow 3
opens the GenAI traces view), and each run's `mlflow.source.*`, `mlflow.runName` and
`mlflow.note.content` (its description: the stage summary, `Tracker.describe`).

Tracking switches off cleanly, leaving a no-op `Tracker`, when `tracking.enabled: false`,
when mlflow is not installed (the GPU benchmark machine), or on a non-zero rank.

A tracking server that cannot be reached, or that refuses the credentials, is an error that
names the URI and the variable to set (`TrackingUnavailable`, exit code 75: retried by the
flow; `TrackingAuthError`, 401/403). Nothing ever falls back to a local store: a team's runs
logged to a stray mlflow.db would look lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.core.errors import EXIT_TRANSIENT, LmforgeError, is_transient
from pipeline.core.io import file_md5
from pipeline.core.markdown import table
from pipeline.core.nested import flatten

PARENT_RUN_ENV = "LMFORGE_PARENT_RUN_ID"
FLOW_RUN_ENV = "LMFORGE_FLOW_RUN_ID"
DVC_EXP_ENV = "LMFORGE_DVC_EXPERIMENT"
_BATCH = 1000  # MLflow's log_batch accepts at most 1000 metrics per call
_BAD_METRIC_CHARS = re.compile(r"[^\w\-. :/]")
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the training-runs view of `mlflow ui`
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI
# The `context` of a dataset input, by split: the words MLflow's UI shows.
SPLIT_CONTEXT = {"train": "training", "val": "validation", "test": "test"}
_NOTE_ROWS = 40  # a description, not a report: the rest is in reports/<stage>.json

log = logging.getLogger(__name__)


def metric_name(key: str) -> str:
    """A key MLflow accepts: other characters (e.g. the + of sam+swa) become underscores."""
    return _BAD_METRIC_CHARS.sub("_", key)


def tracking_uri(cfg: Config) -> str:
    """`MLFLOW_TRACKING_URI` if set, else `tracking.uri` (a relative sqlite path made absolute)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str(cfg.root / uri[len(prefix) :])
    return uri


class TrackingUnavailable(LmforgeError):
    """The tracking server could not be reached (transient: the flow retries the stage)."""

    exit_code = EXIT_TRANSIENT


class TrackingAuthError(LmforgeError):
    """The tracking server refused the credentials (401) or the permission (403)."""


def uri_source() -> str:
    """Where the tracking URI came from, as a user would change it."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "MLFLOW_TRACKING_URI"
    return "tracking.uri in params.yaml (MLFLOW_TRACKING_URI overrides it)"


def server_error(exc: BaseException, uri: str) -> LmforgeError | None:
    """The clear error for an MLflow failure against `uri`, or None if it is another error."""
    if type(exc).__module__.split(".")[0] not in ("mlflow", "requests", "urllib3"):
        return None  # the stage's own error, whatever its message says
    status = getattr(exc, "get_http_status_code", lambda: None)()
    if status in (401, 403):
        what = "refused the credentials" if status == 401 else "denied permission"
        return TrackingAuthError(
            f"the MLflow tracking server at {uri} (from {uri_source()}) {what} (HTTP {status}):"
            " set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account with"
            f" access to this experiment. Server said: {getattr(exc, 'message', exc)}"
        )
    if is_transient(exc):
        return TrackingUnavailable(
            f"cannot reach the MLflow tracking server at {uri} (from {uri_source()}): {exc}."
            " This is a transient failure (exit 75: the flow retries the stage). Start the"
            " server, or set MLFLOW_TRACKING_URI to one that is up (nothing was logged"
            " elsewhere instead; tracking.enabled=false turns tracking off)."
        )
    return None


@contextlib.contextmanager
def server_errors(uri: str) -> Iterator[None]:
    """Turn an unreachable server or refused credentials inside the block into clear errors."""
    try:
        yield
    except Exception as e:
        clear = server_error(e, uri)
        if clear is None:
            raise
        raise clear from e


def git_commit(root: Path) -> tuple[str, bool]:
    """(commit sha or '', dirty?) of the git work tree at `root`."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return sha, bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        return "", False


class Tracker:
    """Logging facade for one MLflow run (child of `parent_id`); no-op when `run_id` is None."""

    def __init__(
        self, client: Any = None, run_id: str | None = None, parent_id: str | None = None
    ) -> None:
        self.client, self.run_id, self.parent_id = client, run_id, parent_id
        self._pending: list[Any] = []

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flattened params, 100 per call (MLflow's limit for params in one batch)."""
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params, lists="index").items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Buffer metrics; they are sent in batches by `flush` (called automatically)."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # not numbers_only: a NaN or infinite metric is still sent, as MLflow accepts it
        for k, v in flatten(metrics, lists="index").items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                self._pending.append(Metric(metric_name(k), float(v), now, step))
        if len(self._pending) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        while self.active and self._pending:
            batch, self._pending = self._pending[:_BATCH], self._pending[_BATCH:]
            self.client.log_batch(self.run_id, metrics=batch)

    def log_model_metrics(
        self, model_id: str, metrics: Mapping[str, float], dataset: tuple[str, str] | None = None
    ) -> None:
        """Metrics of MLflow 3 LoggedModel `model_id`, on `dataset` (name, digest); sent now."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        name, digest = dataset or (None, None)
        items = [
            Metric(metric_name(k), float(v), now, 0, model_id, name, digest)
            for k, v in flatten(metrics, numbers_only=True).items()
        ]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self.client.log_batch(self.run_id, tags=items)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file or a whole folder."""
        if not self.active:
            return
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path or path.name)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifact_on_parent(self, path: Path, artifact_path: str | None = None) -> None:
        """`log_artifact` onto the pipeline's parent run (its overview); no-op without one."""
        if self.active and self.parent_id:
            Tracker(self.client, self.parent_id).log_artifact(path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.active:
            self.client.log_text(self.run_id, text, artifact_file)

    def describe(self, stage: str, summary: Mapping[str, Any]) -> None:
        """The run's description (`mlflow.note.content`): the stage's summary as markdown."""
        if self.active:
            self.set_tags({NOTE_TAG: stage_note(stage, summary)})

    def log_dataset(self, path: Path, name: str, context: str, role: str = "input") -> None:
        """Record a dataset file on the run; its digest is the file md5 (as in dvc.lock).

        `context` is training, validation or test (`SPLIT_CONTEXT`); `role` says whether
        the stage read it ("input") or wrote it ("output"), as the tag `lmforge.role`.
        """
        if not self.active:
            return
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": it's local
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(Path(path).resolve()))
        ds = MetaDataset(source=source, name=name, digest=file_md5(path)[:36])
        tags = [
            InputTag(key="mlflow.data.context", value=context),
            InputTag(key="lmforge.role", value=role),
        ]
        self.client.log_inputs(
            self.run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=tags)]
        )


def stage_note(stage: str, summary: Mapping[str, Any]) -> str:
    """`summary` (a stage's returned dict) as a markdown table under the stage's name."""
    rows = list(flatten(summary, lists="index").items())
    lines = [f"**lmforge `{stage}`**", "", *table(["", "value"], rows[:_NOTE_ROWS])]
    if len(rows) > _NOTE_ROWS:
        lines += ["", f"... {len(rows) - _NOTE_ROWS} more in `reports/{stage}.json`"]
    return "\n".join(lines)


def mlflow_or_none() -> Any:
    try:
        import mlflow
    except ImportError:
        return None
    return mlflow


@contextlib.contextmanager
def start_run(cfg: Config, stage: str, rank: int = 0) -> Iterator[Tracker]:
    """Open the stage's MLflow run (a child of `$LMFORGE_PARENT_RUN_ID` if set).

    The run ends FINISHED on success and FAILED if the stage raises.
    """
    mlflow = mlflow_or_none() if cfg.tracking.enabled and rank == 0 else None
    if mlflow is None:
        if cfg.tracking.enabled and rank == 0:
            log.warning("mlflow is not installed: tracking is off for stage %s", stage)
        yield Tracker()
        return
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri(cfg)
    with server_errors(uri):
        client = mlflow.MlflowClient(tracking_uri=uri)
        parent = os.environ.get(PARENT_RUN_ENV)
        experiment_id = (
            client.get_run(parent).info.experiment_id if parent else _experiment_id(client, cfg)
        )
        run = client.create_run(experiment_id, run_name=stage, tags=_stage_tags(cfg, stage))
    tracker = Tracker(client, run.info.run_id, parent)
    status = "FAILED"
    try:
        with server_errors(uri):
            yield tracker
        status = "FINISHED"
    finally:
        _end_run(tracker, uri, status)


def _end_run(tracker: Tracker, uri: str, status: str) -> None:
    """Flush and close a stage's run; after a failed stage, a close error only warns."""
    try:
        with server_errors(uri):
            try:
                tracker.flush()
            finally:
                tracker.client.set_terminated(tracker.run_id, status)
    except LmforgeError as e:
        if status == "FINISHED":
            raise
        # the stage's own error is the one to report (e.g. SIGTERM: exit 143, not 75)
        log.warning("could not mark MLflow run %s %s: %s", tracker.run_id, status, e)


def _experiment_id(client: Any, cfg: Config) -> str:
    """The id of experiment `tracking.experiment`, created if missing, of the training kind.

    An experiment created by an older lmforge (or by hand) gets the kind tag on first use.
    """
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        kind = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        return client.create_experiment(cfg.tracking.experiment, tags=kind)
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def _standard_tags(sha: str, source: str, source_type: str, name: str) -> dict[str, str]:
    """MLflow's own tags: the UI's Source, commit and run-name fields."""
    return {
        "mlflow.source.git.commit": sha,
        "mlflow.source.name": source,
        "mlflow.source.type": source_type,
        "mlflow.runName": name,
    }


def _stage_tags(cfg: Config, stage: str) -> dict[str, str]:
    """Lineage tags of a stage's run (git, DVC, Prefect; the parent run when there is one)."""
    sha, dirty = git_commit(cfg.root)
    tags = {
        "lmforge.stage": stage,
        "lmforge.git_commit": sha,
        "lmforge.git_dirty": dirty,
        "lmforge.dvc_stage": os.environ.get("DVC_STAGE", ""),
        "lmforge.dvc_experiment": os.environ.get(DVC_EXP_ENV, ""),
        "lmforge.prefect_flow_run_id": os.environ.get(FLOW_RUN_ENV, ""),
        # run by the flow (a scheduled or triggered job) or by hand
        **_standard_tags(
            sha,
            f"pipeline.stages.{stage}",
            "JOB" if os.environ.get(FLOW_RUN_ENV) else "LOCAL",
            stage,
        ),
    }
    if os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    # strings only: a server's REST store rejects a bool tag (SQLite accepts it)
    return {k: str(v) for k, v in tags.items()}


def open_parent_run(
    cfg: Config, name: str, tags: Mapping[str, Any], source: str | None = None
) -> str | None:
    """Create the pipeline's parent run and return its id (None when tracking is off).

    Stage processes join it as children through `$LMFORGE_PARENT_RUN_ID`. `source` (the
    flow's module, e.g. flows.pipeline_flow) is the run's `mlflow.source.name`, else `name`.
    `tags` win over the defaults.
    """
    mlflow = mlflow_or_none() if cfg.tracking.enabled else None
    if mlflow is None:
        return None
    uri = tracking_uri(cfg)
    sha, dirty = git_commit(cfg.root)
    all_tags = {
        "lmforge.git_commit": sha,
        "lmforge.git_dirty": dirty,
        **_standard_tags(sha, source or name, "JOB", name),
        **tags,
    }
    with server_errors(uri):
        client = mlflow.MlflowClient(tracking_uri=uri)
        run = client.create_run(
            _experiment_id(client, cfg),
            run_name=name,
            tags={k: str(v) for k, v in all_tags.items()},
        )
        Tracker(client, run.info.run_id).log_params({"seed": cfg.seed, **cfg.to_dict()})
    return run.info.run_id


def close_run(cfg: Config, run_id: str | None, success: bool, metrics: Mapping[str, float]) -> None:
    """Log final metrics to a run opened by `open_parent_run` and mark it finished or failed.

    The metrics (e.g. each stage's seconds) and the outcome are also the run's description.
    """
    if run_id is None:
        return
    import mlflow

    uri = tracking_uri(cfg)
    with server_errors(uri):
        client = mlflow.MlflowClient(tracking_uri=uri)
        tracker = Tracker(client, run_id)
        tracker.log_metrics(metrics)
        tracker.flush()
        name = client.get_run(run_id).info.run_name
        tracker.describe(name, {"outcome": "succeeded" if success else "failed", **metrics})
        client.set_terminated(run_id, "FINISHED" if success else "FAILED")
