"""The MLflow pyfunc of a registered lmforge model ("models from code": nothing is pickled).

MLflow stores this file with the model and runs it when the model is loaded, so the model
is a script plus files, never a pickled torch module. The artifacts are one model package
(pipeline/serve/textgen.py): the safetensors weights, the tokenizer and the resolved config.

    mlflow models serve -m models:/lmforge-gpt@champion --env-manager local -p 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"inputs": ["once upon a time"], "params": {"max_new_tokens": 20}}'

A bad request (an unknown or misspelled param, a wrong type, a value out of range, prompts
that are not 1..64 strings) gets HTTP 400 with a message naming the field; the bounds are
those of `pipeline.serve.textgen`, shared with `lmforge generate`.

Do not import this module from library code: its last line registers the model with MLflow.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import threading
import weakref
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.pyfunc.context import get_prediction_context

from pipeline.core.errors import LmforgeError
from pipeline.serve.textgen import DEFAULTS_FILE, GenerationParams, TextGenerator

PACKAGE_ARTIFACT = "package"  # the artifacts key of the model package folder

# Why the model needs help to see unknown params. MLflow's PyFuncModel.predict runs
# `mlflow.models.utils._enforce_params_schema` before our `predict`: it keeps only the keys
# of the params schema (inferred from the input example) and drops the others with a log
# warning ("Unrecognized params [...] are ignored"). Nothing else of the request reaches the
# model, so `{"params": {"max_new_tokenz": 5}}` would silently decode with the defaults.
# That warning is the one trace of the dropped keys: a filter on MLflow's logger turns it
# into a record of the keys, kept per prediction call (the `Context` MLflow opens for each
# `PyFuncModel.predict` call, in the thread that serves the request), and `predict` refuses
# the request. The filter fails closed: a warning of that function it cannot parse still
# rejects the request, with MLflow's own text.
# Other routes do not exist in MLflow 3.17: a ParamSpec receives only its own key (so no
# schema entry can catch undeclared ones), and the scoring server hands the model nothing
# else of the request. Unknown top-level request keys (e.g. "parms") are dropped by the
# scoring server itself, without a trace, and stay out of the model's reach.
_ENFORCER_LOGGER = "mlflow.models.utils"
_ENFORCER_FUNC = "_enforce_params_schema"
_UNRECOGNIZED = "Unrecognized params "
_MARKER = "lmforge_dropped_params"  # attribute that marks our filter on the logger


class InvalidRequest(LmforgeError, MlflowException):
    """A bad generation request: HTTP 400 from the scoring server, exit 1 from the CLI.

    MlflowException with INVALID_PARAMETER_VALUE is what the scoring server maps to 400 with
    our message (any other exception becomes a generic "unexpected error"); LmforgeError is
    what `lmforge generate` prints without a traceback.
    """

    def __init__(self, message: str) -> None:
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)


def _listed_keys(text: str) -> list[str] | None:
    """The keys of "Unrecognized params ['a', 'b'] are ignored ...", or None."""
    if not text.startswith(_UNRECOGNIZED) or " are ignored" not in text:
        return None
    listed = text[len(_UNRECOGNIZED) : text.index(" are ignored")]
    try:
        keys = ast.literal_eval(listed)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return sorted(str(k) for k in keys) if isinstance(keys, list) and keys else None


class _DroppedParams(logging.Filter):
    """Records, per prediction call, the request params MLflow dropped as unknown."""

    lmforge_dropped_params = True  # the _MARKER attribute

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        # Keyed by id() of the call's Context (a dataclass, so not hashable), with a
        # finalizer that drops the entry when the Context dies: an entry lives as long as
        # its call, and concurrent requests (each in its own thread and Context) never see
        # each other's keys.
        self._by_call: dict[int, list[str]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.funcName != _ENFORCER_FUNC or record.levelno < logging.WARNING:
            return True
        call = get_prediction_context()
        if call is None:
            return True  # not inside PyFuncModel.predict: nothing to attach it to
        text = record.getMessage()
        if text.startswith("Keys in parameters should be of type `str`"):
            return True  # MLflow converts the keys and goes on; unknown ones warn next
        keys = _listed_keys(text) or [text]  # fail closed: MLflow's words if unreadable
        with self._lock:
            if id(call) not in self._by_call:
                weakref.finalize(call, self._forget, id(call))
            self._by_call[id(call)] = keys
        return False  # "ignored" would be false: the request is refused instead

    def pop(self) -> list[str]:
        """The keys dropped in the current prediction call (and forget them)."""
        call = get_prediction_context()
        if call is None:
            return []
        return self._forget(id(call))

    def _forget(self, call_id: int) -> list[str]:
        with self._lock:
            return self._by_call.pop(call_id, None) or []


def _watch_dropped_params() -> _DroppedParams:
    """The one filter on MLflow's logger (attached on first use), made sure to see records.

    MLflow runs this file anew for every model it loads, so each run has its own class: the
    filter is found by its marker attribute, and every model of the process shares it (the
    first filter on the logger consumes the record).
    """
    logger = logging.getLogger(_ENFORCER_LOGGER)
    found = [f for f in logger.filters if getattr(f, _MARKER, False)]
    if found:
        watcher = found[0]
    else:
        watcher = _DroppedParams()
        logger.addFilter(watcher)
    # A logger filter only runs for records the logger emits: a higher level (e.g.
    # MLFLOW_LOGGING_LEVEL=ERROR) or a disabled logger would silence the one trace.
    logger.disabled = False
    if not logger.isEnabledFor(logging.WARNING):
        logger.setLevel(logging.WARNING)
    return watcher  # type: ignore[return-value]  # same interface, maybe another run's class


class LmforgeTextModel(PythonModel):
    """predict(list of prompts, params) -> list of generated texts, one per prompt."""

    def load_context(self, context: PythonModelContext) -> None:
        folder = Path(context.artifacts[PACKAGE_ARTIFACT])
        defaults_path = folder / DEFAULTS_FILE
        defaults = GenerationParams.from_mapping(
            json.loads(defaults_path.read_text()) if defaults_path.is_file() else {}
        )
        self.generator = TextGenerator.from_folder(folder, defaults=defaults)
        self.dropped = _watch_dropped_params()

    def predict(
        self,
        context: PythonModelContext | None,
        model_input: list[Any],
        params: dict[str, Any] | None = None,
    ) -> list[str]:
        """One generated text per prompt of `model_input` (a list of 1..64 strings).

        `list[Any]`, not `list[str]`: MLflow checks the type hint before `predict`, and its
        error for a non-string does not name the request field; `check_request` does
        (`inputs[2]: expected a string`). (A bare `Any` is not a hint MLflow supports: it
        would log the model without a signature, so without a params schema.)
        """
        dropped = self.dropped.pop()
        if dropped:
            known = [f.name for f in dataclasses.fields(GenerationParams)]
            raise InvalidRequest(
                f"params: unknown generation parameter(s) {dropped}; expected some of {known}"
            )
        try:
            prompts, gp = self.generator.check_request(model_input, params)
        except LmforgeError as e:
            raise InvalidRequest(str(e)) from None
        return self.generator.complete_checked(prompts, gp)


mlflow.models.set_model(LmforgeTextModel())
