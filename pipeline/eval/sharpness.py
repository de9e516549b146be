"""How flat is a minimum: ε-sharpness at given weights, and the sentences that read the measures.

- `epsilon_sharpness`: max_{‖δ‖≤ρ} L(w + δ) − L(w), δ over all parameters jointly, estimated
  by projected gradient ascent started at SAM's point ρ·g/‖g‖ (Keskar et al. 2017; Foret et
  al. 2021). A lower bound on the true maximum: more steps can only find a higher loss.
- The extreme Hessian eigenvalues λmax and λmin, by Lanczos: `pipeline/eval/hessian.py`.
- `flatness_verdict`: plain sentences saying what such numbers show (flatter or NOT flatter than
  a baseline; negative curvature; unconverged estimates), for the reports and the model card.

`epsilon_sharpness` takes `loss_fn(model) -> scalar Tensor` computed on a fixed batch, runs the
model in eval mode (no dropout) and restores every module's train/eval flag afterwards, so a
call is deterministic and leaves the model as it found it: weights bit for bit, `.grad`
untouched (pipeline/eval/loss_surface.py). Pass the bare module, not a DDP wrapper.
Torch-only core: torch and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.eval.loss_surface import (
    LossFn,
    eval_mode,
    global_norm,
    grads_of,
    random_unit,
    scalar_loss,
    trainable,
)


def _check_sharpness_args(rho: Any, steps: Any, lr: Any) -> None:
    if not isinstance(rho, int | float) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"epsilon_sharpness: rho must be a finite number > 0, got {rho!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"epsilon_sharpness: steps must be an integer >= 0, got {steps!r}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"epsilon_sharpness: lr must be > 0 or None, got {lr!r}")


class _Perturbation:
    """Moves the weights to original + δ (and back), and takes the loss and gradient there."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.params = trainable(model, "epsilon_sharpness")
        self.original = [p.detach().clone() for p in self.params]

    def move_to(self, delta: list[Tensor] | None) -> None:
        """Weights = original + delta; None copies back the saved tensors (bit-identical)."""
        with torch.no_grad():
            for i, (p, w) in enumerate(zip(self.params, self.original, strict=True)):
                p.copy_(w if delta is None else w + delta[i])

    def loss_and_grad(self) -> tuple[float, list[Tensor]]:
        loss = scalar_loss(self.model, self.loss_fn, "epsilon_sharpness")
        return loss.item(), grads_of(loss, self.params)


def _start(g: list[Tensor], params: list[Tensor], rho: float, seed: int) -> list[Tensor]:
    """SAM's point ρ·g/‖g‖; a seeded random direction of norm ρ where g = 0 (or not finite)."""
    g_norm = global_norm(g).item()
    if g_norm > 0 and math.isfinite(g_norm):
        return [gi * (rho / g_norm) for gi in g]
    return [u * rho for u in random_unit(params, seed)]


def _ascend(
    probe: _Perturbation,
    delta: list[Tensor],
    rho: float,
    steps: int,
    lr: float | None,
    max_loss: float,
) -> tuple[list[Tensor], float]:
    """`steps` projected gradient-ascent steps from δ: (the last δ, the highest loss seen)."""
    for _ in range(steps):
        probe.move_to(delta)
        loss, g = probe.loss_and_grad()
        max_loss = max(max_loss, loss)
        g_norm = global_norm(g).item()
        if not g_norm > 0:  # flat here (or not finite): nowhere better to go
            break
        eta = rho / g_norm if lr is None else lr
        delta = [d + eta * gi for d, gi in zip(delta, g, strict=True)]
        d_norm = global_norm(delta).item()
        if d_norm > rho:  # project onto the ball
            delta = [d * (rho / d_norm) for d in delta]
    return delta, max_loss


def epsilon_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    rho: float,
    steps: int = 5,
    lr: float | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """The largest loss increase found within the L2 ball ‖δ‖ ≤ ρ around the current weights.

    δ starts at ρ·g/‖g‖ (SAM's point; a seeded random direction of norm ρ where g = 0, e.g. at
    an exact critical point); each of `steps` steps does δ ← δ + η·∇L(w + δ) and projects back
    onto the ball. `lr=None` takes η = ρ/‖∇L(w + δ)‖, a step of length ρ, which needs no tuning
    to the loss's scale. Every point visited counts, and δ = 0 too, so `sharpness` >= 0.

    Returns {"base_loss", "max_loss", "sharpness": max_loss - base_loss, "rho", "steps"}.
    """
    _check_sharpness_args(rho, steps, lr)
    probe = _Perturbation(model, loss_fn)
    with eval_mode(model):
        try:
            base_loss, g = probe.loss_and_grad()
            start = _start(g, probe.params, rho, seed)
            delta, max_loss = _ascend(probe, start, rho, steps, lr, base_loss)
            probe.move_to(delta)  # the last point of the ascent counts too
            with torch.no_grad():
                max_loss = max(max_loss, loss_fn(model).item())
        finally:
            probe.move_to(None)
    return {
        "base_loss": base_loss,
        "max_loss": max_loss,
        "sharpness": max_loss - base_loss,
        "rho": float(rho),
        "steps": steps,
    }


def _pair(mine: float, theirs: float) -> str:
    """`mine vs theirs` with 3 significant digits, more if needed for them to read differently."""
    for digits in range(3, 8):
        a, b = f"{mine:.{digits}g}", f"{theirs:.{digits}g}"
        if a != b or mine == theirs:
            break
    return f"{a} vs {b}"


def _finite(r: Mapping[str, Any], key: str) -> float | None:
    v = r.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _comparison(method: str, r: Mapping[str, Any], base: str, b: Mapping[str, Any]) -> str:
    """`method` vs `base` by each measure (lower is flatter), stated even when it is not."""
    measures = (("ε-sharpness", "sharpness"), ("the largest Hessian eigenvalue", "hessian_max_eig"))
    flatter, not_flatter, missing = [], [], []
    for label, key in measures:
        mine, theirs = _finite(r, key), _finite(b, key)
        if mine is None or theirs is None:
            missing.append(label)
        else:
            (flatter if mine < theirs else not_flatter).append(f"{label} ({_pair(mine, theirs)})")
    if flatter and not not_flatter:
        text = f"{method} is flatter than {base} by " + " and by ".join(flatter)
    elif not_flatter and not flatter:
        text = f"{method} is NOT flatter than {base} by " + " nor by ".join(not_flatter)
    elif flatter:
        text = f"{method} is flatter than {base} by {flatter[0]} but NOT by {not_flatter[0]}"
    else:
        text = f"{method} cannot be compared with {base}"
    if missing:
        text += f" ({' and '.join(missing)} not measured)"
    return text + "."


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# A smallest eigenvalue closer to 0 than this share of the largest one is rounding (HVPs run in
# the weights' dtype, float32 for the GPT), not curvature.
NEGLIGIBLE = 1e-4


def _curvature(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What λmin says (a minimum or not), and which estimates did not converge.

    A negative λmin is a Ritz value, i.e. vᵀHv/vᵀv < 0 for the vector v found, which proves
    that H has an eigenvalue at most that low (Courant–Fischer), converged or not.
    """
    negative, flat, positive, unconverged = [], [], [], []
    for method, r in results.items():
        lmin, lmax = _finite(r, "hessian_min_eig"), _finite(r, "hessian_max_eig")
        if r.get("hessian_converged") is not True:
            unconverged.append(method)
        if lmin is None:
            continue
        lmax = lmin if lmax is None else lmax
        if lmin < -NEGLIGIBLE * max(abs(lmin), abs(lmax)):
            bound = "≤ " if method in unconverged else ""  # unconverged: an upper bound on λmin
            negative.append(f"{method} ({bound}{lmin:.3g})")
        elif lmin < 0:
            flat.append(f"{method} ({lmin:.3g}, next to {lmax:.3g})")
        elif method not in unconverged:
            positive.append(method)
    out = []
    if negative:
        out.append(
            f"The Hessian has a negative eigenvalue for {_and(negative)}: those weights are "
            "not at a minimum of the loss on this batch (a saddle point, or descent was still "
            "possible)."
        )
    if flat:
        out.append(
            f"The smallest Hessian eigenvalue of {_and(flat)} is negative only at the level of "
            "rounding: no negative curvature resolved."
        )
    if positive:
        out.append(
            f"No negative Hessian eigenvalue for {_and(positive)}: consistent with a minimum."
        )
    if unconverged:
        out.append(
            f"Lanczos did not converge within its budget of Hessian-vector products for "
            f"{_and(unconverged)} (residuals in the table): their largest eigenvalues are lower "
            "bounds on the true ones and their smallest upper bounds, so a comparison by the "
            "largest eigenvalue is indicative only."
        )
    return out


def flatness_verdict(
    results: Mapping[str, Mapping[str, Any]], baseline: str = "adamw"
) -> list[str]:
    """Plain sentences, generated from the numbers, saying what the flatness measurements show.

    `results` maps a method to its measurements: `sharpness` (ε-sharpness), `hessian_max_eig`,
    `hessian_min_eig`, `hessian_converged` (the residuals are for the tables). First, for each
    method but `baseline`, whether it is flatter than the baseline (lower is flatter) by
    ε-sharpness and by the largest Hessian eigenvalue, each stated, "NOT" included, e.g. "sam is
    flatter than adamw by ε-sharpness (0.154 vs 0.39) and by the largest Hessian eigenvalue
    (68.2 vs 386)."; then which methods have negative curvature (λmin < 0 beyond rounding: not
    a minimum), which none, and which estimates did not converge.
    """
    lines = []
    if baseline not in results:
        lines.append(f"No {baseline} baseline was measured, so flatness is not compared.")
    else:
        base = results[baseline]
        lines += [_comparison(m, r, baseline, base) for m, r in results.items() if m != baseline]
    return lines + _curvature(results)
