"""The `lmforge` command line.

lmforge config show --preset ci --set seed=7    # print the resolved, checked config
lmforge config keys                            # every key with its type and meaning
lmforge stage validate --set validate.max_chars=8000   # one stage, in-process
lmforge run --preset ci                         # the Prefect flow over DVC
"""

from __future__ import annotations

import importlib
import json
from typing import Annotated

import typer

from pipeline.config import ConfigError, describe, find_root, list_presets, load_config
from pipeline.stages import STAGES

app = typer.Typer(help="lmforge: train GPT-style language models end to end.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

PresetOpt = Annotated[str | None, typer.Option("--preset", "-p", help="presets/<NAME>.yaml")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override KEY=VALUE (repeatable)")
]


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@config_app.command("show")
def config_show(preset: PresetOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (params.yaml + preset + overrides) after strict checking."""
    try:
        cfg = load_config(preset=preset, overrides=set_ or [])
    except ConfigError as e:
        _fail(str(e), 2)
    typer.echo(cfg.to_yaml(), nl=False)


@config_app.command("keys")
def config_keys() -> None:
    """List every key of params.yaml with its type and meaning."""
    for key, tp, doc in describe():
        typer.echo(f"{key:44s} {tp:32s} {doc}")


@config_app.command("presets")
def config_presets() -> None:
    """List the named presets."""
    typer.echo("\n".join(list_presets(find_root())))


@app.command("stage")
def stage(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(STAGES)}")],
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run one stage in this process (no DVC, no Prefect), with optional overrides."""
    if name not in STAGES:
        _fail(f"unknown stage {name!r}; expected one of: {', '.join(STAGES)}", 2)
    from pipeline.errors import LmforgeError
    from pipeline.stage_runner import setup_logging

    setup_logging()
    try:
        cfg = load_config(preset=preset, overrides=set_ or [])
    except ConfigError as e:
        _fail(str(e), 2)
    module = importlib.import_module(f"pipeline.stages.{name}")
    try:
        summary = module.run(cfg)
    except (LmforgeError, ValueError) as e:
        _fail(f"stage {name} failed:\n{e}", 1)
    typer.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))


@app.command("run")
def run(preset: PresetOpt = None, set_: SetOpt = None) -> None:
    """Run the whole pipeline through the Prefect flow (DVC decides what is stale)."""
    root = find_root()
    try:  # check before Prefect starts, so a typo fails in a second, not after start-up
        load_config(root, preset=preset, overrides=set_ or [])
    except ConfigError as e:
        _fail(str(e), 2)
    from flows.pipeline_flow import lm_pipeline

    try:
        result = lm_pipeline(preset=preset, overrides=set_ or [], root=str(root))
    except Exception as e:
        _fail(f"pipeline failed: {e}", 1)
    cfg = load_config(root)
    typer.echo("\nWhere to look:")
    typer.echo(f"  MLflow:  mlflow ui --backend-store-uri {cfg.tracking.uri}")
    if result.get("mlflow_parent_run_id"):
        typer.echo(f"           parent run {result['mlflow_parent_run_id']}")
    typer.echo("  Prefect: prefect server start   (then open the flow run lm-pipeline)")
    typer.echo("  DVC:     dvc status; dvc metrics show")


if __name__ == "__main__":
    app()
