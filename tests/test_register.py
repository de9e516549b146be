"""Stage register: quality gate, versions and aliases, model card, serving, generate, export.

One small project is trained up to `evaluate` once for the module; each test then registers
into its own throwaway SQLite MLflow store.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import cfg_for, prepared_project
from serving_helpers import predictions, serve_model, stop
from test_evaluate import SMALL
from typer.testing import CliRunner

from flows.cli import app
from pipeline.serve import registry
from pipeline.serve.gate import check_gate
from pipeline.serve.package import SERVING_PACKAGES
from pipeline.serve.textgen import TextGenerator
from pipeline.stages import evaluate, finetune, pretrain, register, synthesize, tokenizer, validate
from pipeline.train import checkpoint as ckpt

NAME = "lmforge-test"
PERMISSIVE = [
    "register.gate.max_test_bits_per_byte=100.0",
    "register.gate.max_ece=1.0",
    "register.gate.min_task_accuracy=0.0",
    "register.compare_docs=20",
    "register.decoding.max_new_tokens=12",
    f"register.model_name={NAME}",
]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    return prepared_project(
        tmp_path_factory.mktemp("reg"),
        ["synthesize.finetune_docs=40", *SMALL],
        [validate, synthesize, tokenizer, pretrain, finetune, evaluate],
    )


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh MLflow store for one test (MLFLOW_TRACKING_URI wins over params.yaml)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root ./mlruns lands here
    mlflow.set_tracking_uri(uri)
    return uri


def run_register(root: Path, *overrides: str) -> dict:
    """register.json (the gate and decision) merged with the registry's answer, if any."""
    returned = register.run(cfg_for(root, "tracking.enabled=true", *PERMISSIVE, *overrides))
    report = json.loads((root / "reports" / "register.json").read_text())
    version_file = root / "reports" / register.VERSION_FILE
    if report["registered"]:
        report |= json.loads(version_file.read_text())
    else:
        assert not version_file.exists()  # no stale version left for the summary
    assert returned["registered"] == report["registered"]
    return report


def aliases(client) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}


def with_noisy_weights(root: Path, scale: float) -> Path:
    """A copy of the project whose fine-tuned weights carry Gaussian noise: a worse model."""
    noisy = root.parent / f"noisy-{scale}"
    if not noisy.exists():
        shutil.copytree(root, noisy)
        path = noisy / "models" / "finetune" / "model.safetensors"
        gen = torch.Generator().manual_seed(0)
        state = {
            k: v + scale * torch.randn(v.shape, generator=gen)
            for k, v in ckpt.load_weights(path).items()
        }
        ckpt.save_weights(path, state)
    return noisy


def test_versions_and_aliases(evaluated, store):
    """v1 (worse) -> champion; v2 (better) beats it -> champion; v3 (worse) stays challenger."""
    client = mlflow.MlflowClient(store)
    worse = with_noisy_weights(evaluated, 0.5)

    first = run_register(worse)
    assert first["registered"] and first["version"] == "1" and first["alias"] == "champion"
    assert first["comparison"]["champion_version"] is None
    assert aliases(client) == {"champion": "1"}  # the first version is champion at once

    second = run_register(evaluated)
    comparison = second["comparison"]
    assert second["version"] == "2" and second["alias"] == "champion"
    assert comparison["champion_version"] == "1"
    assert comparison["challenger_bits_per_byte"] < comparison["champion_bits_per_byte"]
    assert aliases(client) == {"champion": "2"}  # challenger cleared when promoted

    third = run_register(worse)
    assert third["version"] == "3" and third["alias"] == "challenger"
    assert third["comparison"]["promoted"] is False
    assert aliases(client) == {"champion": "2", "challenger": "3"}


def test_equal_model_does_not_replace_champion(evaluated, store):
    run_register(evaluated)
    dvc_metrics = (evaluated / "reports" / "register.json").read_text()
    again = run_register(evaluated)  # same weights: not better by more than the margin (0)
    # The DVC metrics file holds no registry state: a reproduced run gives the same file.
    assert (evaluated / "reports" / "register.json").read_text() == dvc_metrics
    assert again["alias"] == "challenger"
    c = again["comparison"]
    assert c["challenger_bits_per_byte"] == pytest.approx(c["champion_bits_per_byte"])


def test_failing_gate_registers_nothing(evaluated, store):
    client = mlflow.MlflowClient(store)
    run_register(evaluated)
    report = run_register(evaluated, "register.gate.max_test_bits_per_byte=0.01")
    assert report["registered"] is False
    assert report["gate"]["failed"] == ["test_bits_per_byte"]
    assert "test_bits_per_byte" in report["reason"] and "0.01" in report["reason"]
    assert [str(v.version) for v in client.search_model_versions(f"name='{NAME}'")] == ["1"]


def test_gate_fails_when_a_figure_is_missing(evaluated):
    cfg = cfg_for(evaluated, *PERMISSIVE)
    report = json.loads((evaluated / "reports" / "evaluate.json").read_text())
    report["task_accuracy"] = None
    gate = check_gate(report, cfg.register.gate)
    assert not gate["passed"] and gate["failed"] == ["task_accuracy"]


def test_tracking_off_writes_report_and_exits_cleanly(evaluated):
    register.run(cfg_for(evaluated, *PERMISSIVE))  # the project has tracking.enabled=false
    report = json.loads((evaluated / "reports" / "register.json").read_text())
    assert report["registered"] is False and "tracking.enabled is false" in report["reason"]
    assert report["gate"]["passed"] is True


def test_missing_evaluation_names_the_file(tmp_path):
    from conftest import make_project

    from pipeline.core.errors import LmforgeError

    root = make_project(tmp_path / "empty")
    with pytest.raises(LmforgeError, match=r"evaluate\.json: not found; run `dvc repro evaluate`"):
        register.run(cfg_for(root))


def test_version_carries_card_tags_and_no_pickle(evaluated, store):
    client = mlflow.MlflowClient(store)
    run_register(evaluated)
    mv = client.get_model_version(NAME, "1")
    evaluation = json.loads((evaluated / "reports" / "evaluate.json").read_text())
    bpb = evaluation["test"]["bits_per_byte"]
    # The model card is the version description and a file of the model; it has the table.
    assert "## Evaluation" in mv.description and f"{bpb:.4g}" in mv.description
    for key in ("git_commit", "data_digest", "tokenizer_digest", "mlflow_run_id.register"):
        assert key in mv.tags
    meta = json.loads((evaluated / "data" / "tokenizer" / "meta.json").read_text())
    assert mv.tags["tokenizer_corpus_digest"] == meta["train_corpus_digest"]
    assert mv.tags["mlflow_run_id.register"] == mv.run_id
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path="dl"))
    files = {p.name for p in local.rglob("*")}
    assert "MODEL_CARD.md" in files and "model.safetensors" in files
    assert not any(f.endswith((".pkl", ".pt", ".pth")) for f in files), files
    mlmodel = (local / "MLmodel").read_text()
    assert "mlflow.pyfunc.loaders.code_model" in mlmodel and "max_new_tokens" in mlmodel
    # The package ships the tokenizer's meta.json (it names the end-of-text token) and only
    # the library packages serving imports.
    assert "meta.json" in files
    shipped = {p.name for p in (local / "code" / "pipeline").iterdir()}
    assert shipped == {"__init__.py", *SERVING_PACKAGES}
    # A card longer than the stores' 5000 characters is cut at a line in the description,
    # and says so; the file in the artifacts is whole.
    whole = next(local.rglob("MODEL_CARD.md")).read_text()
    assert len(mv.description) <= registry.MAX_DESCRIPTION
    if len(whole) > registry.MAX_DESCRIPTION:
        kept, note = mv.description.split("\n\n... (truncated", 1)
        assert whole.startswith(kept + "\n") and "MODEL_CARD.md" in note
    else:
        assert mv.description == whole


def test_pyfunc_predicts_like_the_generator(evaluated, store):
    run_register(evaluated)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    prompts = ["tom went to the park.", "lucy"]
    direct = TextGenerator.from_folder(
        evaluated / "models" / "finetune", evaluated / "data" / "tokenizer" / "tokenizer.json"
    )
    params = {"max_new_tokens": 12}
    assert model.predict(prompts, params=params) == direct.complete(prompts, params)
    sampled = model.predict(prompts, params={"strategy": "sample", "seed": 3, "top_k": 5})
    assert all(s.startswith(p) for s, p in zip(sampled, prompts, strict=True))


def test_lmforge_generate(evaluated, store):
    run_register(evaluated)
    runner = CliRunner()
    result = runner.invoke(
        app, ["generate", "--model", f"models:/{NAME}@champion", "--max-new-tokens", "8", "tom"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tom")
    folder = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(evaluated / "models" / "finetune"),
            "--tokenizer",
            str(evaluated / "data" / "tokenizer" / "tokenizer.json"),
            "--max-new-tokens",
            "8",
            "tom",
        ],
    )
    assert folder.exit_code == 0 and folder.output == result.output  # same model, same text
    missing = runner.invoke(app, ["generate", "--model", "models:/no-such-model@champion", "x"])
    assert missing.exit_code == 1 and "no-such-model" in missing.output


def test_export_from_registry(evaluated, store, tmp_path):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is optional (pip install 'lmforge[hf]')"
    )
    run_register(evaluated)
    out = tmp_path / "hf"
    result = CliRunner().invoke(
        app, ["export", "--format", "hf", "--model", f"models:/{NAME}@champion", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    hf = transformers.GPT2LMHeadModel.from_pretrained(out, local_files_only=True).eval()
    ours = TextGenerator.from_folder(
        evaluated / "models" / "finetune", evaluated / "data" / "tokenizer" / "tokenizer.json"
    ).model
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)[0]).abs().max().item()
    assert diff < 1e-4


@pytest.mark.slow
def test_mlflow_models_serve_concurrent_requests(evaluated, store, tmp_path):
    """A real `mlflow models serve` answers concurrent requests, each with its own result."""
    run_register(evaluated)
    server, port = serve_model(f"models:/{NAME}@champion", store, tmp_path / "serve.log")
    try:
        direct = TextGenerator.from_folder(
            evaluated / "models" / "finetune", evaluated / "data" / "tokenizer" / "tokenizer.json"
        )
        requests = [
            (["tom went to the park."], {"max_new_tokens": 10}),
            (["lucy", "max found a ball."], {"max_new_tokens": 6}),
            (["tom went to the park."], {"strategy": "sample", "seed": 1, "max_new_tokens": 10}),
            (["tom went to the park."], {"strategy": "sample", "seed": 2, "max_new_tokens": 10}),
            (["a dog"], {"strategy": "beam", "num_beams": 3, "max_new_tokens": 8}),
            (["lucy"], {"return_full_text": False, "max_new_tokens": 6}),
        ] * 2
        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(
                pool.map(lambda r: predictions(port, {"inputs": r[0], "params": r[1]}), requests)
            )
        for (prompts, params), got in zip(requests, answers, strict=True):
            assert got == direct.complete(prompts, params), (prompts, params)
        assert answers[0][0].startswith("tom went to the park.") and len(answers[0][0]) > 21
    finally:
        stop(server)
