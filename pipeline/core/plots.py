"""Plots for MLflow and reports, drawn with matplotlib when it is installed.

Optional by design: the GPU benchmark machine has no matplotlib, and DVC renders its own
plots from the JSON curves the stages write; these PNGs are for the MLflow UI.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def loss_curve_png(
    history: Sequence[dict[str, float]], path: Path, title: str = "pretraining loss"
) -> Path | None:
    """Train loss per step, and val loss where evaluated; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train loss")
    val = [r for r in history if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bar_chart_png(results: dict[str, dict[str, float]], path: Path) -> Path | None:
    """One panel per metric, one bar per method; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = list(results)
    metrics = list(next(iter(results.values())))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2))
    for ax, metric in zip(axes, metrics, strict=True):
        ax.bar(methods, [results[m][metric] for m in methods], color="tab:blue")
        ax.set_title(metric)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
