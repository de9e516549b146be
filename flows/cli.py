"""The `lmforge` command line.

lmforge config show --preset ci --set seed=7    # print the resolved, checked config
lmforge config keys                            # every key with its type and meaning
lmforge stage validate --set validate.max_chars=8000   # one stage, in-process
lmforge run --preset ci                         # the Prefect flow over DVC
lmforge generate --model models:/lmforge-gpt@champion "once upon a time"
lmforge export --format hf --model models:/lmforge-gpt@champion --out exports/hf
lmforge reproduce <mlflow-run-id>              # re-run a past run in a worktree, compare
lmforge sweep --preset ci                      # the scaling-law sweep
lmforge deploy                                 # prefect.yaml's deployments on PREFECT_API_URL
lmforge serve --cron "0 2 * * *"               # serve the flow on a schedule, one machine
lmforge stack up | status | down               # the team stack as local processes
lmforge --stack run --preset ci                # any command with .lmforge/stack.env loaded
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.config import ConfigError, describe, find_root, list_presets, load_config
from pipeline.core.names import STAGES, TOKENIZER_FILE

# The embedded default is offline: Prefect's temporary server would log an ERROR ("Failed
# to send telemetry") at start-up and every ten minutes. Prefect is imported lazily, after
# this; a user's own setting wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

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
    """Run one stage in this process (no DVC, no Prefect), with optional overrides.

    Exactly `python -m pipeline.stages.<name>`: the stage's own `main()` (the shared
    `stage_main`) parses the options, runs it and chooses the exit code, so the codes
    (1 bad input, 2 bad config, 75 transient, 143 SIGTERM in pretrain) never depend on
    which way the stage was started.
    """
    if name not in STAGES:
        _fail(f"unknown stage {name!r}; expected one of: {', '.join(STAGES)}", 2)
    argv = ["--preset", preset] if preset else []
    for item in set_ or []:
        argv += ["--set", item]
    module = importlib.import_module(f"pipeline.stages.{name}")
    raise typer.Exit(module.main(argv))


@app.command("run")
def run(
    preset: PresetOpt = None,
    set_: SetOpt = None,
    push: Annotated[bool, typer.Option(help="dvc push the outputs after a good run")] = True,
) -> None:
    """Run the whole pipeline through the Prefect flow (DVC decides what is stale)."""
    root = find_root()
    try:  # check before Prefect starts, so a typo fails in a second, not after start-up
        load_config(root, preset=preset, overrides=set_ or [])
    except ConfigError as e:
        _fail(str(e), 2)
    from flows.pipeline_flow import lm_pipeline

    try:
        result = lm_pipeline(preset=preset, overrides=set_ or [], root=str(root), push=push)
    except Exception as e:
        _fail(f"pipeline failed: {e}", 1)
    from rich.console import Console

    from flows.artifacts import print_run_end

    print_run_end(Console(), result, load_config(root).tracking.uri, push)


def _tracking_uri_for_cli() -> str | None:
    """The project's tracking URI when run inside a project (MLFLOW_TRACKING_URI wins)."""
    from pipeline.ops.tracking import tracking_uri

    try:
        return tracking_uri(load_config())
    except ConfigError:
        return None  # outside a project: MLflow's own default / environment


def _is_mlflow_uri(model: str) -> bool:
    return model.split(":/", 1)[0] in ("models", "runs", "file", "s3", "gs", "http", "https")


def _default_model() -> str:
    try:
        return f"models:/{load_config().register.model_name}@champion"
    except ConfigError:
        return "models:/lmforge-gpt@champion"


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="an MLflow model URI (models:/NAME@champion, runs:/ID/model) or a model folder; "
        "default: models:/<register.model_name>@champion",
    ),
]
TokenizerOpt = Annotated[
    Path | None,
    typer.Option(help="tokenizer.json, for a model folder without one (e.g. models/finetune)"),
]


@app.command("generate")
def generate_text(
    prompts: Annotated[list[str], typer.Argument(help="one or more prompts")],
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    strategy: Annotated[str | None, typer.Option(help="greedy | sample | beam")] = None,
    max_new_tokens: Annotated[int | None, typer.Option()] = None,
    temperature: Annotated[float | None, typer.Option()] = None,
    top_k: Annotated[int | None, typer.Option()] = None,
    top_p: Annotated[float | None, typer.Option()] = None,
    num_beams: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    no_repeat_ngram_size: Annotated[
        int | None, typer.Option(help="ban repeating an n-gram of this size (0 = off)")
    ] = None,
    repetition_penalty: Annotated[
        float | None, typer.Option(help="CTRL penalty on tokens already seen (1 = off)")
    ] = None,
) -> None:
    """Generate text from a registered model (or a model folder); one line per prompt.

    Options left out take the model's registered defaults (`register.decoding`).
    """
    from pipeline.core.errors import LmforgeError

    uri = model or _default_model()
    given = {
        "strategy": strategy,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "num_beams": num_beams,
        "seed": seed,
        "no_repeat_ngram_size": no_repeat_ngram_size,
        "repetition_penalty": repetition_penalty,
    }
    params: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    try:
        if _is_mlflow_uri(uri):
            texts = _generate_mlflow(uri, prompts, params)
        else:
            from pipeline.serve.textgen import TextGenerator

            texts = TextGenerator.from_folder(Path(uri), tokenizer).complete(prompts, params)
    except LmforgeError as e:
        _fail(str(e), 1)
    for text in texts:
        typer.echo(text)


def _generate_mlflow(uri: str, prompts: list[str], params: dict[str, Any]) -> list[str]:
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.core.errors import LmforgeError

    tracking = _tracking_uri_for_cli()
    if tracking:
        mlflow.set_tracking_uri(tracking)
    try:
        loaded = mlflow.pyfunc.load_model(uri)
    except MlflowException as e:
        raise LmforgeError(
            f"cannot load {uri} from {mlflow.get_tracking_uri()}: {e.message}; "
            "has `dvc repro register` registered a version?"
        ) from None
    return list(loaded.predict(list(prompts), params=params or None))


@app.command("export")
def export(
    out: Annotated[Path, typer.Option(help="folder to write (replaced atomically)")],
    format_: Annotated[str, typer.Option("--format", help="export format: hf")] = "hf",
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
) -> None:
    """Export a model for Hugging Face transformers (GPT2LMHeadModel, identical logits)."""
    from pipeline.core.errors import LmforgeError

    if format_ != "hf":
        _fail(f"unknown --format {format_!r}; supported: hf", 2)
    uri = model or _default_model()
    try:
        from pipeline.serve.export_hf import export_hf

        with tempfile.TemporaryDirectory(prefix="lmforge-export-") as tmp:
            folder = Path(uri)
            if _is_mlflow_uri(uri):
                folder = _download_model(uri, Path(tmp))
            tok = tokenizer or folder / TOKENIZER_FILE
            written = export_hf(folder, tok, out)
    except LmforgeError as e:
        _fail(str(e), 1)
    typer.echo(f"wrote {written} (load with transformers.AutoModelForCausalLM.from_pretrained)")


def _download_model(uri: str, dest: Path) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.core.errors import LmforgeError
    from pipeline.serve.registry import download_package

    tracking = _tracking_uri_for_cli()
    if tracking:
        mlflow.set_tracking_uri(tracking)
    try:
        return download_package(uri, dest)
    except MlflowException as e:
        raise LmforgeError(f"cannot download {uri}: {e.message}") from None


@app.command("sweep")
def sweep(preset: PresetOpt = None, set_: SetOpt = None) -> None:
    """Scaling-law sweep: pretrain sweep.sizes x sweep.steps, fit L(N, D) = E + A/N^a + B/D^b."""
    from flows.scaling_flow import scaling_sweep
    from pipeline.core.errors import LmforgeError

    try:
        summary = scaling_sweep(preset=preset, overrides=set_ or [], root=str(find_root()))
    except ConfigError as e:
        _fail(str(e), 2)
    except LmforgeError as e:
        _fail(str(e), 1)
    keys = ("fit", "source_entropy", "files")
    typer.echo(json.dumps({k: summary.get(k) for k in keys}, indent=2, default=str))


@app.command("deploy")
def deploy(
    pool: Annotated[str, typer.Option(help="process work pool to target")] = "lmforge-process",
    create_pool: Annotated[bool, typer.Option(help="create the pool if missing")] = True,
) -> None:
    """Create/update the deployments of prefect.yaml (nightly, on-demand) on PREFECT_API_URL."""
    from flows.deployments import DeploymentError, deploy_all

    try:
        names = deploy_all(find_root(), pool=pool, create_pool=create_pool)
    except ConfigError as e:
        _fail(str(e), 2)
    except DeploymentError as e:
        _fail(str(e), 1)
    for name in names:
        typer.echo(f"deployed {name}")
    typer.echo(f"\nStart a worker:  prefect worker start --pool {pool}")
    typer.echo("Trigger a run:   prefect deployment run 'lm-pipeline/on-demand' --param preset=ci")


@app.command("serve")
def serve(
    cron: Annotated[str, typer.Option(help='cron schedule, e.g. "0 2 * * *"')],
    timezone: Annotated[
        str | None, typer.Option(help="IANA timezone, e.g. Europe/Berlin (default UTC)")
    ] = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    name: Annotated[str, typer.Option(help="deployment name")] = "served",
) -> None:
    """Serve the pipeline here on a cron schedule until Ctrl-C (needs PREFECT_API_URL)."""
    from flows.deployments import DeploymentError, ScheduleError, serve_with_schedule

    root = str(find_root())
    try:
        serve_with_schedule(cron, timezone, preset, root, overrides=set_ or [], name=name)
    except (ConfigError, ScheduleError) as e:
        _fail(str(e), 2)
    except DeploymentError as e:
        _fail(str(e), 1)


@app.command("reproduce")
def reproduce_run(
    run_id: Annotated[str, typer.Argument(help="MLflow run id (the parent or a stage run)")],
    workdir: Annotated[
        Path | None, typer.Option(help="where to create the worktree (default: a temp dir)")
    ] = None,
    cleanup: Annotated[bool, typer.Option(help="remove the worktree afterwards")] = False,
) -> None:
    """Re-run a past pipeline run from its commit and DVC experiment; compare the two.

    Exits 0 when the metrics and every output's DVC hash are identical, 1 otherwise.
    """
    from pipeline.core.errors import LmforgeError
    from pipeline.ops.reproduce import render, reproduce

    try:
        cfg = load_config()
    except ConfigError as e:
        _fail(str(e), 2)
    from pipeline.ops.stage_runner import setup_logging

    setup_logging()
    typer.echo(f"reproducing MLflow run {run_id} (dvc pull, then dvc repro --force)...")
    try:
        comparison, work = reproduce(cfg, run_id, workdir, keep=not cleanup)
    except LmforgeError as e:
        _fail(str(e), 1)
    typer.echo(render(comparison, f"run {run_id[:8]}", "reproduced"))
    if not cleanup:
        typer.echo(f"worktree: {work}   (git worktree remove --force {work})")
    if not comparison.identical:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- team stack
# `lmforge --stack ...` and `lmforge stack up | status | down` (pipeline/ops/stack/).

stack_app = typer.Typer(
    help="The team stack as local processes on 127.0.0.1 (docker/README.md).",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")


@app.callback()
def main(
    stack: Annotated[
        bool,
        typer.Option("--stack", help="load .lmforge/stack.env (the team stack's URLs and keys)"),
    ] = False,
) -> None:
    """lmforge: train GPT-style language models end to end.

    `--stack` loads .lmforge/stack.env (`lmforge stack up` wrote it, or a teammate sent it)
    and makes the S3 remote `stack` this checkout's DVC default (.dvc/config.local).
    """
    if not stack:
        return
    from pipeline.ops.stack import StackError, load_client_env, use_dvc_remote

    try:
        root = find_root()
        os.environ.update(load_client_env(root))
        use_dvc_remote(root, echo=lambda _: None)
    except (StackError, ConfigError) as e:
        _fail(str(e), 2)


@stack_app.command("up")
def stack_up(
    port_base: Annotated[
        int | None,
        typer.Option(help="first of 7 loopback ports (default 15400, or the last up's)"),
    ] = None,
) -> None:
    """Start PostgreSQL, SeaweedFS, MLflow (basic auth), Prefect and a worker; write stack.env."""
    from pipeline.ops.stack import StackError, up

    try:
        up(find_root(), port_base, echo=typer.echo)
    except (StackError, ConfigError) as e:
        _fail(str(e), 1)


@stack_app.command("down")
def stack_down() -> None:
    """Stop, by pid, every process `lmforge stack up` started; the data stays."""
    from pipeline.ops.stack import StackError, down

    try:
        down(find_root(), echo=typer.echo)
    except (StackError, ConfigError) as e:
        _fail(str(e), 1)


@stack_app.command("status")
def stack_status() -> None:
    """Each service's URL, pid and health; exit 1 when any is down or unhealthy."""
    from pipeline.ops.stack import StackError, status

    try:
        report = status(find_root())
    except (StackError, ConfigError) as e:
        _fail(str(e), 1)
    for h in report:
        state = "healthy" if h.healthy else ("UNHEALTHY" if h.pid else "not running")
        typer.echo(f"{h.name:10s} {state:12s} pid {h.pid or '-':<8} {h.url}")
    if not all(h.healthy for h in report):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
