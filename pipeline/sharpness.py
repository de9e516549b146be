"""How flat is a minimum: ε-sharpness and the top Hessian eigenvalue of a loss at fixed weights.

Both take `loss_fn(model) -> scalar Tensor` computed on a fixed batch, run the model in eval mode
(no dropout) and restore every module's train/eval flag afterwards, so a call is deterministic
and leaves the model as it found it: weights bit for bit, `.grad` untouched (gradients are taken
with `torch.autograd.grad`, never accumulated). Pass the bare module, not a DDP wrapper.

- `epsilon_sharpness`: max_{‖δ‖≤ρ} L(w + δ) − L(w), δ over all parameters jointly, estimated
  by projected gradient ascent started at SAM's point ρ·g/‖g‖ (Keskar et al. 2017; Foret et
  al. 2021). A lower bound on the true maximum: more steps can only find a higher loss.
- `top_hessian_eigenvalue`: power iteration with Hessian-vector products by double backprop
  (Pearlmutter 1994; as in PyHessian). It returns the eigenvalue of largest magnitude, which
  is the largest one near a minimum, where the Hessian is (close to) positive semi-definite.

Attention runs through SDPA's math kernel while differentiating twice: the fused flash and
memory-efficient kernels have no double backward. Imports only torch and the standard library.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module], Tensor]


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


def top_hessian_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    iters: int = 20,
    tol: float = 1e-4,
    seed: int = 0,
) -> dict[str, Any]:
    """The dominant eigenvalue of the Hessian of `loss_fn(model)` w.r.t. the trainable weights.

    Power iteration v ← Hv/‖Hv‖ from a seeded random unit vector; λ = vᵀHv (v of norm 1). It
    stops after `iters` products, or once λ changes by at most `tol` relative to |λ|. Hv is
    ∇(∇L·v), by `torch.autograd.grad` of the gradient built with `create_graph=True`.

    Returns {"eigenvalue": float, "iters": products computed, "converged": bool}.
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"top_hessian_eigenvalue: iters must be an integer >= 1, got {iters!r}")
    if not tol >= 0:
        raise ValueError(f"top_hessian_eigenvalue: tol must be >= 0, got {tol!r}")
    params = _trainable(model, "top_hessian_eigenvalue")
    eigenvalue, done, converged = float("nan"), 0, False
    with _eval_mode(model), _math_sdpa():
        loss = _scalar_loss(model, loss_fn, "top_hessian_eigenvalue")
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        # A gradient with no graph is constant: its rows (and, by symmetry, columns) of H are 0.
        used = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
        used = [(p, g) for p, g in used if g.requires_grad]
        if not used:  # the loss is linear (or constant) in the weights
            return {"eigenvalue": 0.0, "iters": 0, "converged": True}
        ps, gs = [p for p, _ in used], [g for _, g in used]
        v = _random_unit(ps, seed)
        for step in range(iters):
            done = step + 1
            hv = _grads(gs, ps, grad_outputs=v, retain_graph=True)
            new = float(sum((h * u).sum(dtype=torch.float64) for h, u in zip(hv, v, strict=True)))
            hv_norm = _norm(hv).item()
            if math.isfinite(eigenvalue) and abs(new - eigenvalue) <= tol * abs(new):
                eigenvalue, converged = new, True
                break
            eigenvalue = new
            if not hv_norm > 0:  # v lies in the null space: the Hessian is 0 along v
                converged = hv_norm == 0
                break
            v = [h / hv_norm for h in hv]
    return {"eigenvalue": eigenvalue, "iters": done, "converged": converged}
