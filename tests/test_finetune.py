"""Stage finetune: task data, SWA averaging, the method comparison and its outputs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import cfg_for, prepared_project
from torch.optim.swa_utils import AveragedModel

from pipeline.eval.comparison import comparison_markdown
from pipeline.stages import finetune, pretrain, synthesize, tokenizer, validate
from pipeline.text.task_data import IGNORE, tokenize
from pipeline.train import checkpoint as ckpt
from pipeline.train import finetune as ft

SMALL = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=128",
    "pretrain.micro_batch_size=4",
    "pretrain.tokens_per_step=512",
    "pretrain.max_steps=6",
    "pretrain.eval_interval=6",
    "pretrain.eval_batches=1",
    "finetune.max_steps=6",
    "finetune.micro_batch_size=4",
    "finetune.warmup_steps=2",
    "finetune.swa_start=0.5",
    "finetune.swa_anneal_steps=1",
    "finetune.eval_examples=8",
    "finetune.sharpness_steps=2",
    "finetune.hessian_iters=3",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    return prepared_project(
        tmp_path_factory.mktemp("ft"),
        ["synthesize.finetune_docs=60", *SMALL],
        [validate, synthesize, tokenizer, pretrain],
    )


def test_answers_are_the_only_labelled_positions(pretrained):
    from pipeline.text.tokenizer import encode_docs, load_tokenizer

    cfg = cfg_for(pretrained)
    tok = load_tokenizer(cfg.path("tokenizer") / "tokenizer.json")
    rows = [{"prompt": "Mia was in the park.\nQ: Where was Mia?\nA:", "answer": " the park"}]
    task = tokenize(tok, rows, eot_id=0, block_size=128)
    answer = encode_docs(tok, [" the park"])[0]
    labelled = [t for t in task.labels[0] if t != IGNORE]
    assert labelled == [*answer, 0]  # the answer, then end-of-text
    assert len(task.inputs[0]) == len(task.labels[0])
    # the label at each answer position is the next input token
    n = len(task.inputs[0])
    assert task.labels[0][n - len(answer) - 1 : n - 1] == task.inputs[0][n - len(answer) :]


def test_swa_weights_are_the_mean_of_the_snapshots(pretrained, monkeypatch):
    cfg = cfg_for(pretrained, "finetune.swa_ema=false")
    snapshots = []
    real_update = AveragedModel.update_parameters

    def record(self, model):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_update(self, model)

    monkeypatch.setattr(AveragedModel, "update_parameters", record)
    gcfg, weights = ft.load_pretrained(cfg)
    data = ft.task_data(cfg, gcfg, torch.device("cpu"))
    model = ft.train_method("swa", cfg, gcfg, weights, data, torch.device("cpu"))
    assert len(snapshots) == 3  # steps 3, 4, 5 of 6 with swa_start 0.5
    for name, value in model.state_dict().items():
        mean = torch.stack([s[name] for s in snapshots]).mean(0)
        torch.testing.assert_close(value, mean, rtol=1e-6, atol=1e-7)


def test_compare_runs_every_method_from_the_same_start(pretrained):
    cfg = cfg_for(pretrained, "finetune.compare=true", "finetune.method=sam")
    report = finetune.run(cfg)
    assert set(report["methods"]) == set(ft.METHODS)
    for r in report["methods"].values():
        assert 0 <= r["task_accuracy"] <= 1 and r["answer_loss"] > 0
        assert r["sharpness"] >= 0 and r["hessian_min_eig"] <= r["hessian_max_eig"]
        assert r["hessian_max_residual"] >= 0 and r["hessian_min_residual"] >= 0
        assert isinstance(r["hessian_converged"], bool) and "top_eigenvalue" not in r
    out = cfg.path("finetune")
    chosen = ckpt.load_weights(out / "model.safetensors")
    sam_copy = ckpt.load_weights(out / "methods" / "sam" / "model.safetensors")
    assert all(torch.equal(chosen[k], sam_copy[k]) for k in chosen)
    table = (cfg.path("reports") / "finetune.md").read_text()
    assert "| sam (moves on) |" in table and "| swa |" in table
    written = json.loads((cfg.path("reports") / "finetune.json").read_text())
    assert written["method"] == "sam" and written["flatness"] == report["flatness"]
    # what the numbers show, stated from the measured numbers, in the JSON and the markdown
    adamw = report["methods"]["adamw"]

    def pair(mine: float, theirs: float) -> str:
        # 3 significant digits, more (up to 7) when two different values would read the same
        digits = 3
        while digits < 7 and mine != theirs and f"{mine:.{digits}g}" == f"{theirs:.{digits}g}":
            digits += 1
        return f"{mine:.{digits}g} vs {theirs:.{digits}g}"

    for method in ("sam", "swa", "sam+swa"):
        r = report["methods"][method]
        eps = f"ε-sharpness ({pair(r['sharpness'], adamw['sharpness'])})"
        eig = (
            "the largest Hessian eigenvalue "
            f"({pair(r['hessian_max_eig'], adamw['hessian_max_eig'])})"
        )
        lower = (
            r["sharpness"] < adamw["sharpness"],
            r["hessian_max_eig"] < adamw["hessian_max_eig"],
        )
        expected = {
            (True, True): f"{method} is flatter than adamw by {eps} and by {eig}.",
            (False, False): f"{method} is NOT flatter than adamw by {eps} nor by {eig}.",
            (True, False): f"{method} is flatter than adamw by {eps} but NOT by {eig}.",
            (False, True): f"{method} is flatter than adamw by {eig} but NOT by {eps}.",
        }[lower]
        assert expected in report["flatness"] and f"- {expected}" in table
    # every negative smallest eigenvalue (beyond rounding) is named as not-a-minimum
    negative = next((s for s in report["flatness"] if "negative eigenvalue for" in s), "")
    for method, r in report["methods"].items():
        beyond_rounding = r["hessian_min_eig"] < -1e-4 * abs(r["hessian_max_eig"])
        assert (f" {method} (" in negative) == beyond_rounding, (method, r, negative)


def test_mlflow_gets_the_loss_curves_and_the_parent_the_comparison(
    pretrained, tmp_path, monkeypatch
):
    """The finetune run: plots/ with each method's loss curve and the comparison bars;
    the pipeline's parent run: the comparison bars too."""
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("matplotlib")
    from pipeline.core import plots
    from pipeline.ops import tracking

    monkeypatch.chdir(tmp_path)  # the sqlite store puts artifacts under ./mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = cfg_for(
        pretrained,
        "finetune.compare=true",
        "finetune.max_steps=4",  # the charts need a few steps, not a useful fine-tune
        "finetune.hessian_iters=2",
        "tracking.enabled=true",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "tracking.experiment=ft-plots",
    )
    drawn = {}  # file name -> {line label: x data}, read off each figure as it is saved
    real_save = plots.save_png

    def spy(fig, path):
        lines = [ln for ax in fig.axes for ln in ax.get_lines()]
        drawn[path.name] = {ln.get_label(): list(ln.get_xdata()) for ln in lines}
        return real_save(fig, path)

    monkeypatch.setattr(plots, "save_png", spy)
    parent = tracking.open_parent_run(cfg, "lm-pipeline", {})
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent)
    finetune.run(cfg)

    steps = list(range(cfg.finetune.max_steps))
    expected = {f"{m} train loss": steps for m in ft.METHODS}
    expected |= {f"{m} held-out loss": [steps[-1]] for m in ft.METHODS}
    assert drawn["finetune_loss.png"] == expected
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    (child,) = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent}'",
    )
    child_id = child.info.run_id

    def pngs(run_id: str) -> set[str]:
        found = {a.path for a in client.list_artifacts(run_id, "plots")}
        for name in found:  # each a real PNG, not an empty or text file
            local = Path(client.download_artifacts(run_id, name, str(tmp_path)))
            assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        return found

    assert pngs(child_id) == {"plots/finetune_loss.png", "plots/finetune_compare.png"}
    assert pngs(parent) == {"plots/finetune_compare.png"}


def test_comparison_markdown_states_flatter_and_not_flatter():
    """The sentences under the table come from the numbers in it, whichever way they point."""

    def numbers(sharpness: float, lmax: float, lmin: float) -> dict:
        return {
            "answer_loss": 1.0,
            "task_accuracy": 0.5,
            "sharpness": sharpness,
            "hessian_max_eig": lmax,
            "hessian_min_eig": lmin,
            "hessian_max_residual": 0.01,
            "hessian_min_residual": 0.02,
            "hessian_converged": True,
        }

    results = {
        "adamw": numbers(0.39, 386.0, 0.5),
        "sam": numbers(0.15, 68.0, 0.1),
        "swa": numbers(0.5, 400.0, -21.8),
    }
    md = comparison_markdown(results, "sam")
    assert "| sam (moves on) | 1.0000 | 0.500 | 0.15 | 68 | 0.1 | 0.01, 0.02 | yes |" in md
    assert (
        "- sam is flatter than adamw by ε-sharpness (0.15 vs 0.39) "
        "and by the largest Hessian eigenvalue (68 vs 386)."
    ) in md
    assert (
        "- swa is NOT flatter than adamw by ε-sharpness (0.5 vs 0.39) "
        "nor by the largest Hessian eigenvalue (400 vs 386)."
    ) in md
    assert "- The Hessian has a negative eigenvalue for swa (-21.8): those weights are not" in md
    assert "No negative Hessian eigenvalue for adamw and sam" in md


def test_methods_differ_but_each_is_deterministic(pretrained):
    cfg = cfg_for(pretrained)
    gcfg, weights = ft.load_pretrained(cfg)
    data = ft.task_data(cfg, gcfg, torch.device("cpu"))
    a = ft.train_method("adamw", cfg, gcfg, weights, data, torch.device("cpu"))
    b = ft.train_method("adamw", cfg, gcfg, weights, data, torch.device("cpu"))
    s = ft.train_method("sam", cfg, gcfg, weights, data, torch.device("cpu"))
    sd_a, sd_b, sd_s = a.state_dict(), b.state_dict(), s.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert any(not torch.equal(sd_a[k], sd_s[k]) for k in sd_a)


@pytest.mark.parametrize(
    ("overrides", "own_steps"),
    [
        ([], 3),  # swa_start 0.5 of 6 steps: adamw and sam train steps 3-5 of their own
        (["finetune.warmup_steps=5"], 3),  # still warming up at the branch: the rate too
        (["finetune.swa_start=0.0"], 6),  # they part at once: nothing is shared
    ],
)
def test_the_comparison_branches_adamw_and_sam_off_the_averaging_runs_bit_for_bit(
    pretrained, monkeypatch, overrides, own_steps
):
    """`train_methods` trains swa and sam+swa from step 0 and goes on from their state at
    swa_start as adamw and sam: the same weights and loss rows, bit for bit, as training
    each alone, with dropout on (its masks must pick up where they were) and replay on."""
    cfg = cfg_for(pretrained, *overrides)
    assert cfg.finetune.replay > 0
    gcfg, weights = ft.load_pretrained(cfg)
    gcfg = dataclasses.replace(gcfg, dropout=0.2)
    cpu = torch.device("cpu")
    data = ft.load_data(cfg, gcfg, cpu)
    steps = []
    real_step = ft._step

    def counted(*args, **kwargs):
        steps.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(ft, "_step", counted)
    methods = list(ft.METHODS)
    histories = {m: [] for m in methods}
    branched = {
        m: model.state_dict()
        for m, model in ft.train_methods(methods, cfg, gcfg, weights, data, cpu, histories)
    }
    assert list(branched) == ["swa", "adamw", "sam+swa", "sam"]
    assert len(steps) == 6 + own_steps + 6 + own_steps
    for method in methods:
        alone_history: list[dict[str, float]] = []
        alone = ft.train_method(method, cfg, gcfg, weights, data, cpu, alone_history)
        want = alone.state_dict()
        assert all(torch.equal(want[k], branched[method][k]) for k in want), method
        assert histories[method] == alone_history, method
        assert [r["step"] for r in alone_history] == list(range(6))
    swa, adamw = branched["swa"], branched["adamw"]
    assert any(not torch.equal(swa[k], adamw[k]) for k in swa)  # they did part
    # Only the comparison branches: one method alone trains all its steps.
    steps.clear()
    only = ft.train_methods(["adamw"], cfg, gcfg, weights, data, cpu, {"adamw": []})
    assert [m for m, _ in only] == ["adamw"] and len(steps) == 6


def test_fine_tuning_runs_in_pretrainings_dtype(pretrained):
    """`pretrain.dtype` bf16 (what `auto` is on a native-bf16 CPU): fine-tuning autocasts
    too, to bf16's precision of the fp32 result, and keeps fp32 weights."""
    device = torch.device("cpu")
    models, scores = {}, {}
    for dtype in ("float32", "bfloat16"):
        cfg = cfg_for(pretrained, f"pretrain.dtype={dtype}")
        assert ft.finetune_dtype(cfg, device) == getattr(torch, dtype)
        gcfg, weights = ft.load_pretrained(cfg)
        data = ft.task_data(cfg, gcfg, device)
        models[dtype] = ft.train_method("sam+swa", cfg, gcfg, weights, data, device)
        scores[dtype] = data.score(models[dtype])
    fp32, bf16 = (models[d].state_dict() for d in ("float32", "bfloat16"))
    assert {v.dtype for v in bf16.values()} == {torch.float32}  # autocast: fp32 masters
    assert any(not torch.equal(fp32[k], bf16[k]) for k in fp32)  # it did run in bf16
    want, got = scores["float32"]["answer_loss"], scores["bfloat16"]["answer_loss"]
    assert got == pytest.approx(want, rel=0.02)


def test_missing_pretrained_model_is_a_clear_error(project):
    with pytest.raises(
        ckpt.CheckpointError, match=r"model_config\.json: model not found; run `dvc repro pretrain`"
    ):
        finetune.run(cfg_for(project))


def _corpus_loss(model, cfg) -> float:
    """Mean LM loss on fixed batches of the validation shard (the pretraining objective)."""
    from pipeline.text.shards import read_meta, read_shard
    from pipeline.train.batches import sample_batch

    meta = read_meta(cfg.path("tokenizer"))
    val = read_shard(cfg.path("tokenizer") / meta["splits"]["val"]["file"], meta["splits"]["val"])
    T = model.config.block_size
    with torch.no_grad():
        model.eval()
        return sum(model(*sample_batch(val, 0, 0, i, 8, T))[1].item() for i in range(4)) / 4


def test_replay_keeps_the_language_model(pretrained):
    """Task-only fine-tuning at a high rate forgets the corpus; replay keeps it."""
    device = torch.device("cpu")
    losses = {}
    for replay in (0.0, 2.0):
        cfg = cfg_for(
            pretrained, "finetune.lr=0.01", "finetune.max_steps=25", f"finetune.replay={replay}"
        )
        gcfg, weights = ft.load_pretrained(cfg)
        data = ft.task_data(cfg, gcfg, device)
        assert (data.replay_batch is None) == (replay == 0)
        model = ft.train_method("adamw", cfg, gcfg, weights, data, device)
        losses[replay] = _corpus_loss(model, cfg)
    assert losses[2.0] < losses[0.0] - 0.1, losses
