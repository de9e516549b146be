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
