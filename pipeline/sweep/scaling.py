"""The scaling-law sweep's pure parts: the grid, each point's overrides, the fit and the report.

    python -m flows.scaling_flow --preset ci     # the Prefect flow that runs the sweep

A sweep pretrains every model size in `sweep.sizes` for every budget in `sweep.steps` (each
point in folders of its own) and fits, by least squares on the final validation loss,

    L(N, D) = E + A / N^alpha + B / D^beta         (Hoffmann et al. 2022, "approach 3")

- L: validation bits per byte (`val_bpb` of the point's `pretrain.json`; bits per UTF-8
  byte, so it does not depend on the tokenizer and compares with the source entropy rate);
- N: parameters without position embeddings (the tied token embedding counted once);
- D: training tokens seen = steps x `pretrain.tokens_per_step`;
- E: the irreducible loss. On story-world data the source's exact entropy rate H (from
  `reports/synthesize.json`) is a floor no model can beat, so E >= H is expected.

This module imports no prefect (pipeline/ never does); scipy is imported by the fit and
matplotlib (optional) by the plot.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.config import Config
from pipeline.core.errors import LmforgeError
from pipeline.core.io import atomic_write_bytes

LAW = "L(N, D) = E + A / N^alpha + B / D^beta"
FIT_PARAMS = ("E", "A", "alpha", "B", "beta")
EXPONENT_BOUNDS = (1e-3, 2.0)  # alpha, beta in (0, 2]: 0 itself would merge a term into E
SWEEP_DIR = "sweep"
# The config sections that shape the token shards (compared with the shards' config.yaml).
DATA_SECTIONS = ("seed", "storyworld", "validate", "synthesize", "tokenizer")


class SweepError(LmforgeError):
    """The sweep's grid, inputs or data cannot give a meaningful fit."""


# --------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------


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
    from pipeline.stages.pretrain import grad_accum_steps

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
    _check_inputs(predicted, tokens, [1.0] * len(points), [p.name for p in points], "sweep grid")
    return predicted


def count_params(cfg: Config, vocab_size: int) -> int:
    """N of `cfg.model` (no position embeddings), counted on the meta device (no memory)."""
    import torch

    from pipeline.model.gpt import GPT, GPTConfig

    with torch.device("meta"):
        return GPT(GPTConfig.from_params(cfg.model, vocab_size)).num_params()


# --------------------------------------------------------------------------------------
# Inputs from the data stages
# --------------------------------------------------------------------------------------


def require_tokenizer(cfg: Config) -> dict[str, Any]:
    """The shards' meta.json; a clear error saying how to build them when they are missing."""
    from pipeline.text.shards import META_FILE, ShardError, read_meta

    folder = cfg.path("tokenizer")
    try:
        return read_meta(folder)
    except ShardError as e:
        raise SweepError(
            f"{folder / META_FILE}: the sweep trains on the tokenizer's shards ({e}).\n"
            "Build them first: `dvc repro tokenizer` (it follows params.yaml; for a preset's "
            "data run `lmforge run --preset P` or `python -m pipeline.stages.<stage> "
            "--preset P` for validate, synthesize and tokenizer)."
        ) from None


def data_config_mismatch(cfg: Config) -> list[str]:
    """Keys of the data-shaping sections where the shards' config.yaml differs from `cfg`.

    Empty when they agree or when the shards carry no config.yaml. The sweep still trains
    on the shards as they are; the flow warns and the report records the keys.
    """
    path = cfg.path("tokenizer") / "config.yaml"
    if not path.is_file():
        return []
    built = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    wanted = cfg.to_dict()
    diffs = []
    for section in DATA_SECTIONS:
        a, b = _flat(built.get(section), section), _flat(wanted.get(section), section)
        diffs += [
            f"{k}: shards {a.get(k)!r}, sweep {b.get(k)!r}"
            for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)
        ]
    return diffs


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    """{'a': {'b': 1}} under prefix 'p' -> {'p.a.b': 1}; lists stay values."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def source_entropy(cfg: Config) -> tuple[dict[str, Any] | None, str]:
    """(the story world's entropy-rate estimate from reports/synthesize.json, or None; why).

    Only meaningful as a floor for the validation loss when every corpus source is the
    story world: then the val split holds story-world documents only.
    """
    path = cfg.path("reports") / "synthesize.json"
    if not path.is_file():
        return None, f"{path} not found: run `dvc repro synthesize` for the source entropy"
    est = json.loads(path.read_text(encoding="utf-8")).get("source_entropy")
    if not est:
        return None, "no source entropy in synthesize.json (the corpus is not the story world)"
    kinds = sorted({s.kind for s in cfg.validate.sources})
    if kinds != ["storyworld"]:
        return None, f"the corpus mixes sources {kinds}: the story world's entropy is no floor"
    return est, "story-world entropy rate (Monte Carlo over exact document log-probabilities)"


# --------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------


def fit_scaling_law(
    N: Sequence[float],
    D: Sequence[float],
    L: Sequence[float],
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Least-squares fit of L(N, D) = E + A/N^alpha + B/D^beta; residuals per point.

    N: parameters, D: tokens, L: loss (bits per byte), one entry per run, shapes (P,).
    Needs at least 5 distinct (N, D) pairs (5 parameters), 2 distinct N and 2 distinct D.
    Fitted in (E, log A', alpha, log B', beta) with N and D divided by their geometric means
    (A = A' n0^alpha), which keeps the problem well scaled; bounds E in [0, min L],
    alpha, beta in (0, 2]. Started from a grid of initial points; the lowest cost wins.

    Returns E, A, alpha, B, beta, rmse, r2 (None if L is constant), stderr per parameter
    (None where not estimable), at_bound (parameters on a bound: their stderr means little),
    dof, n_points, and `residuals`: one {point, N, D, loss, fit, residual} per input
    (residual = measured - fitted). Raises SweepError on bad input.
    """
    n, d, loss = _check_inputs(N, D, L, names)
    labels = list(names) if names is not None else [f"#{i}" for i in range(len(n))]
    n0, d0 = _geomean(n), _geomean(d)
    x = np.stack([np.log(n / n0), np.log(d / d0)])  # (2, P) log-scaled sizes and tokens
    best, lb, ub = _best_solution(x, loss)
    theta = best.x
    e, log_a, alpha, log_b, beta = (float(v) for v in theta)
    pred = _law(theta, x)
    res = loss - pred
    ss_res, ss_tot = float(res @ res), float(((loss - loss.mean()) ** 2).sum())
    dof = len(loss) - len(FIT_PARAMS)
    out: dict[str, Any] = {
        "E": e,
        "A": math.exp(log_a + alpha * math.log(n0)),
        "alpha": alpha,
        "B": math.exp(log_b + beta * math.log(d0)),
        "beta": beta,
        "rmse": math.sqrt(ss_res / len(loss)),
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else None,
        "n_points": len(loss),
        "dof": dof,
        "at_bound": _at_bound(theta, lb, ub),
        "stderr": _stderr(best.jac, ss_res, dof, math.log(n0), math.log(d0), theta),
        "law": LAW,
    }
    out["residuals"] = [
        {
            "point": lab,
            "N": float(a),
            "D": float(b),
            "loss": float(y),
            "fit": float(f),
            "residual": float(r),
        }
        for lab, a, b, y, f, r in zip(labels, n, d, loss, pred, res, strict=True)
    ]
    return out


def predict(fit: dict[str, Any], N: Any, D: Any) -> np.ndarray:
    """L(N, D) under a fit from `fit_scaling_law` (broadcasts over arrays)."""
    n, d = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    return fit["E"] + fit["A"] / n ** fit["alpha"] + fit["B"] / d ** fit["beta"]


def _check_inputs(
    N, D, L, names, where: str = "fit_scaling_law"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrays (P,) of N, D, L after checking lengths, values and the number of points;
    errors start with `where`."""
    if not len(N) == len(D) == len(L) or (names is not None and len(names) != len(N)):
        lens = f"{len(N)}, {len(D)}, {len(L)}" + (f", names {len(names)}" if names else "")
        raise SweepError(f"{where}: N, D and L need equal lengths, got {lens}")
    labels = list(names) if names is not None else [f"#{i}" for i in range(len(N))]
    for label, n, d, y in zip(labels, N, D, L, strict=True):
        for what, v in (("N (parameters)", n), ("D (tokens)", d), ("loss (bits/byte)", y)):
            if not _positive_finite(v):
                raise SweepError(
                    f"{where}: point {label}: {what} must be a finite number > 0, got {v!r}"
                )
    n_arr, d_arr, l_arr = (np.asarray(v, dtype=float) for v in (N, D, L))
    distinct = len(set(zip(n_arr.tolist(), d_arr.tolist(), strict=True)))
    hint = "add sizes to sweep.sizes or budgets to sweep.steps"
    if distinct < len(FIT_PARAMS):
        raise SweepError(
            f"{where}: {distinct} distinct (N, D) points cannot determine the "
            f"{len(FIT_PARAMS)} parameters of {LAW}; need at least 5 ({hint})"
        )
    for what, arr in (("model sizes N", n_arr), ("token budgets D", d_arr)):
        if len(set(arr.tolist())) < 2:
            raise SweepError(f"{where}: need at least 2 distinct {what} ({hint})")
    return n_arr, d_arr, l_arr


def _positive_finite(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return math.isfinite(f) and f > 0


def _geomean(a: np.ndarray) -> float:
    return float(np.exp(np.log(a).mean()))


def _law(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """theta = (E, log A', alpha, log B', beta); x = (log N/n0, log D/d0), shape (2, P)."""
    e, log_a, alpha, log_b, beta = theta
    return e + np.exp(log_a - alpha * x[0]) + np.exp(log_b - beta * x[1])


def _best_solution(x: np.ndarray, loss: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
    """scipy least_squares from every start of a small grid: (the lowest-cost solution,
    lower bounds, upper bounds)."""
    try:
        from scipy.optimize import least_squares
    except ImportError:
        raise SweepError("fit_scaling_law needs scipy: pip install scipy") from None
    lo_exp, hi_exp = EXPONENT_BOUNDS
    floor = float(loss.min())
    lb = np.array([0.0, -np.inf, lo_exp, -np.inf, lo_exp])
    ub = np.array([floor, np.inf, hi_exp, np.inf, hi_exp])
    best = None
    for start in _starts(loss):
        sol = least_squares(
            lambda th: _law(th, x) - loss, np.clip(start, lb, ub), bounds=(lb, ub), method="trf"
        )
        if best is None or sol.cost < best.cost:
            best = sol
    return best, lb, ub


def _starts(loss: np.ndarray) -> list[np.ndarray]:
    """Initial points: E from 0 to just below min L, exponents from 0.1 to 1, and the rest
    of the mean loss split evenly between the N and D terms."""
    floor, mean = float(loss.min()), float(loss.mean())
    starts = []
    for e in (0.0, 0.5 * floor, 0.9 * floor):
        scale = math.log(max(mean - e, 1e-6) / 2)
        for alpha in (0.1, 0.3, 1.0):
            for beta in (0.1, 0.3, 1.0):
                starts.append(np.array([e, scale, alpha, scale, beta]))
    return starts


def _at_bound(theta: np.ndarray, lb: np.ndarray, ub: np.ndarray) -> list[str]:
    names = ["E", "A", "alpha", "B", "beta"]
    tol = 1e-6 * np.maximum(1.0, np.abs(theta))
    hit = (np.abs(theta - lb) <= tol) | (np.abs(theta - ub) <= tol)
    return [n for n, h in zip(names, hit, strict=True) if h]


def _stderr(
    jac: np.ndarray, ss_res: float, dof: int, log_n0: float, log_d0: float, theta: np.ndarray
) -> dict[str, float | None]:
    """Asymptotic standard errors s^2 (J^T J)^-1 (delta method for A and B); None where the
    information matrix is singular or no degrees of freedom are left."""
    none = dict.fromkeys(FIT_PARAMS)
    if dof <= 0:
        return none
    jtj = jac.T @ jac  # (5, 5)
    if np.linalg.matrix_rank(jtj) < len(theta):
        return none
    cov = np.linalg.inv(jtj) * (ss_res / dof)
    a = math.exp(theta[1] + theta[2] * log_n0)
    b = math.exp(theta[3] + theta[4] * log_d0)
    # d log A / d theta = (0, 1, log n0, 0, 0), likewise for B; se(A) = A se(log A).
    grads = {
        "E": (np.eye(5)[0], 1.0),
        "A": (np.array([0, 1, log_n0, 0, 0]), a),
        "alpha": (np.eye(5)[2], 1.0),
        "B": (np.array([0, 0, 0, 1, log_d0]), b),
        "beta": (np.eye(5)[4], 1.0),
    }
    out: dict[str, float | None] = {}
    for name, (g, scale) in grads.items():
        var = float(g @ cov @ g)
        out[name] = scale * math.sqrt(var) if var >= 0 and math.isfinite(var) else None
    return out


# --------------------------------------------------------------------------------------
# Comparison with the source entropy, the report and the plot
# --------------------------------------------------------------------------------------


def entropy_comparison(fit: dict[str, Any], est: dict[str, Any] | None, why: str) -> dict:
    """E against the source entropy rate H, both in bits per byte, with an honest verdict."""
    e = fit["E"]
    if est is None:
        return {"E_bits_per_byte": e, "H_bits_per_byte": None, "E_minus_H": None, "note": why}
    h, se = float(est["bits_per_byte"]), float(est.get("stderr", 0.0))
    gap = e - h
    if gap >= -2 * se:
        verdict = (
            "E >= H as expected: no model beats the source's entropy rate. The gap E - H is "
            "what this architecture, context length and training recipe leave on the table "
            "even in the limit of N and D (plus the fit's extrapolation error)."
        )
    else:
        verdict = (
            "E < H, which no model can reach: the fit undershoots. With few, small points "
            "the E, A and B terms trade off against each other and E is poorly determined; "
            "add larger sizes and budgets before reading E as a floor."
        )
    if "E" in fit.get("at_bound", []):
        verdict += " E sits on its bound, so it is not determined by the data."
    return {
        "E_bits_per_byte": e,
        "H_bits_per_byte": h,
        "H_stderr": se,
        "E_minus_H": gap,
        "note": f"{why}. {verdict}",
    }


def report_markdown(
    rows: Sequence[dict[str, Any]],
    fit: dict[str, Any] | None,
    comparison: dict[str, Any] | None,
    failed: Sequence[dict[str, Any]] = (),
    fit_error: str | None = None,
) -> str:
    """The sweep report: one table row per point, then the fitted law and E against H."""
    lines = ["# Scaling-law sweep", "", f"`{LAW}`, L in validation bits per byte.", ""]
    lines += [
        "| point | layers | heads | width | N (params) | steps | D (tokens) "
        "| val bpb | fit | residual |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_point = {r["point"]: r for r in (fit or {}).get("residuals", [])}
    for r in rows:
        f = by_point.get(r["point"], {})
        lines.append(
            f"| {r['point']} | {r['n_layer']} | {r['n_head']} | {r['n_embd']} | {r['N']:,} "
            f"| {r['steps']} | {r['D']:,} | {r['val_bpb']:.4f} | {_f(f.get('fit'))} "
            f"| {_f(f.get('residual'), '+.4f')} |"
        )
    for f in failed:
        lines.append(f"| {f['point']} | failed: {f['error'].splitlines()[-1][:80]} |" + " |" * 8)
    lines += ["", "## Fit", ""]
    if fit is None:
        lines.append(f"No fit: {fit_error}")
        return "\n".join(lines) + "\n"
    se = fit["stderr"]
    lines += ["| parameter | value | stderr |", "|---|---|---|"]
    lines += [f"| {k} | {fit[k]:.4g} | {_f(se.get(k), '.2g')} |" for k in FIT_PARAMS]
    r2 = _f(fit["r2"], ".4f")
    lines += ["", f"RMSE {fit['rmse']:.4f} bits/byte, R² {r2}, {fit['n_points']} points, "]
    lines[-1] += f"{fit['dof']} degrees of freedom."
    if fit["at_bound"]:
        lines.append(f"On a bound (not determined by the data): {', '.join(fit['at_bound'])}.")
    if comparison:
        lines += ["", "## Irreducible loss against the source entropy", ""]
        lines += [
            f"- E (fitted floor): {comparison['E_bits_per_byte']:.4f} bits/byte",
            f"- H (source entropy rate): {_f(comparison['H_bits_per_byte'])} bits/byte"
            + (f" ± {comparison['H_stderr']:.4f}" if comparison.get("H_stderr") else ""),
            f"- E − H: {_f(comparison['E_minus_H'], '+.4f')} bits/byte",
            "",
            comparison["note"],
        ]
    return "\n".join(lines) + "\n"


def _f(v: Any, fmt: str = ".4f") -> str:
    return "–" if v is None else format(v, fmt)


def scaling_plot_png(
    rows: Sequence[dict[str, Any]],
    fit: dict[str, Any],
    path: Path,
    entropy_bpb: float | None = None,
) -> Path | None:
    """Loss against D per model size with the fitted curves, and residuals against D.

    Written atomically; None if matplotlib is missing (it is optional, see pipeline/core/plots.py).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax, ax_res) = plt.subplots(1, 2, figsize=(11, 4.2))
    d_all = np.array([r["D"] for r in rows], dtype=float)
    grid = np.geomspace(d_all.min() / 1.5, d_all.max() * 1.5, 100)  # (100,) tokens
    by_n = _group_by_size(rows)
    cmap = plt.get_cmap("viridis")
    res = {r["point"]: r["residual"] for r in fit["residuals"]}
    for i, (n, pts) in enumerate(by_n):
        color = cmap(i / max(len(by_n) - 1, 1))
        d = [p["D"] for p in pts]
        ax.plot(d, [p["val_bpb"] for p in pts], "o", color=color, label=f"N = {n:,}")
        ax.plot(grid, predict(fit, n, grid), "-", color=color, alpha=0.8)
        ax_res.plot(d, [res[p["point"]] for p in pts], "o-", color=color)
    ax.axhline(fit["E"], color="gray", ls="--", lw=1, label=f"E = {fit['E']:.3f}")
    if entropy_bpb is not None:
        ax.axhline(entropy_bpb, color="tab:red", ls=":", lw=1, label=f"H = {entropy_bpb:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("D (training tokens)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(
        f"E={fit['E']:.3f}  A={fit['A']:.3g}  α={fit['alpha']:.2f}  "
        f"B={fit['B']:.3g}  β={fit['beta']:.2f}",
        fontsize=9,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax_res.axhline(0, color="gray", lw=1)
    ax_res.set_xscale("log")
    ax_res.set_xlabel("D (training tokens)")
    ax_res.set_ylabel("measured − fitted (bits/byte)")
    ax_res.set_title(f"residuals (RMSE {fit['rmse']:.4f})", fontsize=9)
    ax_res.grid(alpha=0.3, which="both")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _group_by_size(rows: Sequence[dict[str, Any]]) -> list[tuple[int, list[dict[str, Any]]]]:
    """[(N, that size's rows sorted by D)] sorted by N."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(int(r["N"]), []).append(r)
    return [(n, sorted(g, key=lambda r: r["D"])) for n, g in sorted(groups.items())]
