"""The MLflow pyfunc of a registered lmforge model ("models from code": nothing is pickled).

MLflow stores this file with the model and runs it when the model is loaded, so the model
is a script plus files, never a pickled torch module. The artifacts are one model package
(pipeline/serve/textgen.py): the safetensors weights, the tokenizer and the resolved config.

    mlflow models serve -m models:/lmforge-gpt@champion --env-manager local -p 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"inputs": ["once upon a time"], "params": {"max_new_tokens": 20}}'

A bad request (an unknown or misspelled param, a wrong type, a value out of range, prompts
that are not 1..64 strings) gets HTTP 400 with a message naming the field; the bounds are
those of `pipeline.serve.textgen`, shared with `lmforge generate`. In the server, the body
itself is checked first (`check_request_body`): a Content-Type other than application/json
gets 415, a body over MAX_REQUEST_BYTES 413; one that is not UTF-8, not JSON, not an object,
or has an unknown top-level field gets 400 saying which, never echoing the body back. A
prompt longer than the context keeps its last block_size - max_new_tokens + 1 tokens (the
model cannot see further back); the answer still starts with the whole prompt.

Do not import this module from library code: its last line registers the model with MLflow.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import os
import sys
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
from pipeline.serve.textgen import (
    DEFAULTS_FILE,
    MAX_PROMPT_CHARS,
    MAX_PROMPTS,
    PROMPTS_FIELD,
    GenerationParams,
    TextGenerator,
)

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
# scoring server itself, without a trace: in the server, `check_request_body` refuses them.
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

    def __init__(self, message: str, http_status: int = 400) -> None:
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)
        self.http_status = http_status  # 413/415 only from `check_request_body`, in the server


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


# The request, checked before MLflow's scoring server reads it. Why: MLflow 3.17's
# /invocations (mlflow/pyfunc/scoring_server) reads the whole body into memory (neither it
# nor uvicorn has a size limit); its JSON reader puts the repr of the error *and the whole
# body* into the 400 message (a 50 MB body that was not UTF-8 came back as a 500 MB
# answer); it drops unknown top-level keys ("parms") without a trace; a request without a
# Content-Type header, or nested JSON deep enough to overflow the parser's recursion, was an
# HTTP 500; and a prediction error came back prefixed with the whole input ("Failed to
# predict data '<input>'"). The model cannot reach the request any other way, so in the
# server process its `invocations` function (looked up by name for every request) is
# wrapped: `check_request_body` checks the content type, the body and the whole request
# (prompts and params) first, and a bad one gets a short message naming what is wrong:
# 413 (too large), 415 (content type), 400 (the rest). The model's own `predict` still
# checks everything (in-process callers).
# The largest valid body: every prompt at its longest, each character JSON-escaped at its
# widest (a non-BMP character is two \uXXXX escapes: 12 bytes), plus 64 KiB for the rest.
MAX_REQUEST_BYTES = MAX_PROMPTS * MAX_PROMPT_CHARS * 12 + 65_536
JSON_TYPE = "application/json"
REQUEST_FIELDS = (PROMPTS_FIELD, "params")
_EXPECTED = f'{{"inputs": [<1 to {MAX_PROMPTS} prompt strings>], "params": {{...}}}}'
_SERVER_MODULE = "mlflow.pyfunc.scoring_server"
_WRAPPED = "invocations"  # scoring_server.invocations(data, content_type, model, schema)


def _body_text(body: bytes | str) -> str:
    """The body as text: refused when too large (413) or not UTF-8 (the bad byte's offset)."""
    if len(body) > MAX_REQUEST_BYTES:
        raise InvalidRequest(
            f"request body: {len(body)} bytes, more than the {MAX_REQUEST_BYTES} this model "
            f"accepts ({MAX_PROMPTS} prompts of at most {MAX_PROMPT_CHARS} characters)",
            http_status=413,
        )
    if isinstance(body, str):
        return body
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(
            f"request body: not valid UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start}: "
            f"{e.reason}); expected a UTF-8 JSON object {_EXPECTED}"
        ) from None


def _parse_json(text: str) -> Any:
    """The JSON value of `text`; an error gives the parser's reason and position, not the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        raise InvalidRequest(
            f"request body: not valid JSON ({e.msg}, {where}); expected {_EXPECTED}"
        ) from None
    except RecursionError:
        raise InvalidRequest(
            f"request body: JSON nested too deeply; expected {_EXPECTED}"
        ) from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise InvalidRequest(f"request body: {str(e)[:200]}; expected {_EXPECTED}") from None


def check_request_body(
    body: bytes | str, content_type: str | None, generator: TextGenerator
) -> dict[str, Any]:
    """The JSON object of a request, with its prompts and params checked.

    Raises InvalidRequest naming the problem: the content type (415), the size (413), the
    UTF-8 offset, the JSON position, an unknown or missing top-level field, or the first bad
    prompt or param (400).
    """
    mime = (content_type or "").split(";")[0].strip()
    if mime != JSON_TYPE:
        got = f"{content_type[:100]!r}" if content_type else "no Content-Type header"
        raise InvalidRequest(
            f"content type: expected {JSON_TYPE} with a body {_EXPECTED}, got {got}",
            http_status=415,
        )
    request = _parse_json(_body_text(body))
    if not isinstance(request, dict):
        kind = type(request).__name__
        raise InvalidRequest(f"request body: expected a JSON object {_EXPECTED}, got a {kind}")
    unknown = sorted(set(request) - set(REQUEST_FIELDS))
    if unknown:
        shown = [k[:60] for k in unknown[:10]]
        raise InvalidRequest(
            f"request body: unknown field(s) {shown}; expected {list(REQUEST_FIELDS)}"
        )
    if PROMPTS_FIELD not in request:
        raise InvalidRequest(f"request body: field {PROMPTS_FIELD!r} missing; expected {_EXPECTED}")
    try:
        generator.check_request(request[PROMPTS_FIELD], request.get("params"))
    except LmforgeError as e:
        raise InvalidRequest(str(e)) from None
    return request


def _guard_scoring_server(generator: TextGenerator) -> None:
    """In a `mlflow models serve` process, check every request with `check_request_body`.

    Only there: the scoring server module is loaded and its model-path variable is set.
    """
    server = sys.modules.get(_SERVER_MODULE)
    if server is None or not os.environ.get(getattr(server, "_SERVER_MODEL_PATH", "")):
        return
    original = getattr(server, _WRAPPED, None)
    answer = getattr(server, "InvocationsResponse", None)
    if not callable(original) or answer is None:  # another MLflow: the model's checks only
        logging.getLogger(__name__).warning(
            "%s.%s not found: requests reach MLflow unchecked", _SERVER_MODULE, _WRAPPED
        )
        return

    def invocations(data: Any, content_type: str | None, *rest: Any) -> Any:
        try:
            check_request_body(data, content_type, generator)
        except InvalidRequest as e:
            return answer(response=e.serialize_as_json(), status=e.http_status, mimetype=JSON_TYPE)
        return original(data, content_type, *rest)

    setattr(server, _WRAPPED, invocations)


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
        _guard_scoring_server(self.generator)

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
