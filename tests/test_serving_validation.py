"""The served model refuses what it does not know, with HTTP 400 naming the field.

One real `mlflow models serve` (--env-manager local) of a tiny random model, logged by the
register stage's own `log_model`, answers 20 bad requests of different kinds, then a good
one, which must equal the in-process TextGenerator's result: the server kept serving.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from serving_helpers import post, predictions, serve_model, stop, tiny_package

from pipeline.serve.textgen import DEFAULTS_FILE, MAX_PROMPTS, GenerationParams, TextGenerator
from pipeline.stages import register


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[int, Path]:
    """(port, model package) of a model served once for the module."""
    root = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    package = tiny_package(root / "package")
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("serving", str(root / "artifacts")))
    model_uri = register.log_model(uri, run.info.run_id, package)
    server, port = serve_model(model_uri, uri, root / "serve.log")
    try:
        yield port, package
    finally:
        stop(server)


PROMPT = ["tom went to the park."]
# (request body, field the error must name): each must get HTTP 400.
BAD_PARAMS = [
    ({"max_new_tokenz": 5}, "max_new_tokenz"),  # misspelled
    ({"top_q": 0.5, "max_new_tokens": 4}, "top_q"),  # unknown, next to a good one
    ({"max_new_tokens": "5"}, "max_new_tokens"),  # string for int
    ({"max_new_tokens": 5.5}, "max_new_tokens"),  # float for int
    ({"max_new_tokens": [5]}, "max_new_tokens"),  # list
    ({"max_new_tokens": None}, "max_new_tokens"),  # null
    ({"max_new_tokens": -3}, "max_new_tokens"),  # negative
    ({"max_new_tokens": 0}, "max_new_tokens"),  # zero
    ({"max_new_tokens": 10**6}, "max_new_tokens"),  # far beyond the context (was capped)
    ({"max_new_tokens": 33}, "max_new_tokens"),  # one past block_size=32
    ({"temperature": 0, "strategy": "sample"}, "temperature"),
    ({"temperature": -1.0, "strategy": "sample"}, "temperature"),
    ({"top_p": 1.5, "strategy": "sample"}, "top_p"),
    ({"top_k": -1, "strategy": "sample"}, "top_k"),
    ({"strategy": "nucleus"}, "strategy"),
    ({"num_beams": 0, "strategy": "beam"}, "num_beams"),
    ({"return_full_text": "yes"}, "return_full_text"),
]
BAD_INPUTS = [
    ([], "inputs"),  # empty
    ([1, 2], "inputs[0]"),  # not strings
    (["tom", {"text": "x"}], "inputs[1]"),
    (["tom"] * (MAX_PROMPTS + 1), "inputs"),  # too many prompts
]


def test_bad_requests_get_400_naming_the_field_and_the_server_keeps_serving(served):
    port, package = served
    answers = []
    for params, field in BAD_PARAMS:
        answers.append((params, field, *post(port, {"inputs": PROMPT, "params": params})))
    for inputs, field in BAD_INPUTS:
        answers.append((inputs, field, *post(port, {"inputs": inputs})))
    for request, field, status, body in answers:
        assert status == 400, (request, status, body)
        assert field in body["message"], (request, body["message"])

    status, body = post(port, None, raw=b'{"inputs": ["tom"], "params": {')  # malformed JSON
    assert status == 400 and "valid JSON" in body["message"], body
    status, body = post(port, None, content_type="text/plain", raw=b"tom went")
    assert status == 415 and "content type" in str(body).lower(), body  # MLflow's answer

    good = {"max_new_tokens": 5, "strategy": "beam", "num_beams": 2}
    defaults = GenerationParams.from_mapping(json.loads((package / DEFAULTS_FILE).read_text()))
    expected = TextGenerator.from_folder(package, defaults=defaults).complete(PROMPT, good)
    assert predictions(port, {"inputs": PROMPT, "params": good}) == expected
    assert expected[0].startswith(PROMPT[0]) and len(expected[0]) > len(PROMPT[0])
