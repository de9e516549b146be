"""The comparison of fine-tuning methods: per-method measures, report, markdown and chart.

`measure` scores one fine-tuned model (held-out answer loss, task accuracy, flatness);
`comparison_report` is `reports/finetune.json`, ending with sentences generated from the
numbers that say whether each method is flatter than adamw, or NOT, by each measure
(`flatness_verdict`); `comparison_markdown` is `reports/finetune.md`; `comparison_chart`
draws the bar chart of the `PLOTTED` numbers for MLflow, and `loss_chart` every method's
training loss curve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.core.markdown import table
from pipeline.core.plots import bar_chart_png, loss_curve_png
from pipeline.eval.flatness import flatness_measures
from pipeline.eval.report import FLATNESS_HEADER, converged_cell, flatness_cells
from pipeline.eval.sharpness import flatness_verdict
from pipeline.model.gpt import GPT
from pipeline.train.finetune import Data

# The per-method numbers of the comparison that the bar chart shows (residuals and the
# convergence flag are in the JSON and the table, not worth a panel each).
PLOTTED = ("answer_loss", "task_accuracy", "sharpness", "hessian_max_eig", "hessian_min_eig")


def measure(model: GPT, data: Data, cfg: Config) -> dict[str, Any]:
    """Held-out answer loss, task accuracy, and the flatness of the final weights.

    Flatness on the fixed held-out batch: epsilon-sharpness, and the largest and smallest
    Hessian eigenvalues by Lanczos (`finetune.hessian_iters` Hessian-vector products for
    each), with their residuals ||Hv - lambda v|| / ||v|| and whether both converged.
    """
    x, y = data.eval_batch  # (B, T) token ids each

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        return m(x, y)[1]

    f = cfg.finetune
    measures, _ = flatness_measures(
        model, loss_fn, f.sharpness_rho, f.sharpness_steps, f.hessian_iters
    )
    return {**data.score(model), **measures}


def comparison_report(
    results: dict[str, dict[str, Any]], chosen: str, compare: bool
) -> dict[str, Any]:
    """`reports/finetune.json`: the chosen method, every method's numbers, what they show."""
    report: dict[str, Any] = {"method": chosen, "compare": compare, "methods": results}
    report["flatness"] = flatness_verdict(results)  # the sentences finetune.md ends with
    return report


def comparison_markdown(results: dict[str, dict[str, Any]], chosen: str) -> str:
    """The comparison table, then what its numbers show (`flatness_verdict`), as bullets."""
    header = ["method", "held-out answer loss", "task accuracy", *FLATNESS_HEADER]
    header += ["Lanczos residuals (largest, smallest)", "converged"]
    rows = [
        [
            f"{m} (moves on)" if m == chosen else m,
            f"{r['answer_loss']:.4f}",
            f"{r['task_accuracy']:.3f}",
            *flatness_cells(r),
            f"{r['hessian_max_residual']:.2g}, {r['hessian_min_residual']:.2g}",
            converged_cell(r),
        ]
        for m, r in results.items()
    ]
    lines = table(header, rows)
    lines += ["", "What the numbers show (lower is flatter):", ""]
    lines += [f"- {sentence}" for sentence in flatness_verdict(results)]
    return "\n".join(lines) + "\n"


def comparison_chart(results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """A bar chart of the `PLOTTED` numbers per method at `path`; None without matplotlib."""
    plotted = {m: {k: r[k] for k in PLOTTED} for m, r in results.items()}
    return bar_chart_png(plotted, path)


def loss_chart(
    histories: dict[str, list[dict[str, float]]], results: dict[str, dict[str, Any]], path: Path
) -> Path | None:
    """Each method's train loss per step, then its held-out loss; None without matplotlib.

    The held-out point (`answer_loss`) is of the final weights, at the last step: for the
    SWA methods those are the average, so it can sit apart from the curve of the live ones.
    """
    curves = {
        m: [*h[:-1], {**h[-1], "val_loss": results[m]["answer_loss"]}] if h else []
        for m, h in histories.items()
    }
    return loss_curve_png(curves, path, "fine-tuning loss", "held-out loss")
