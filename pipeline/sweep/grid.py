"""The sweep's grid: every model size in `sweep.sizes` x every budget in `sweep.steps`.

Each point is one pretraining run in folders of its own; ``point_overrides`` turns the
sweep's config into that run's ``--set`` overrides, and ``plan_points`` checks every point
(config, isolation, and that the (N, D) grid can determine the fit) before any training.
D = steps x `pretrain.tokens_per_step`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.sweep.fit import SweepError, check_inputs

SWEEP_DIR = "sweep"


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One pretraining run of the sweep: a model size at a step budget, with its own folders.

    The folders are relative to the project root, like every `paths.*` key.
    """

    name: str  # e.g. "l2-h2-e48-s40": unique within the sweep, safe in paths and run names
    n_layer: int
    n_head: int
    n_embd: int
    steps: int  # optimizer steps
    tokens: int  # D = steps x pretrain.tokens_per_step
    model_dir: str  # -> paths.pretrain
    checkpoint_dir: str  # -> paths.checkpoints
    report_dir: str  # -> paths.reports (pretrain.json, plots/pretrain_loss.json)


def sweep_dirs(cfg: Config) -> tuple[Path, Path]:
    """(models base, reports base) of the sweep: `<parent of paths.pretrain>/sweep` and
    `<paths.reports>/sweep`, both relative to the project root."""
    return Path(cfg.paths.pretrain).parent / SWEEP_DIR, Path(cfg.paths.reports) / SWEEP_DIR


def point_name(n_layer: int, n_head: int, n_embd: int, steps: int) -> str:
    return f"l{n_layer}-h{n_head}-e{n_embd}-s{steps}"


def expand_grid(cfg: Config) -> list[SweepPoint]:
    """Every (size, steps) pair of `cfg.sweep`, sizes outermost; duplicates are errors."""
    sizes, budgets = cfg.sweep.sizes, cfg.sweep.steps
    if not sizes:
        raise SweepError("sweep.sizes: expected at least one model size")
    if not budgets:
        raise SweepError("sweep.steps: expected at least one step budget")
    _reject_duplicates("sweep.sizes", [(s.n_layer, s.n_head, s.n_embd) for s in sizes])
    _reject_duplicates("sweep.steps", list(budgets))
    for i, steps in enumerate(budgets):
        if steps < 1:
            raise SweepError(f"sweep.steps[{i}]: expected a positive step count, got {steps}")
    models, reports = sweep_dirs(cfg)
    points = []
    for s in sizes:
        for steps in budgets:
            name = point_name(s.n_layer, s.n_head, s.n_embd, steps)
            points.append(
                SweepPoint(
                    name=name,
                    n_layer=s.n_layer,
                    n_head=s.n_head,
                    n_embd=s.n_embd,
                    steps=steps,
                    tokens=steps * cfg.pretrain.tokens_per_step,
                    model_dir=(models / name / "pretrain").as_posix(),
                    checkpoint_dir=(models / name / "checkpoints").as_posix(),
                    report_dir=(reports / name).as_posix(),
                )
            )
    return points


def _reject_duplicates(key: str, items: list[Any]) -> None:
    for i, item in enumerate(items):
        if item in items[:i]:
            first = items.index(item)
            raise SweepError(f"{key}[{i}]: {item} repeats {key}[{first}]; list each once")


def warmup_for(steps: int, configured: int) -> int:
    """Warm-up of a point: the configured one, capped at 10% of the budget so that short
    runs are not all warm-up (lr_at needs warmup < max_steps to ever reach the decay)."""
    return min(configured, steps // 10)


def point_overrides(point: SweepPoint, cfg: Config) -> list[str]:
    """The `--set` overrides that turn the sweep's config into this point's pretraining.

    Paths are JSON-quoted (valid YAML) so that no folder name is parsed as YAML syntax.
    The final evaluation and the only checkpoint happen at the last step.
    """
    s = point.steps
    return [
        f"model.n_layer={point.n_layer}",
        f"model.n_head={point.n_head}",
        f"model.n_embd={point.n_embd}",
        f"pretrain.max_steps={s}",
        f"pretrain.eval_interval={s}",
        f"pretrain.eval_batches={cfg.sweep.eval_batches}",
        f"pretrain.checkpoint_interval={s}",
        "pretrain.keep_checkpoints=1",
        f"pretrain.warmup_steps={warmup_for(s, cfg.pretrain.warmup_steps)}",
        "pretrain.resume=false",
        f"paths.pretrain={json.dumps(point.model_dir)}",
        f"paths.checkpoints={json.dumps(point.checkpoint_dir)}",
        f"paths.reports={json.dumps(point.report_dir)}",
    ]


def check_isolated(cfg: Config, points: Sequence[SweepPoint]) -> None:
    """Fail unless every point's folders are apart from the main pipeline's outputs.

    A point folder may not equal, contain or lie inside any `paths.*` folder, except that
    point reports live under `paths.reports/sweep/` (the main pipeline writes only named
    files such as `reports/pretrain.json` there, never a `sweep/` folder).
    """
    root = cfg.root
    main = {key: (root / value).resolve() for key, value in dataclasses.asdict(cfg.paths).items()}
    for p in points:
        for key, rel in (
            ("paths.pretrain", p.model_dir),
            ("paths.checkpoints", p.checkpoint_dir),
            ("paths.reports", p.report_dir),
        ):
            mine = (root / rel).resolve()
            for main_key, other in main.items():
                inside = other in mine.parents and main_key != "reports"
                if mine == other or inside or mine in other.parents:
                    raise SweepError(
                        f"sweep point {p.name}: its {key} folder {rel} overlaps "
                        f"paths.{main_key} ({getattr(cfg.paths, main_key)}); move paths.pretrain "
                        "(the sweep writes beside it, in <parent>/sweep/) or paths.reports"
                    )


def plan_points(
    cfg: Config,
    points: Sequence[SweepPoint],
    preset: str | None,
    overrides: Sequence[str],
    vocab_size: int,
) -> list[int]:
    """Check every point before any training; return each point's predicted N.

    Each point's config is loaded exactly as its pretraining process will load it (the
    strict loader's cross-checks name the bad key, e.g. n_embd not divisible by n_head);
    the batch layout must divide `pretrain.tokens_per_step`; the predicted (N, D) grid must
    be able to determine the fit (n_head alone does not change N, for instance).
    """
    from pipeline.config import ConfigError, load_config
    from pipeline.train.loop import grad_accum_steps

    check_isolated(cfg, points)
    predicted = []
    for p in points:
        try:
            point_cfg = load_config(cfg.root, preset, [*overrides, *point_overrides(p, cfg)])
        except ConfigError as e:
            raise SweepError(f"sweep point {p.name}: {e}") from None
        predicted.append(count_params(point_cfg, vocab_size))
    try:
        grad_accum_steps(cfg, cfg.pretrain.nproc_per_node)
    except ValueError as e:
        raise SweepError(str(e)) from None
    tokens = [p.tokens for p in points]
    check_inputs(predicted, tokens, [1.0] * len(points), [p.name for p in points], "sweep grid")
    return predicted


def count_params(cfg: Config, vocab_size: int) -> int:
    """N of `cfg.model` (no position embeddings), counted on the meta device (no memory)."""
    import torch

    from pipeline.model.gpt import GPT, GPTConfig

    with torch.device("meta"):
        return GPT(GPTConfig.from_params(cfg.model, vocab_size)).num_params()
