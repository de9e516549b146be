"""How flat is a minimum: ε-sharpness and the extreme Hessian eigenvalues at given weights.

Both take `loss_fn(model) -> scalar Tensor` computed on a fixed batch, run the model in eval mode
(no dropout) and restore every module's train/eval flag afterwards, so a call is deterministic
and leaves the model as it found it: weights bit for bit, `.grad` untouched (gradients are taken
with `torch.autograd.grad`, never accumulated). Pass the bare module, not a DDP wrapper.

- `epsilon_sharpness`: max_{‖δ‖≤ρ} L(w + δ) − L(w), δ over all parameters jointly, estimated
  by projected gradient ascent started at SAM's point ρ·g/‖g‖ (Keskar et al. 2017; Foret et
  al. 2021). A lower bound on the true maximum: more steps can only find a higher loss.
- `hessian_extreme_eigenvalues`: the largest *algebraic* eigenvalue λmax (the sharpest
  curvature) and the smallest λmin (negative when the weights are not at a minimum), each by
  Lanczos (ARPACK's `scipy.sparse.linalg.eigsh`, which="LA" / "SA") on Hessian-vector products
  by double backprop (Pearlmutter 1994), with the residual ‖Hv − λv‖/‖v‖ of each and whether
  ARPACK converged. Power iteration would give the eigenvalue of largest *magnitude* instead,
  which away from a minimum is a large negative one: not what "λmax" means.
- `flatness_verdict`: plain sentences saying what such numbers show (flatter or NOT flatter than
  a baseline; negative curvature; unconverged estimates), for the reports and the model card.

Attention runs through SDPA's math kernel while differentiating twice: the fused flash and
memory-efficient kernels have no double backward.

Dependencies: this module is in the torch-only core (torch, numpy and the standard library at
import time), which the GPU machine runs without scipy. `hessian_extreme_eigenvalues` imports
scipy inside the function, so everything else here works without it, and calling it without
scipy raises an ImportError that says so; only the finetune and evaluate stages call it, and
they run where the project's dependencies (scipy among them) are installed.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module], Tensor]
log = logging.getLogger(__name__)


def _trainable(model: nn.Module, who: str) -> list[Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight once
    if not params:
        raise ValueError(f"{who}: the model has no parameters with requires_grad=True")
    return params


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() inside; every submodule's own flag restored after (not just the root's)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _math_sdpa() -> contextlib.AbstractContextManager:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: its default CPU path is differentiable twice
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _scalar_loss(model: nn.Module, loss_fn: LossFn, who: str) -> Tensor:
    loss = loss_fn(model)
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError(
            f"{who}: loss_fn(model) must return a scalar tensor that depends on the parameters, "
            f"got {type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}"
        )
    return loss.reshape(())


def _norm(tensors: list[Tensor]) -> Tensor:
    """One L2 norm over a list of tensors, accumulated in at least float32."""
    return torch.stack(
        [t.norm(2, dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]
    ).norm(2)


def _grads(loss: Tensor | list[Tensor], params: list[Tensor], **kwargs: Any) -> list[Tensor]:
    """d loss / d params (a vector-Jacobian product with `grad_outputs`), zeros where unreached."""
    grads = torch.autograd.grad(loss, params, allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def _random_unit(params: list[Tensor], seed: int) -> list[Tensor]:
    """A random direction of global norm 1, drawn on the CPU so it is the same on any device."""
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    n = _norm(v)
    return [(t / n).to(p.device, p.dtype) for t, p in zip(v, params, strict=True)]


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
    if not isinstance(rho, int | float) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"epsilon_sharpness: rho must be a finite number > 0, got {rho!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"epsilon_sharpness: steps must be an integer >= 0, got {steps!r}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"epsilon_sharpness: lr must be > 0 or None, got {lr!r}")
    params = _trainable(model, "epsilon_sharpness")
    original = [p.detach().clone() for p in params]

    def move_to(delta: list[Tensor] | None) -> None:  # weights = original + delta
        with torch.no_grad():
            for i, (p, w) in enumerate(zip(params, original, strict=True)):
                p.copy_(w if delta is None else w + delta[i])

    def loss_and_grad() -> tuple[float, list[Tensor]]:
        loss = _scalar_loss(model, loss_fn, "epsilon_sharpness")
        return loss.item(), _grads(loss, params)

    with _eval_mode(model):
        try:
            base_loss, g = loss_and_grad()
            g_norm = _norm(g).item()
            if g_norm > 0 and math.isfinite(g_norm):
                delta = [gi * (rho / g_norm) for gi in g]  # SAM's point
            else:
                delta = [u * rho for u in _random_unit(params, seed)]
            max_loss = base_loss
            for _ in range(steps):
                move_to(delta)
                loss, g = loss_and_grad()
                max_loss = max(max_loss, loss)
                g_norm = _norm(g).item()
                if not g_norm > 0:  # flat here (or not finite): nowhere better to go
                    break
                eta = rho / g_norm if lr is None else lr
                delta = [d + eta * gi for d, gi in zip(delta, g, strict=True)]
                d_norm = _norm(delta).item()
                if d_norm > rho:  # project onto the ball
                    delta = [d * (rho / d_norm) for d in delta]
            move_to(delta)
            with torch.no_grad():
                max_loss = max(max_loss, loss_fn(model).item())
        finally:
            move_to(None)  # copies back the saved tensors: bit-identical
    return {
        "base_loss": base_loss,
        "max_loss": max_loss,
        "sharpness": max_loss - base_loss,
        "rho": float(rho),
        "steps": steps,
    }


class _BudgetSpent(Exception):
    """Raised from the Lanczos matvec when its budget of Hessian-vector products is used up."""


Hvp = Callable[[Tensor], Tensor]  # (n,) float64 CPU -> (n,) float64 CPU


def _hvp_operator(grads: list[Tensor], params: list[Tensor]) -> Hvp:
    """x ↦ Hx on flat float64 CPU vectors (n,), with H the Hessian w.r.t. `params`.

    Hx = ∇(∇L·x): a vector-Jacobian product of the gradient (built with create_graph=True)
    with x cut into one tensor per parameter, in the parameter's own dtype and device.
    """
    sizes = [p.numel() for p in params]

    def hvp(x: Tensor) -> Tensor:
        chunks = x.split(sizes)
        v = [c.view(p.shape).to(p.device, p.dtype) for c, p in zip(chunks, params, strict=True)]
        hv = _grads(grads, params, grad_outputs=v, retain_graph=True)
        return torch.cat([h.reshape(-1).to(torch.float64).cpu() for h in hv])

    return hvp


class _KrylovRecord:
    """A LinearOperator's matvec that stops after `budget` products and keeps what it saw.

    Every input x_k is kept, with the Gram matrices XᵀX and XᵀHX grown one row per product
    (xᵢᵀHx_k = xᵢ·(Hx_k), so Hx_k itself is not kept). If ARPACK stops before it converges,
    the Rayleigh–Ritz pairs of H on span(X) are still the best estimates those products allow,
    and by Courant–Fischer the largest Ritz value is <= λmax and the smallest >= λmin.
    Memory: one float64 copy of the parameters per product. The vector arithmetic is torch's
    (its thread pool, sized by the caller), not numpy's BLAS, whose threads spin-wait for a
    busy CPU: on 2 loaded cores that made each product ~1.5x slower.
    """

    def __init__(self, hvp: Hvp, budget: int) -> None:
        self.hvp, self.budget = hvp, budget
        self.xs: list[Tensor] = []
        self.gram = np.zeros((budget, budget))  # xᵢ·xⱼ
        self.quad = np.zeros((budget, budget))  # xᵢ·Hxⱼ

    def matvec(self, x: np.ndarray) -> np.ndarray:
        k = len(self.xs)
        if k >= self.budget:
            raise _BudgetSpent
        xt = torch.tensor(x.reshape(-1), dtype=torch.float64)  # a copy: ARPACK reuses x
        hx = self.hvp(xt)
        self.xs.append(xt)
        for i, xi in enumerate(self.xs):  # symmetric by construction, as H is
            self.gram[i, k] = self.gram[k, i] = torch.dot(xi, xt).item()
            self.quad[i, k] = self.quad[k, i] = torch.dot(xi, hx).item()
        return hx.numpy()

    def ritz(self, largest: bool) -> tuple[float, Tensor]:
        """The extreme Ritz value of H on span(X), and its Ritz vector (n,)."""
        k = len(self.xs)
        s, u = np.linalg.eigh(self.gram[:k, :k])
        keep = s > s.max() * 1e-12  # directions the inputs really span
        basis = u[:, keep] / np.sqrt(s[keep])  # (k, r): X @ basis is orthonormal
        theta, c = np.linalg.eigh(basis.T @ self.quad[:k, :k] @ basis)
        j = -1 if largest else 0
        coef = basis @ c[:, j]  # (k,)
        z = torch.zeros_like(self.xs[0])
        for ci, xi in zip(coef.tolist(), self.xs, strict=True):
            z.add_(xi, alpha=ci)
        return float(theta[j]), z


def hessian_extreme_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """λmax and λmin, the largest and smallest (algebraic) eigenvalues of the Hessian of the loss.

    Each end is one Lanczos run, `scipy.sparse.linalg.eigsh(k=1, which="LA" | "SA")`, on a
    float64 `LinearOperator` whose matvec is a Hessian-vector product by double backprop, from
    the same seeded start vector (deterministic). Each run may use at most `iters` products:
    `ncv = iters - 1` Lanczos vectors (ARPACK spends one product more before its first
    convergence test), and a product past the budget stops it. ARPACK's test is ‖Hv − λv‖ <=
    tol·|λ|. When it does not converge (budget spent, or ArpackNoConvergence), the extreme Ritz
    pair on the span of every vector it multiplied is returned instead: by Courant–Fischer
    `max` <= λmax and `min` >= λmin. One more product per end measures the residual
    ‖Hv − λv‖/‖v‖ of the vector returned (an eigenvalue of H lies within it of λ); a Ritz pair
    is reported converged only if that measured residual passes ARPACK's test, else
    converged=False. (Neither test can prove that no larger eigenvalue was missed: one whose
    direction the seeded start vector nearly lacks.)

    With n <= `iters` weights (or n <= 2, below what ARPACK accepts), H is built column by
    column from n products and diagonalised exactly. Weights whose gradient is constant (no
    graph) have zero rows and columns of H, hence add eigenvalue 0, which is accounted for.
    Cost: at most 2·iters + 2 products and one gradient with create_graph=True; the power
    iteration it replaces used up to `iters`.

    scipy is imported here, not at module level (see the module docstring): without it this
    raises ImportError. Returns {"max", "min", "max_residual", "min_residual",
    "max_converged", "min_converged", "hvps": products computed, "dim": number of weights}.
    """
    try:
        from scipy.sparse.linalg import ArpackError, LinearOperator, eigsh
    except ImportError as err:  # the torch-only GPU environment
        raise ImportError(
            "hessian_extreme_eigenvalues needs scipy (scipy.sparse.linalg.eigsh), which is not "
            "installed here; it is a dependency of the project (pyproject.toml), but not of the "
            "torch-only core"
        ) from err
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(
            f"hessian_extreme_eigenvalues: iters must be an integer >= 1, got {iters!r}"
        )
    if not (isinstance(tol, int | float) and tol >= 0):
        raise ValueError(f"hessian_extreme_eigenvalues: tol must be >= 0, got {tol!r}")
    params = _trainable(model, "hessian_extreme_eigenvalues")
    dim = sum(p.numel() for p in params)
    with _eval_mode(model), _math_sdpa():
        loss = _scalar_loss(model, loss_fn, "hessian_extreme_eigenvalues")
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        # A gradient with no graph is constant: its rows (and, by symmetry, columns) of H are 0.
        used = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
        used = [(p, g) for p, g in used if g.requires_grad]
        if not used:  # the loss is linear (or constant) in the weights: H = 0
            return _eig_result(0.0, 0.0, 0.0, 0.0, True, True, 0, dim)
        ps, gs = [p for p, _ in used], [g for _, g in used]
        n = sum(p.numel() for p in ps)
        calls = [0]
        hvp_once = _hvp_operator(gs, ps)

        def hvp(x: Tensor) -> Tensor:
            calls[0] += 1
            return hvp_once(x)

        ends: dict[str, tuple[float, Tensor, bool]] = {}
        if n <= max(iters, 2):  # exact: H from n products, then a dense eigensolver
            eye = torch.eye(n, dtype=torch.float64)
            h = torch.stack([hvp(col) for col in eye], dim=1).numpy()  # (n, n), column i = H e_i
            lam, vec = np.linalg.eigh((h + h.T) / 2)
            for key, j in (("max", -1), ("min", 0)):
                ends[key] = (float(lam[j]), torch.from_numpy(vec[:, j].copy()), True)
        else:
            gen = torch.Generator().manual_seed(seed)
            v0 = torch.cat([torch.randn(p.numel(), generator=gen, dtype=torch.float64) for p in ps])
            for key, which in (("max", "LA"), ("min", "SA")):
                record = _KrylovRecord(hvp, iters)
                op = LinearOperator((n, n), matvec=record.matvec, dtype=np.float64)
                try:
                    w, v = eigsh(
                        op, k=1, which=which, v0=v0.numpy(), ncv=max(2, iters - 1),
                        maxiter=iters, tol=tol,
                    )  # fmt: skip
                    ends[key] = (float(w[0]), torch.from_numpy(v[:, 0].copy()), True)
                except (_BudgetSpent, ArpackError) as err:  # ArpackNoConvergence is one
                    if not isinstance(err, _BudgetSpent):
                        log.info("hessian_extreme_eigenvalues[%s]: %s", which, err)
                    ritz_value, ritz_vector = record.ritz(largest=which == "LA")
                    ends[key] = (ritz_value, ritz_vector, False)
        residual = {
            key: ((hvp(z) - lam * z).norm() / z.norm()).item() for key, (lam, z, _) in ends.items()
        }
    # Stopped early, the Ritz pair may still pass ARPACK's own test, on its measured residual.
    ok = {key: done or residual[key] <= tol * abs(lam) for key, (lam, _, done) in ends.items()}
    (lmax, _, _), (lmin, _, _) = ends["max"], ends["min"]
    rmax, rmin, max_ok, min_ok = residual["max"], residual["min"], ok["max"], ok["min"]
    if dim > n:  # the constant weights' eigenvalue 0, exact (any unit vector on their block)
        if lmax < 0:
            lmax, rmax, max_ok = 0.0, 0.0, True
        if lmin > 0:
            lmin, rmin, min_ok = 0.0, 0.0, True
    return _eig_result(lmax, lmin, rmax, rmin, max_ok, min_ok, calls[0], dim)


def _eig_result(
    lmax: float,
    lmin: float,
    rmax: float,
    rmin: float,
    max_ok: bool,
    min_ok: bool,
    hvps: int,
    dim: int,
) -> dict[str, Any]:
    return {
        "max": lmax,
        "min": lmin,
        "max_residual": rmax,
        "min_residual": rmin,
        "max_converged": max_ok,
        "min_converged": min_ok,
        "hvps": hvps,
        "dim": dim,
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
