"""The sweep's report: E against the source entropy, the markdown table and the plot.

matplotlib is optional (imported by the plot only; see pipeline/core/plots.py).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.io import atomic_write_bytes
from pipeline.core.markdown import table
from pipeline.sweep.fit import FIT_PARAMS, LAW, predict


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
    header = ["point", "layers", "heads", "width", "N (params)", "steps", "D (tokens)"]
    header += ["val bpb", "fit", "residual"]
    by_point = {r["point"]: r for r in (fit or {}).get("residuals", [])}
    cells = []
    for r in rows:
        f = by_point.get(r["point"], {})
        cells.append(
            [str(r[k]) for k in ("point", "n_layer", "n_head", "n_embd")]
            + [f"{r['N']:,}", str(r["steps"]), f"{r['D']:,}", f"{r['val_bpb']:.4f}"]
            + [_f(f.get("fit")), _f(f.get("residual"), "+.4f")]
        )
    for f in failed:  # the error's last line, escaped by `table`: free text cannot break it
        cells.append([f["point"], f"failed: {f['error'].splitlines()[-1][:80]}", *[""] * 8])
    lines += table(header, cells)
    lines += ["", "## Fit", ""]
    if fit is None:
        lines.append(f"No fit: {fit_error}")
        return "\n".join(lines) + "\n"
    se = fit["stderr"]
    lines += table(
        ["parameter", "value", "stderr"],
        [[k, f"{fit[k]:.4g}", _f(se.get(k), ".2g")] for k in FIT_PARAMS],
    )
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
