"""MLflow Model Registry operations used by the register stage: versions, aliases, lookups.

Aliases carry the deployment state, not version stages (deprecated in MLflow 2.9+):
- `challenger`: the newest version that passed the quality gate and did not beat the
  champion (it is cleared when its version is promoted);
- `champion`: the version `models:/<name>@champion` serves.

Everything here takes an `MlflowClient`, so tests can point it at a throwaway SQLite store.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.core.errors import EXIT_TRANSIENT, LmforgeError, is_transient

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
MAX_DESCRIPTION = 5000  # the SQL stores cap model version descriptions at 5000 characters


class RegistryError(LmforgeError):
    """The registry could not answer (not "absent"); `exit_code` 75 when retrying may help."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient
        self.exit_code = EXIT_TRANSIENT if transient else 1


# Error codes of a registry that is there but failing for now (5xx, rate limits). A
# connection that fails outright is an MlflowException with INTERNAL_ERROR and the urllib3
# text ("Max retries exceeded ... Connection refused"), which is_transient also recognises.
_TRANSIENT_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)


def _registry_error(client: Any, what: str, exc: Exception) -> RegistryError:
    """The error to raise for a failed registry call, naming the registry and the call."""
    code = getattr(exc, "error_code", None)
    transient = is_transient(exc) or code in _TRANSIENT_CODES
    where = getattr(client, "_registry_uri", None) or "(registry URI unknown)"  # MlflowClient's
    kind = "unreachable or failing (transient; retry)" if transient else "refused the request"
    return RegistryError(f"model registry at {where} {kind} while {what}: {exc}", transient)


def _absent(exc: Exception) -> bool:
    """Whether an MlflowException says "does not exist" (not any other failure).

    Both stores, SQLAlchemy in-process and REST (the server sends the store's error code in
    its JSON body), answer RESOURCE_DOES_NOT_EXIST for a registered model or version that
    does not exist. A non-JSON 404 (e.g. a proxy's page) is ENDPOINT_NOT_FOUND: not absent.
    """
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def version_by_alias(client: Any, name: str, alias: str) -> Any | None:
    """The version of `name` holding `alias`, or None when the model or alias does not exist.

    Any other failure (server down, 5xx, permission) raises RegistryError: treating it as
    "no champion" would promote a new version without comparing it. The alias is looked up
    in the registered model's alias map, not with get_model_version_by_alias: for a missing
    alias the stores answer INVALID_PARAMETER_VALUE, the same code as a malformed request,
    so only its message would tell the two apart.
    """
    from mlflow.exceptions import MlflowException

    what = f"looking up alias {alias!r} of registered model {name!r}"
    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if _absent(e):
            return None
        raise _registry_error(client, what, e) from e
    version = (model.aliases or {}).get(alias)
    if version is None:
        return None
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        raise _registry_error(client, what, e) from e


def ensure_registered_model(client: Any, name: str, description: str) -> None:
    """Create the registered model on first use (no-op when it exists)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as e:
        if not _absent(e):
            raise _registry_error(client, f"looking up registered model {name!r}", e) from e
    client.create_registered_model(name, description=description)
    log.info("created registered model %r", name)


def create_version(
    client: Any, name: str, model_uri: str, run_id: str, tags: dict[str, str], description: str
) -> Any:
    """A new version of `name` from a logged model, with lineage tags and a description."""
    if len(description) > MAX_DESCRIPTION:
        cut = description[: MAX_DESCRIPTION - 80].rsplit("\n", 1)[0]
        description = cut + "\n\n... (truncated: MODEL_CARD.md in the model artifacts is whole)"
    # A tracking server (REST store) refuses a `models:/<model id>` source without its
    # model_id ("The model_id request parameter must identify the resource"); SQLite does not.
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    return client.create_model_version(
        name,
        source=model_uri,
        run_id=run_id,
        tags=tags,
        description=description,
        model_id=model_id,
    )


def promote(client: Any, name: str, version: str) -> None:
    """Point `champion` at `version` and clear `challenger` if it pointed there."""
    client.set_registered_model_alias(name, CHAMPION, version)
    challenger = version_by_alias(client, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == str(version):
        client.delete_registered_model_alias(name, CHALLENGER)


def stage_run_ids(
    client: Any, experiment_id: str, parent_run_id: str | None, stages: tuple[str, ...]
) -> dict[str, str]:
    """MLflow run id of the run that produced each stage's current outputs.

    A stage that ran under this pipeline's parent run is that child run; a stage DVC skipped
    (its outputs were up to date) is the latest finished run of that stage in the experiment.
    """
    found: dict[str, str] = {}
    if parent_run_id:
        children = client.search_runs(
            [experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
            order_by=["attributes.start_time DESC"],
        )
        for r in children:
            found.setdefault(r.data.tags.get("lmforge.stage", ""), r.info.run_id)
    for stage in stages:
        if stage in found:
            continue
        latest = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`lmforge.stage` = '{stage}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if latest:
            found[stage] = latest[0].info.run_id
    return {s: found[s] for s in stages if s in found}


def download_package(model_uri: str, dest: Path) -> Path:
    """Download a registered lmforge model and return its model package folder.

    `model_uri` is any MLflow model URI (`models:/name@champion`, `models:/name/3`,
    `runs:/<id>/model`); the package is the pyfunc's `package` artifact.
    """
    import mlflow
    import yaml

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest)))
    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        raise LmforgeError(f"{model_uri}: no MLmodel file; not an MLflow model")
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function")
    artifacts = (flavor or {}).get("artifacts") or {}
    if "package" not in artifacts:
        raise LmforgeError(
            f"{model_uri}: not an lmforge model (its pyfunc has no 'package' artifact; "
            "register it with `dvc repro register`)"
        )
    return local / artifacts["package"]["path"]
