"""The scaling-law sweep: the fit, the grid and its isolation from the main pipeline, bad
input, and one end-to-end run of the Prefect flow on a tiny story-world project."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cfg_for, make_project, prepared_project

from pipeline.core.errors import LmforgeError
from pipeline.core.io import tree_md5
from pipeline.sweep import grid, inputs, report
from pipeline.sweep.fit import SweepError, fit_scaling_law, predict

TRUE = {"E": 1.1, "A": 40.0, "alpha": 0.35, "B": 30.0, "beta": 0.3}


def law(N, D, p=TRUE):
    return p["E"] + p["A"] / np.asarray(N) ** p["alpha"] + p["B"] / np.asarray(D) ** p["beta"]


def nd_grid(n_sizes: int = 5, n_budgets: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """N in [1e4, 1e6] x D in [1e5, 1e7], log-spaced: shapes (n_sizes * n_budgets,)."""
    n = np.geomspace(1e4, 1e6, n_sizes)
    d = np.geomspace(1e5, 1e7, n_budgets)
    return np.repeat(n, n_budgets), np.tile(d, n_sizes)


# --------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------


def test_fit_recovers_known_parameters_from_noisy_data():
    N, D = nd_grid()
    L = law(N, D) + np.random.default_rng(0).normal(0, 1e-3, N.size)  # ~1 mbit/byte noise
    fit = fit_scaling_law(N, D, L)
    assert fit["E"] == pytest.approx(TRUE["E"], abs=0.02)
    assert fit["alpha"] == pytest.approx(TRUE["alpha"], abs=0.02)
    assert fit["beta"] == pytest.approx(TRUE["beta"], abs=0.02)
    assert fit["A"] == pytest.approx(TRUE["A"], rel=0.1)
    assert fit["B"] == pytest.approx(TRUE["B"], rel=0.1)
    assert fit["r2"] > 0.9999 and fit["rmse"] < 2e-3
    assert fit["dof"] == N.size - 5 and not fit["at_bound"]
    assert all(v is not None and v > 0 for v in fit["stderr"].values())
    res = fit["residuals"]
    assert len(res) == N.size
    assert all(math.isclose(r["residual"], r["loss"] - r["fit"]) for r in res)
    assert np.allclose(predict(fit, N, D), [r["fit"] for r in res])


def test_fit_is_exact_on_a_noiseless_3x3_grid_like_the_sweep():
    N = np.repeat([2e4, 1e5, 5e5], 3)
    D = np.tile([2e4, 4e4, 8e4], 3)
    names = [f"p{i}" for i in range(9)]
    fit = fit_scaling_law(N.tolist(), D.tolist(), law(N, D).tolist(), names)
    for key, value in TRUE.items():
        assert fit[key] == pytest.approx(value, rel=1e-4), key
    assert [r["point"] for r in fit["residuals"]] == names


@pytest.mark.parametrize(
    ("N", "D", "L", "match"),
    [
        ([1, 2, 3, 4], [1, 2, 3, 4], [3.0, 2.0, 1.5, 1.2], "4 distinct .* need at least 5"),
        ([1, 1, 2, 2, 3, 3], [5, 5, 6, 6, 7, 7], [3, 3, 2, 2, 1, 1], "3 distinct"),
        ([0, 2, 3, 4, 5], [1, 2, 3, 4, 5], [3.0, 2.0, 1.5, 1.2, 1.1], r"N \(parameters\)"),
        ([1, 2, 3, 4, 5], [1, -2, 3, 4, 5], [3.0, 2.0, 1.5, 1.2, 1.1], r"D \(tokens\)"),
        ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [3.0, float("nan"), 1.5, 1.2, 1.1], "loss .* nan"),
        ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [3.0, 2.0, 1.5, 1.2], "equal lengths"),
        ([7] * 6, [1, 2, 3, 4, 5, 6], [3.0, 2.0, 1.5, 1.2, 1.1, 1.0], "2 distinct model sizes"),
    ],
)
def test_fit_rejects_bad_input_clearly(N, D, L, match):
    with pytest.raises(LmforgeError, match=match):
        fit_scaling_law(N, D, L)


def test_bad_point_is_named_in_the_error():
    with pytest.raises(SweepError, match="point b: loss"):
        fit_scaling_law([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [3, math.inf, 2, 1, 1], list("abcde"))


# --------------------------------------------------------------------------------------
# The grid and its isolation
# --------------------------------------------------------------------------------------


def test_grid_points_write_only_to_their_own_folders(tmp_path):
    root = make_project(tmp_path / "proj")  # the ci preset: 3 sizes x 3 budgets
    cfg = cfg_for(root)
    points = grid.expand_grid(cfg)
    assert len(points) == 9 and len({p.name for p in points}) == 9
    grid.check_isolated(cfg, points)
    main = {(root / v).resolve() for v in dataclasses.asdict(cfg.paths).values()}
    main_report = cfg.path("reports") / "pretrain.json"
    seen: set[Path] = set()
    for p in points:
        pc = cfg_for(root, *grid.point_overrides(p, cfg))
        mine = [pc.path("pretrain"), pc.path("checkpoints"), pc.path("reports")]
        assert not {m.resolve() for m in mine} & main
        assert not {m.resolve() for m in mine} & seen  # no two points share a folder
        seen |= {m.resolve() for m in mine}
        assert pc.path("reports") / "pretrain.json" != main_report
        assert (pc.model.n_layer, pc.model.n_head, pc.model.n_embd) == (
            p.n_layer,
            p.n_head,
            p.n_embd,
        )
        t = pc.pretrain
        assert t.max_steps == t.eval_interval == t.checkpoint_interval == p.steps
        assert t.eval_batches == cfg.sweep.eval_batches and not t.resume
        assert 0 <= t.warmup_steps < t.max_steps
        assert p.tokens == p.steps * cfg.pretrain.tokens_per_step


def test_overlapping_paths_and_duplicate_sizes_are_rejected(tmp_path):
    root = make_project(tmp_path / "proj")
    cfg = cfg_for(root, "paths.checkpoints=models")  # would hold models/sweep/...
    with pytest.raises(SweepError, match=r"overlaps paths\.checkpoints"):
        grid.check_isolated(cfg, grid.expand_grid(cfg))
    twice = "sweep.sizes=[{n_layer: 1, n_head: 1, n_embd: 16}, {n_layer: 1, n_head: 1, n_embd: 16}]"
    with pytest.raises(SweepError, match=r"sweep.sizes\[1\].*repeats sweep.sizes\[0\]"):
        grid.expand_grid(cfg_for(root, twice))


def test_plan_rejects_bad_sizes_before_any_training(tmp_path):
    root = make_project(tmp_path / "proj")
    bad_heads = (
        "sweep.sizes=[{n_layer: 1, n_head: 3, n_embd: 16}, {n_layer: 1, n_head: 2, n_embd: 32}]"
    )
    cfg = cfg_for(root, bad_heads)
    with pytest.raises(
        SweepError, match=r"(?s)l1-h3-e16-s10: .*model\.n_embd: 16 is not divisible"
    ):
        grid.plan_points(cfg, grid.expand_grid(cfg), None, [bad_heads], 300)
    # n_head does not change N: two sizes that differ only in heads are one size to the fit
    same_n = (
        "sweep.sizes=[{n_layer: 1, n_head: 1, n_embd: 16}, {n_layer: 1, n_head: 2, n_embd: 16}]"
    )
    cfg = cfg_for(root, same_n)
    with pytest.raises(SweepError, match=r"sweep grid: 3 distinct \(N, D\) points"):
        grid.plan_points(cfg, grid.expand_grid(cfg), None, [same_n], 300)


def test_missing_shards_say_how_to_build_them(tmp_path):
    cfg = cfg_for(make_project(tmp_path / "proj"))
    with pytest.raises(SweepError, match="dvc repro tokenizer"):
        inputs.require_tokenizer(cfg)


def test_data_config_mismatch_names_the_keys(tmp_path):
    root = make_project(tmp_path / "proj")
    built = cfg_for(root, "tokenizer.vocab_size=400")
    (root / "data" / "tokenizer").mkdir(parents=True)
    (root / "data" / "tokenizer" / "config.yaml").write_text(built.to_yaml())
    assert inputs.data_config_mismatch(cfg_for(root, "model.n_layer=3")) == [
        "tokenizer.vocab_size: shards 400, sweep 512"
    ]


def test_entropy_comparison_is_honest_both_ways():
    est = {"bits_per_byte": 0.5, "stderr": 0.01}
    above = report.entropy_comparison({"E": 0.6, "at_bound": []}, est, "story world")
    assert above["E_minus_H"] == pytest.approx(0.1) and "as expected" in above["note"]
    below = report.entropy_comparison({"E": 0.0, "at_bound": ["E"]}, est, "story world")
    assert "undershoots" in below["note"] and "bound" in below["note"]
    none = report.entropy_comparison({"E": 0.6, "at_bound": []}, None, "not the story world")
    assert none["H_bits_per_byte"] is None and none["note"] == "not the story world"


def test_report_and_plot_from_a_fit(tmp_path):
    N, D = nd_grid(3, 3)
    rows = [
        {"point": f"p{i}", "n_layer": 1, "n_head": 1, "n_embd": 16, "steps": int(d // 100)}
        | {"N": int(n), "D": int(d), "val_bpb": float(y)}
        for i, (n, d, y) in enumerate(zip(N, D, law(N, D), strict=True))
    ]
    fit = fit_scaling_law(N, D, law(N, D), [r["point"] for r in rows])
    comparison = report.entropy_comparison(fit, {"bits_per_byte": 1.0, "stderr": 0.01}, "sw")
    md = report.report_markdown(rows, fit, comparison, [{"point": "p9", "error": "boom"}])
    assert (
        len(re.findall(r"\n\| p\d ", md)) == 10
        and "| alpha | 0.35 |" in md
        and "E − H: +0.1000" in md
    )
    png = report.scaling_plot_png(rows, fit, tmp_path / "plots" / "scaling.png", 1.0)
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_point_command_forwards_preset_and_overrides(tmp_path):
    from flows.scaling_flow import point_command

    cfg = cfg_for(make_project(tmp_path / "proj"))
    argv = point_command(cfg, "ci", ["seed=3", "model.n_layer=2"])
    assert argv[1:] == [
        "-m",
        "pipeline.stages.pretrain",
        "--preset",
        "ci",
        "--set",
        "seed=3",
        "--set",
        "model.n_layer=2",
    ]
    ddp = point_command(cfg_for(cfg.root, "pretrain.nproc_per_node=2"), None, [])
    assert ddp[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]


# --------------------------------------------------------------------------------------
# End to end: the Prefect flow on a tiny project
# --------------------------------------------------------------------------------------

TINY_SWEEP = [
    "tracking.enabled=true",
    "sweep.sizes=[{n_layer: 1, n_head: 1, n_embd: 16}, {n_layer: 1, n_head: 2, n_embd: 32},"
    " {n_layer: 2, n_head: 2, n_embd: 32}]",
    "sweep.steps=[4, 8, 16]",
    "sweep.eval_batches=2",
    "model.block_size=32",
    "pretrain.micro_batch_size=4",
    "pretrain.tokens_per_step=128",  # one micro-batch of 4 x 32 per step
    "pretrain.log_interval=4",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A project with validated, synthesized and tokenized story-world data (built once)."""
    from pipeline.stages import synthesize, tokenizer, validate

    return prepared_project(
        tmp_path_factory.mktemp("sweep"),
        ["synthesize.finetune_docs=20"],
        [validate, synthesize, tokenizer],
    )


@pytest.fixture
def tiny_project(tiny_data, tmp_path) -> Path:
    """A fresh copy of `tiny_data` for one test."""
    return Path(shutil.copytree(tiny_data, tmp_path / "proj"))


def snapshot(root: Path) -> dict[str, str]:
    """Digests of everything the main pipeline owns before the sweep (data and reports)."""
    out = {"params.yaml": tree_md5(root / "params.yaml"), "data": tree_md5(root / "data")}
    out |= {p.name: tree_md5(p) for p in (root / "reports").glob("*.json")}
    return out


@pytest.mark.slow
def test_flow_sweeps_fits_and_leaves_the_main_outputs_alone(
    tiny_project, tmp_path, prefect_api, monkeypatch
):
    import mlflow

    from flows.scaling_flow import scaling_sweep

    root = tiny_project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    before = snapshot(root)

    result = scaling_sweep(overrides=TINY_SWEEP, root=str(root))

    assert snapshot(root) == before
    assert not (root / "reports" / "pretrain.json").exists()
    assert not (root / "models" / "pretrain").exists()
    assert not (root / "models" / "checkpoints").exists()
    summary = json.loads((root / "reports" / "sweep" / "scaling.json").read_text())
    names = [p["point"] for p in summary["points"]]
    assert len(names) == 9 and not summary["failed"] and not summary["data_config_mismatch"]
    for p in summary["points"]:
        assert p["D"] == p["steps"] * 128
        assert (root / "reports" / "sweep" / p["point"] / "pretrain.json").is_file()
        assert (root / "models" / "sweep" / p["point"] / "pretrain" / "model.safetensors").is_file()
    fit = summary["fit"]
    assert fit["E"] >= 0 and 0 < fit["alpha"] <= 2 and 0 < fit["beta"] <= 2
    source = json.loads((root / "reports" / "synthesize.json").read_text())["source_entropy"]
    cmp_ = summary["source_entropy"]
    assert cmp_["H_bits_per_byte"] == pytest.approx(source["bits_per_byte"])
    assert cmp_["E_minus_H"] == pytest.approx(fit["E"] - source["bits_per_byte"])
    assert (root / "reports" / "sweep" / "scaling.md").read_text().startswith("# Scaling")

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(result["mlflow_parent_run_id"])
    assert parent.info.run_name == "scaling-sweep" and parent.info.status == "FINISHED"
    for key in ("E", "A", "alpha", "B", "beta", "rmse", "r2", "source_entropy_bpb"):
        assert key in parent.data.metrics, key
    assert parent.data.metrics["E"] == pytest.approx(fit["E"])
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert sorted(r.info.run_name for r in children) == sorted(names)
    assert all(r.info.status == "FINISHED" and "val_bpb" in r.data.metrics for r in children)
    artifacts = {
        f.path for d in ("plots", "sweep") for f in client.list_artifacts(parent.info.run_id, d)
    }
    assert {"plots/scaling.png", "sweep/scaling.json", "sweep/residuals.json"} <= artifacts


def fake_pretrain(fail: str):
    """A stand-in for the pretraining process: writes pretrain.json with the loss of the
    known law at the point's (N, D) in a moment, or fails for the point named `fail`."""
    from pipeline.config import load_config

    def command(cfg, preset, overrides):
        point = load_config(cfg.root, preset, overrides)  # as the process would load it
        m, t = point.model, point.pretrain
        n = 12 * m.n_layer * m.n_embd**2 + 300 * m.n_embd
        d = t.max_steps * t.tokens_per_step
        loss = float(law(n, d))
        report = {"params": n, "tokens_seen": d, "val_bpb": loss, "val_loss": loss}
        report |= {"train_loss": loss, "flops": 6.0 * n * d}
        path = point.path("reports") / "pretrain.json"
        if path.parent.name == fail:
            return [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
        write = f"import pathlib; p = pathlib.Path({str(path)!r}); p.parent.mkdir(parents=True)"
        return [sys.executable, "-c", f"{write}; p.write_text({json.dumps(report)!r})"]

    return command


@pytest.mark.slow
def test_a_failed_point_is_reported_and_the_rest_still_fitted(
    tiny_project, prefect_api, monkeypatch
):
    import flows.scaling_flow as sf

    monkeypatch.setattr(sf, "point_command", fake_pretrain(fail="l2-h2-e32-s16"))
    with pytest.raises(SweepError, match="failed points: l2-h2-e32-s16;"):
        sf.scaling_sweep(overrides=TINY_SWEEP[1:], root=str(tiny_project))  # tracking off
    summary = json.loads((tiny_project / "reports" / "sweep" / "scaling.json").read_text())
    assert [f["point"] for f in summary["failed"]] == ["l2-h2-e32-s16"]
    assert "exited 3" in summary["failed"][0]["error"] and "boom" in summary["failed"][0]["error"]
    assert len(summary["points"]) == 8
    for key, value in TRUE.items():  # the 8 good points still pin down the law exactly
        assert summary["fit"][key] == pytest.approx(value, rel=1e-3), key
    md = (tiny_project / "reports" / "sweep" / "scaling.md").read_text()
    assert "| l2-h2-e32-s16 | failed:" in md
