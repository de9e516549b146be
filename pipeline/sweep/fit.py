"""The scaling-law fit: L(N, D) = E + A / N^alpha + B / D^beta by bounded least squares.

Hoffmann et al. 2022 ("approach 3"), fitted with scipy's ``least_squares`` from a small grid
of starts; the lowest-cost solution wins.

- L: validation bits per byte (bits per UTF-8 byte, so it does not depend on the tokenizer
  and compares with the source entropy rate);
- N: parameters without position embeddings (the tied token embedding counted once);
- D: training tokens seen;
- E: the irreducible loss.

scipy is imported lazily by the fit only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.core.errors import LmforgeError

LAW = "L(N, D) = E + A / N^alpha + B / D^beta"
FIT_PARAMS = ("E", "A", "alpha", "B", "beta")
EXPONENT_BOUNDS = (1e-3, 2.0)  # alpha, beta in (0, 2]: 0 itself would merge a term into E


class SweepError(LmforgeError):
    """The sweep's grid, inputs or data cannot give a meaningful fit."""


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
    n, d, loss = check_inputs(N, D, L, names)
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


def check_inputs(
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
