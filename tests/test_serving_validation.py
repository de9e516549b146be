"""The served model refuses what it does not know, with HTTP 400 naming the field.

One real `mlflow models serve` (--env-manager local) of a tiny random model, logged by the
register stage's own `log_model`, answers 25 bad requests of different kinds, then a good
one, which must equal the in-process TextGenerator's result: the server kept serving.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from serving_helpers import TINY_TEXTS, post, predictions, served_tiny_model, tiny_package

from pipeline.core.errors import LmforgeError
from pipeline.model.load import load_weights, save_weights
from pipeline.serve.package import LIBRARY_DIR, SERVING_PACKAGES
from pipeline.serve.publish import log_model
from pipeline.serve.textgen import DEFAULTS_FILE, MAX_PROMPTS, GenerationParams, TextGenerator
from pipeline.text.shards import write_meta
from pipeline.text.tokenizer import EOT, train_bpe


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[int, Path]:
    """(port, model package) of a model served once for the module."""
    with served_tiny_model(tmp_path_factory.mktemp("serve")) as (_, port, package):
        yield port, package


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
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
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


# Loads a logged model in a fresh interpreter where only the model's own code folder can
# provide `pipeline`: the editable install's finder (which maps `pipeline.*` to the checkout)
# is removed first, so a module serving needs but the model does not ship fails to import.
ISOLATED_LOAD = """
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(json.loads(sys.argv[2]), params=json.loads(sys.argv[3]))
import pipeline, pipeline.serve.export_hf, pipeline.serve.model_card, pipeline.serve.registry
used = sorted({n.split(".")[1] for n in sys.modules if n.startswith("pipeline.")})
print(json.dumps({"out": out, "file": pipeline.__file__, "used": used}))
"""


def logged(root: Path, package: Path) -> tuple[str, str]:
    """(tracking URI, model URI) of `package` logged by register's own `log_model`."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("code", str(root / "artifacts")))
    return uri, log_model(uri, run.info.run_id, package)


def test_logged_model_ships_only_the_serving_packages_and_serves_from_them(tmp_path):
    package = tiny_package(tmp_path / "package")
    uri, model_uri = logged(tmp_path, package)
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "dl")))
    shipped = local / "code" / "pipeline"
    assert sorted(p.name for p in shipped.iterdir()) == sorted(["__init__.py", *SERVING_PACKAGES])
    assert not list(shipped.rglob("__pycache__")) and not list(shipped.rglob("*.pyc"))
    for pkg in SERVING_PACKAGES:  # each package whole: every module of the checkout
        ours = {p.relative_to(LIBRARY_DIR) for p in (LIBRARY_DIR / pkg).rglob("*.py")}
        assert {p.relative_to(shipped) for p in (shipped / pkg).rglob("*.py")} == ours

    params = {"max_new_tokens": 5}
    args = [model_uri, json.dumps(["tom went to the park."]), json.dumps(params)]
    done = subprocess.run(
        [sys.executable, "-c", ISOLATED_LOAD, *args],
        cwd=tmp_path,  # not the checkout: `pipeline` is not importable from the working dir
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["file"].endswith("/code/pipeline/__init__.py")
    assert not answer["file"].startswith(str(LIBRARY_DIR))
    assert set(answer["used"]) <= set(SERVING_PACKAGES), answer["used"]
    defaults = GenerationParams.from_mapping(json.loads((package / DEFAULTS_FILE).read_text()))
    direct = TextGenerator.from_folder(package, defaults=defaults)
    assert answer["out"] == direct.complete(["tom went to the park."], params)


END = "<|end|>"  # a first special token other than the default <|endoftext|>


def end_token_package(dest: Path) -> Path:
    """A model package whose tokenizer separates documents with END (id 0), not EOT (id 1).

    Its meta.json names END, as the tokenizer stage writes it for
    `tokenizer.special_tokens: ["<|end|>", "<|endoftext|>"]`. The final LayerNorm's gain is
    zero, so every logit is 0 and greedy decoding (argmax: the first of equal values) emits
    id 0 at every step: a generator stops at once exactly when it stops at END.
    """
    package = tiny_package(dest)
    tok = train_bpe(TINY_TEXTS, vocab_size=300, special_tokens=[END, EOT], min_frequency=2)
    tok.save(str(package / "tokenizer.json"))
    meta = {
        "format_version": 1,
        "dtype": "uint16",
        "vocab_size": tok.get_vocab_size(),
        "eot_id": 0,
        "special_tokens": [END, EOT],  # id = position in this list
        "splits": {},
    }
    write_meta(package, meta)
    state = load_weights(package / "model.safetensors")
    state["ln_f.weight"] = torch.zeros_like(state["ln_f.weight"])
    save_weights(package / "model.safetensors", state)
    return package


def test_a_tokenizer_whose_first_special_token_is_not_endoftext_stops_at_it(tmp_path):
    package = end_token_package(tmp_path / "package")
    gen = TextGenerator.from_folder(package)
    assert gen.eot_id == 0 == gen.tokenizer.token_to_id(END)
    logits, _ = gen.model(torch.tensor([[0, 5, 6]]))  # (1, 3, V)
    assert torch.count_nonzero(logits) == 0  # so argmax = id 0 = END at every step
    params = {"max_new_tokens": 5, "return_full_text": False}
    assert gen.complete(["tom went"], params) == [""]  # stopped at END, not "<|end|>" x 5
    assert gen.complete(["tom went"], {"max_new_tokens": 5}) == ["tom went"]
    _, model_uri = logged(tmp_path, package)  # the logged model ships meta.json, and stops
    served = mlflow.pyfunc.load_model(model_uri)
    assert served.predict(["tom went", "lucy"], params=params) == ["", ""]


def test_meta_that_disagrees_with_the_tokenizer_is_refused_naming_it(tmp_path):
    package = end_token_package(tmp_path / "package")
    meta = json.loads((package / "meta.json").read_text())
    write_meta(package, {**meta, "special_tokens": ["<|eos|>"]})  # not in the tokenizer
    with pytest.raises(
        LmforgeError, match=r"meta\.json: eot_id 0 .*special_tokens\[0\] '<\|eos\|>'"
    ):
        TextGenerator.from_folder(package)
