"""Plots for MLflow and reports, drawn with matplotlib when it is installed.

Optional by design: the GPU benchmark machine has no matplotlib, and DVC renders its own
plots from the JSON curves the stages write; these PNGs are for the MLflow UI.

Each chart has a `*_figure` function that builds the matplotlib figure (what the tests
inspect: lines, bars, labels) and a `*_png` function that saves it; both return None when
matplotlib is missing, so a caller only checks for None.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

History = Sequence[Mapping[str, float]]  # rows of {"step", "loss"[, "val_loss"]}


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on CI or in a stage process
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_png(fig: Any, path: Path) -> Path | None:
    """Save `fig` (None: matplotlib is missing) as a PNG at `path`, close it; the path or None."""
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)  # pyplot keeps every open figure alive otherwise
    return path


def loss_curve_figure(
    histories: History | Mapping[str, History],
    title: str = "pretraining loss",
    val_label: str = "val loss",
) -> Any:
    """Train loss per step, and `val_loss` points where evaluated; None without matplotlib.

    `histories` is one history (lines labelled "train loss" and `val_label`) or several by
    name (one train line per name, its val points in the same colour, both named): the
    fine-tuning methods on one chart.
    """
    plt = _pyplot()
    if plt is None:
        return None
    named = histories if isinstance(histories, Mapping) else {"": histories}
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, history in named.items():
        prefix = f"{name} " if name else ""
        (line,) = ax.plot(
            [r["step"] for r in history], [r["loss"] for r in history], label=f"{prefix}train loss"
        )
        val = [r for r in history if "val_loss" in r]
        if val:
            ax.plot(
                [r["step"] for r in val],
                [r["val_loss"] for r in val],
                "o-" if len(val) > 1 else "o",
                color=line.get_color(),  # a method's val points match its train line
                label=f"{prefix}{val_label}",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def loss_curve_png(
    histories: History | Mapping[str, History],
    path: Path,
    title: str = "pretraining loss",
    val_label: str = "val loss",
) -> Path | None:
    """`loss_curve_figure` saved at `path`; None if matplotlib is missing."""
    return save_png(loss_curve_figure(histories, title, val_label), path)


def bar_chart_figure(results: Mapping[str, Mapping[str, float]]) -> Any:
    """One panel per metric, one bar per method; None if matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    methods = list(results)
    metrics = list(next(iter(results.values())))
    # squeeze=False: a list of axes even for a single metric
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.bar(methods, [results[m][metric] for m in methods], color="tab:blue")
        ax.set_title(metric)
        ax.tick_params(axis="x", rotation=30)
    return fig


def bar_chart_png(results: Mapping[str, Mapping[str, float]], path: Path) -> Path | None:
    """`bar_chart_figure` saved at `path`; None if matplotlib is missing."""
    return save_png(bar_chart_figure(results), path)


def loss_by_position_figure(losses: Sequence[float], title: str = "loss by position") -> Any:
    """Mean loss at each position of the context window; None if matplotlib is missing.

    Position t predicts token t + 1 from the t + 1 tokens before it, so the curve falls as
    the model sees more context (position 0 has only one token to go on).
    """
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(len(losses)), list(losses))
    ax.set_xlabel("position in the context window (tokens)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def loss_by_position_png(losses: list[float], path: Path) -> Path | None:
    """`loss_by_position_figure` saved at `path`; None if matplotlib is missing."""
    return save_png(loss_by_position_figure(losses), path)
