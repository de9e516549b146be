"""The Prefect flow `scaling-sweep`: pretrain a grid of sizes x budgets, fit a scaling law.

    python -m flows.scaling_flow --preset ci
    python -m flows.scaling_flow --set 'sweep.steps=[100, 200, 400]'

For every model size in `sweep.sizes` and every step budget in `sweep.steps`, one Prefect
task pretrains a model in a process of its own (`python -m pipeline.stages.pretrain
--preset P --set ...`, torchrun when `pretrain.nproc_per_node` > 1), writing only to
`models/sweep/<point>/` and `reports/sweep/<point>/`, so the main pipeline's DVC outputs are
never touched. Each point is a child MLflow run of the parent run "scaling-sweep" (through
`LMFORGE_PARENT_RUN_ID`). Then L(N, D) = E + A/N^alpha + B/D^beta is fitted to the final
validation bits per byte (pipeline/sweep/fit.py), compared with the source's entropy rate,
and written (pipeline/sweep/report.py) to `reports/sweep/scaling.{json,md,png}`, the parent
run and a Prefect artifact.

The sweep reads the tokenizer's shards and never builds them: `dvc repro` follows
params.yaml, which this flow does not write, so building them here would silently train a
preset's sweep on params.yaml's data. A missing `data/tokenizer` is an error saying how to
build it; shards built from another config give a warning and are recorded in the report.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.stage_line import stage_line
from flows.streaming import stream_command
from pipeline.config import Config, load_config
from pipeline.core.io import atomic_write_json, atomic_write_text
from pipeline.core.names import report_json
from pipeline.ops.tracking import (
    FLOW_RUN_ENV,
    PARENT_RUN_ENV,
    Tracker,
    close_run,
    open_parent_run,
    tracking_uri,
)
from pipeline.sweep import fit as sweep_fit
from pipeline.sweep import grid, inputs
from pipeline.sweep import report as sweep_report
from pipeline.sweep.fit import SweepError
from pipeline.sweep.grid import SweepPoint

FIT_METRICS = ("E", "A", "alpha", "B", "beta", "rmse", "r2")
# Per-run facts kept out of scaling.json, so that a re-run on CPU writes the same file.
RUN_ONLY_KEYS = ("seconds", "mlflow_run_id")


def point_command(cfg: Config, preset: str | None, overrides: list[str]) -> list[str]:
    """The pretraining command of one point: what `dvc repro pretrain` would run."""
    nproc = cfg.pretrain.nproc_per_node
    launcher = [sys.executable, "-m"]
    if nproc > 1:  # the same engine as dvc.yaml's pretrain stage
        launcher += ["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    args = [*launcher, "pipeline.stages.pretrain"]
    if preset:
        args += ["--preset", preset]
    for item in overrides:
        args += ["--set", item]
    return args


def point_env(parent_run_id: str | None) -> dict[str, str]:
    """Environment of a point's process: it joins the parent MLflow run and the flow run,
    and imports the same `pipeline` package as this process (the root may be elsewhere)."""
    env = dict(os.environ)
    code_root = str(Path(grid.__file__).resolve().parents[2])  # pipeline/sweep/grid.py
    env["PYTHONPATH"] = os.pathsep.join(p for p in (code_root, env.get("PYTHONPATH")) if p)
    env[FLOW_RUN_ENV] = str(flow_run.get_id() or "")
    env.pop(PARENT_RUN_ENV, None)  # never join a parent inherited from an outer run
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    return env


@task(name="sweep-point", task_run_name="{name}", cache_policy=NO_CACHE)
def pretrain_point(
    name: str, argv: list[str], root: str, parent_run_id: str | None, report: str
) -> dict[str, Any]:
    """Pretrain one point in its own process; return its pretrain.json and wall time.

    A process per point isolates torch's global state (seeds, threads, signal handlers,
    memory) and runs exactly the code DVC runs, so a point reproduces as a stage run would.
    """
    t0 = time.perf_counter()
    with stage_line(name):  # on a terminal: one line redrawn in place; raising marks it failed
        code, lines = stream_command(argv, root, point_env(parent_run_id), name)
        if code != 0:
            tail = "\n".join(lines[-20:])
            raise SweepError(f"sweep point {name}: pretraining exited {code}:\n{tail}")
    result = json.loads(Path(report).read_text(encoding="utf-8"))
    return {**result, "seconds": round(time.perf_counter() - t0, 1)}


def point_row(p: SweepPoint, report: dict[str, Any], run_id: str | None) -> dict[str, Any]:
    """One table row: the point, N and D as trained, and its final losses."""
    if "val_bpb" not in report:
        raise SweepError(f"sweep point {p.name}: {p.report_dir}/pretrain.json has no val_bpb")
    return {
        "point": p.name,
        "n_layer": p.n_layer,
        "n_head": p.n_head,
        "n_embd": p.n_embd,
        "steps": p.steps,
        "N": int(report["params"]),  # without position embeddings
        "D": int(report["tokens_seen"]),
        "val_bpb": float(report["val_bpb"]),
        "val_loss": float(report["val_loss"]),  # nats per token
        "train_loss": float(report["train_loss"]),
        "flops": float(report["flops"]),
        "seconds": report["seconds"],
        "mlflow_run_id": run_id,
    }


def label_child(client: Any, parent: str | None, seen: set[str], p: SweepPoint) -> str | None:
    """Name the point's child run after the point (the stage names it 'pretrain').

    Points run one after another, so the one child of the parent not seen before is it.
    """
    if client is None or parent is None:
        return None
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    new = [r.info.run_id for r in runs if r.info.run_id not in seen]
    if len(new) != 1:
        return None
    seen.add(new[0])
    client.update_run(new[0], name=p.name)
    Tracker(client, new[0]).set_tags(
        {"lmforge.sweep_point": p.name, "lmforge.sweep_steps": p.steps}
    )
    return new[0]


def run_points(
    cfg: Config, points: list[SweepPoint], preset: str | None, overrides: list[str], parent
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Pretrain every point in turn; a failed point is recorded and the sweep goes on."""
    logger = get_run_logger()
    client = None
    if parent is not None:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=tracking_uri(cfg))
    rows, failed, seen = [], [], set()
    for i, p in enumerate(points, start=1):
        logger.info("point %d/%d: %s (D = %s tokens)", i, len(points), p.name, f"{p.tokens:,}")
        argv = point_command(cfg, preset, [*overrides, *grid.point_overrides(p, cfg)])
        report = str(cfg.root / p.report_dir / report_json("pretrain"))
        state = pretrain_point(p.name, argv, str(cfg.root), parent, report, return_state=True)
        run_id = label_child(client, parent, seen, p)
        if state.is_completed():
            rows.append(point_row(p, state.result(), run_id))
        else:
            error = str(state.result(raise_on_failure=False))
            failed.append({"point": p.name, "error": error})
            logger.error("%s failed; the sweep goes on without it:\n%s", p.name, error)
    return rows, failed


@task(name="fit-scaling-law", cache_policy=NO_CACHE)
def fit_and_report(
    cfg: Config, rows: list[dict[str, Any]], failed: list[dict[str, str]], mismatch: list[str]
) -> dict[str, Any]:
    """Fit the law, compare E with the source entropy, write reports/sweep/scaling.*."""
    fit, fit_error = None, None
    try:
        fit = sweep_fit.fit_scaling_law(
            [r["N"] for r in rows],
            [r["D"] for r in rows],
            [r["val_bpb"] for r in rows],
            [r["point"] for r in rows],
        )
    except SweepError as e:
        fit_error = str(e)
    est, why = inputs.source_entropy(cfg)
    comparison = sweep_report.entropy_comparison(fit, est, why) if fit else None
    out = cfg.root / grid.sweep_dirs(cfg)[1]
    summary = {
        "law": sweep_fit.LAW,
        "units": {
            "L": "validation bits per byte (val_bpb)",
            "N": "parameters without position embeddings",
            "D": "training tokens (steps x pretrain.tokens_per_step)",
        },
        "grid": {
            "sizes": [s.__dict__ for s in cfg.sweep.sizes],
            "steps": list(cfg.sweep.steps),
            "tokens_per_step": cfg.pretrain.tokens_per_step,
            "eval_batches": cfg.sweep.eval_batches,
        },
        "points": [{k: v for k, v in r.items() if k not in RUN_ONLY_KEYS} for r in rows],
        "failed": failed,
        "fit": {k: v for k, v in fit.items() if k != "residuals"} if fit else None,
        "fit_error": fit_error,
        "source_entropy": comparison,
        "data_config_mismatch": mismatch,
    }
    markdown = sweep_report.report_markdown(rows, fit, comparison, failed, fit_error)
    files = {
        "json": atomic_write_json(out / "scaling.json", summary),
        "md": atomic_write_text(out / "scaling.md", markdown),
    }
    if fit:
        files["residuals"] = atomic_write_json(out / "residuals.json", fit["residuals"])
        h = comparison["H_bits_per_byte"] if comparison else None
        png = sweep_report.scaling_plot_png(rows, fit, out / "scaling.png", h)
        if png:
            files["png"] = png
    return {"summary": summary, "markdown": markdown, "fit": fit, "files": files}


def log_to_parent(cfg: Config, parent: str | None, result: dict[str, Any]) -> None:
    """Fit parameters as metrics, the reports and the plot as artifacts of the parent run."""
    if parent is None:
        return
    import mlflow

    tracker = Tracker(mlflow.MlflowClient(tracking_uri=tracking_uri(cfg)), parent)
    fit, comparison = result["fit"], result["summary"]["source_entropy"]
    if fit:
        tracker.log_metrics({k: fit[k] for k in FIT_METRICS if fit[k] is not None})
    if comparison and comparison["H_bits_per_byte"] is not None:
        tracker.log_metrics(
            {
                "source_entropy_bpb": comparison["H_bits_per_byte"],
                "E_minus_H": comparison["E_minus_H"],
            }
        )
    summary = result["summary"]
    tracker.log_metrics(
        {"points_ok": len(summary["points"]), "points_failed": len(summary["failed"])}
    )
    tracker.flush()
    for kind, path in result["files"].items():
        tracker.log_artifact(path, "plots" if kind == "png" else "sweep")


@flow(name="scaling-sweep", log_prints=True)
def scaling_sweep(
    preset: str | None = None, overrides: list[str] | None = None, root: str = "."
) -> dict[str, Any]:
    """Pretrain every (size, steps) point of `sweep`, fit L(N, D), report; see the module doc.

    Returns the points, failures, the fit, the entropy comparison, the report paths and the
    MLflow parent run id. Raises SweepError (after writing the report) if any point failed
    or the fit was impossible; bad config or missing shards fail before any training.
    """
    logger = get_run_logger()
    overrides = list(overrides or [])
    cfg = load_config(Path(root).resolve(), preset=preset, overrides=overrides)
    meta = inputs.require_tokenizer(cfg)
    points = grid.expand_grid(cfg)
    predicted = grid.plan_points(cfg, points, preset, overrides, meta["vocab_size"])
    logger.info("%d points: %s", len(points), ", ".join(p.name for p in points))
    logger.info("predicted N per size: %s", sorted(set(predicted)))
    mismatch = inputs.data_config_mismatch(cfg)
    if mismatch:
        logger.warning(
            "%s was built with another data config; the sweep trains on it as it is:\n  %s",
            cfg.path("tokenizer"),
            "\n  ".join(mismatch[:10]),
        )
    tags = {"lmforge.prefect_flow_run_id": flow_run.get_id() or "", "preset": preset}
    parent = open_parent_run(
        cfg, "scaling-sweep", {**tags, "lmforge.sweep": "true"}, source="flows.scaling_flow"
    )
    ok = False
    try:
        rows, failed = run_points(cfg, points, preset, overrides, parent)
        result = fit_and_report(cfg, rows, failed, mismatch)
        log_to_parent(cfg, parent, result)
        ok = not failed and result["fit"] is not None
    finally:  # FAILED when a point failed, the fit was impossible, or anything raised
        close_run(cfg, parent, ok, {})
    artifact = result["markdown"] + (f"\nMLflow parent run: `{parent}`\n" if parent else "")
    create_markdown_artifact(artifact, key="scaling-sweep", description="scaling-law sweep")
    logger.info("\n%s", result["markdown"])
    if not ok:
        names = ", ".join(f["point"] for f in failed) or "none"
        raise SweepError(
            f"scaling sweep incomplete (failed points: {names}; fit: "
            f"{result['summary']['fit_error'] or 'ok'}); see {result['files']['md']}"
        )
    return {
        "points": rows,
        "fit": result["summary"]["fit"],
        "source_entropy": result["summary"]["source_entropy"],
        "files": {k: str(v) for k, v in result["files"].items()},
        "mlflow_parent_run_id": parent,
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.scaling_flow`: exit 0 on success, 1 on a sweep error, 2 on bad config."""
    import argparse

    from pipeline.config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m flows.scaling_flow")
    parser.add_argument("--preset", help="apply presets/<PRESET>.yaml (params.yaml is not written)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--root", default=".", help="project root (the folder of params.yaml)")
    args = parser.parse_args(argv)
    try:
        summary = scaling_sweep(preset=args.preset, overrides=args.overrides, root=args.root)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: summary[k] for k in ("fit", "source_entropy", "files")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
