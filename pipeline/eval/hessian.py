"""The extreme Hessian eigenvalues of the loss at given weights: λmax and λmin, by Lanczos.

`hessian_extreme_eigenvalues` gives the largest *algebraic* eigenvalue λmax (the sharpest
curvature) and the smallest λmin (negative when the weights are not at a minimum), each by
Lanczos (ARPACK's `scipy.sparse.linalg.eigsh`, which="LA" / "SA") on Hessian-vector products
by double backprop (Pearlmutter 1994), with the residual ‖Hv − λv‖/‖v‖ of each and whether
ARPACK converged. Power iteration would give the eigenvalue of largest *magnitude* instead,
which away from a minimum is a large negative one: not what "λmax" means.

It takes `loss_fn(model) -> scalar Tensor` computed on a fixed batch and leaves the model as
it found it (pipeline/eval/loss_surface.py: eval mode restored, no `.grad`, SDPA's math
kernel, which has a double backward). Pass the bare module, not a DDP wrapper.

Dependencies: this module is in the torch-only core (torch, numpy and the standard library at
import time), which the GPU machine runs without scipy. `hessian_extreme_eigenvalues` imports
scipy inside the function, so importing this module works without it, and calling it without
scipy raises an ImportError that says so; only the finetune and evaluate stages call it, and
they run where the project's dependencies (scipy among them) are installed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.eval.loss_surface import (
    LossFn,
    eval_mode,
    grads_of,
    math_sdpa,
    scalar_loss,
    trainable,
)

log = logging.getLogger(__name__)
WHO = "hessian_extreme_eigenvalues"  # names the function in errors
End = tuple[float, Tensor, bool]  # (eigenvalue estimate, its vector (n,) float64, converged)


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
        hv = grads_of(grads, params, grad_outputs=v, retain_graph=True)
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


def _eigsh() -> tuple[Any, Any, Any]:
    """scipy's (ArpackError, LinearOperator, eigsh); an ImportError that says why without it."""
    try:
        from scipy.sparse.linalg import ArpackError, LinearOperator, eigsh
    except ImportError as err:  # the torch-only GPU environment
        raise ImportError(
            "hessian_extreme_eigenvalues needs scipy (scipy.sparse.linalg.eigsh), which is not "
            "installed here; it is a dependency of the project (pyproject.toml), but not of the "
            "torch-only core"
        ) from err
    return ArpackError, LinearOperator, eigsh


def _check_args(iters: Any, tol: Any) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{WHO}: iters must be an integer >= 1, got {iters!r}")
    if not (isinstance(tol, int | float) and tol >= 0):
        raise ValueError(f"{WHO}: tol must be >= 0, got {tol!r}")


def _curved(
    model: nn.Module, loss_fn: LossFn, params: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """(parameters, their gradients with create_graph=True) of the weights H is not zero on.

    A gradient with no graph is constant: its rows (and, by symmetry, columns) of H are 0.
    """
    loss = scalar_loss(model, loss_fn, WHO)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
    used = [(p, g) for p, g in used if g.requires_grad]
    return [p for p, _ in used], [g for _, g in used]


class _Counted:
    """A Hessian-vector product that counts its calls (the `hvps` of the result)."""

    def __init__(self, hvp: Hvp) -> None:
        self.hvp, self.calls = hvp, 0

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.hvp(x)


def _exact_ends(hvp: Hvp, n: int) -> dict[str, End]:
    """Both ends exactly: H from n products (column i = H e_i), then a dense eigensolver."""
    eye = torch.eye(n, dtype=torch.float64)
    h = torch.stack([hvp(col) for col in eye], dim=1).numpy()  # (n, n)
    lam, vec = np.linalg.eigh((h + h.T) / 2)
    return {key: (float(lam[j]), torch.from_numpy(vec[:, j].copy()), True)
            for key, j in (("max", -1), ("min", 0))}  # fmt: skip


def _lanczos_ends(hvp: Hvp, ps: list[Tensor], iters: int, tol: float, seed: int) -> dict[str, End]:
    """Each end by one budgeted ARPACK run from the same seeded start vector.

    A run that spends its budget or does not converge gives the extreme Ritz pair of what
    it multiplied instead, marked not converged.
    """
    arpack_error, linear_operator, eigsh = _eigsh()
    n = sum(p.numel() for p in ps)
    gen = torch.Generator().manual_seed(seed)
    v0 = torch.cat([torch.randn(p.numel(), generator=gen, dtype=torch.float64) for p in ps])
    ends: dict[str, End] = {}
    for key, which in (("max", "LA"), ("min", "SA")):
        record = _KrylovRecord(hvp, iters)
        op = linear_operator((n, n), matvec=record.matvec, dtype=np.float64)
        try:
            w, v = eigsh(
                op, k=1, which=which, v0=v0.numpy(), ncv=max(2, iters - 1),
                maxiter=iters, tol=tol,
            )  # fmt: skip
            ends[key] = (float(w[0]), torch.from_numpy(v[:, 0].copy()), True)
        except (_BudgetSpent, arpack_error) as err:  # ArpackNoConvergence is one
            if not isinstance(err, _BudgetSpent):
                log.info("%s[%s]: %s", WHO, which, err)
            ritz_value, ritz_vector = record.ritz(largest=which == "LA")
            ends[key] = (ritz_value, ritz_vector, False)
    return ends


def _summarize(
    ends: dict[str, End],
    residual: dict[str, float],
    tol: float,
    has_constant: bool,
    hvps: int,
    dim: int,
) -> dict[str, Any]:
    """The result dict; `has_constant`: some weights have constant gradients (eigenvalue 0)."""
    # Stopped early, the Ritz pair may still pass ARPACK's own test, on its measured residual.
    ok = {key: done or residual[key] <= tol * abs(lam) for key, (lam, _, done) in ends.items()}
    (lmax, _, _), (lmin, _, _) = ends["max"], ends["min"]
    rmax, rmin, max_ok, min_ok = residual["max"], residual["min"], ok["max"], ok["min"]
    if has_constant:  # the constant weights' eigenvalue 0, exact (any unit vector on their block)
        if lmax < 0:
            lmax, rmax, max_ok = 0.0, 0.0, True
        if lmin > 0:
            lmin, rmin, min_ok = 0.0, 0.0, True
    return _eig_result(lmax, lmin, rmax, rmin, max_ok, min_ok, hvps, dim)


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
    _eigsh()  # fails first, and clearly, where scipy is missing
    _check_args(iters, tol)
    params = trainable(model, WHO)
    dim = sum(p.numel() for p in params)
    with eval_mode(model), math_sdpa():
        ps, gs = _curved(model, loss_fn, params)
        if not ps:  # the loss is linear (or constant) in the weights: H = 0
            return _eig_result(0.0, 0.0, 0.0, 0.0, True, True, 0, dim)
        n = sum(p.numel() for p in ps)
        hvp = _Counted(_hvp_operator(gs, ps))
        if n <= max(iters, 2):  # below what ARPACK accepts, or cheap enough to be exact
            ends = _exact_ends(hvp, n)
        else:
            ends = _lanczos_ends(hvp, ps, iters, tol, seed)
        # One more product per end: the measured residual ‖Hz − λz‖/‖z‖ of the vector returned.
        residual = {
            key: ((hvp(z) - lam * z).norm() / z.norm()).item() for key, (lam, z, _) in ends.items()
        }
    return _summarize(ends, residual, tol, dim > n, hvp.calls, dim)


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
