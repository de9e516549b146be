"""ε-sharpness and the top Hessian eigenvalue: exact on quadratics, harmless on a tiny GPT."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.model import GPT, GPTConfig
from pipeline.sharpness import epsilon_sharpness, top_hessian_eigenvalue

EIGS = torch.tensor([4.0, 1.5, 1.0, 0.25], dtype=torch.float64)


def spd(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(eigs) Qᵀ with a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return q @ torch.diag(eigs) @ q.T


class Quadratic(nn.Module):
    """A model whose loss is ½ wᵀ A w: its Hessian is A everywhere."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.register_buffer("a", a)


def quad_loss(m: nn.Module) -> torch.Tensor:
    return 0.5 * m.w @ m.a @ m.w


def exact_max_increase(a: torch.Tensor, w: torch.Tensor, rho: float) -> float:
    """max over ‖δ‖ ≤ ρ of gᵀδ + ½ δᵀAδ (g = Aw), the trust-region problem solved exactly.

    With A = V diag(λ) Vᵀ and c = Vᵀg the maximiser is δ = (μI − A)⁻¹g on the sphere, μ > λ_max
    the root of Σ c_i²/(μ − λ_i)² = ρ²; bisection finds it. At g = 0 the answer is ½ λ_max ρ².
    """
    lam, v = torch.linalg.eigh(a)
    c = v.T @ (a @ w)
    if c.norm() == 0:
        return 0.5 * lam.max().item() * rho**2
    lo, hi = lam.max().item() + 1e-15, lam.max().item() + c.norm().item() / rho
    for _ in range(200):
        mu = 0.5 * (lo + hi)
        if ((c / (mu - lam)) ** 2).sum().item() > rho**2:
            lo = mu
        else:
            hi = mu
    delta = v @ (c / (hi - lam))
    return ((a @ w) @ delta + 0.5 * delta @ a @ delta).item()


def test_top_eigenvalue_of_a_quadratic_is_the_largest_eigenvalue_of_a():
    a = spd(EIGS)
    model = Quadratic(a, torch.tensor([0.3, -0.2, 0.5, 1.0], dtype=torch.float64))
    out = top_hessian_eigenvalue(model, quad_loss, iters=100, tol=1e-10)
    assert out["converged"] and out["iters"] < 100
    assert out["eigenvalue"] == pytest.approx(4.0, rel=1e-3)
    short = top_hessian_eigenvalue(model, quad_loss, iters=2, tol=0.0)
    assert short["iters"] == 2 and not short["converged"]


@pytest.mark.parametrize("lr", [None, 0.5])
def test_epsilon_sharpness_at_the_minimum_is_half_lambda_max_rho_squared(lr):
    rho = 0.1
    model = Quadratic(spd(EIGS), torch.zeros(4, dtype=torch.float64))  # g = 0: random start
    out = epsilon_sharpness(model, quad_loss, rho, steps=30, lr=lr)
    assert out["base_loss"] == 0.0
    assert out["sharpness"] == pytest.approx(0.5 * 4.0 * rho**2, rel=1e-3)
    assert out["sharpness"] <= 0.5 * 4.0 * rho**2 * (1 + 1e-9)  # never beyond the true max
    assert out["rho"] == rho and out["steps"] == 30


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_epsilon_sharpness_away_from_the_minimum_is_the_exact_ball_maximum(rho):
    a, w = spd(EIGS, seed=3), torch.tensor([0.3, -0.2, 0.5, 1.0], dtype=torch.float64)
    model = Quadratic(a, w)
    exact = exact_max_increase(a, w, rho)
    out = epsilon_sharpness(model, quad_loss, rho, steps=30)
    assert out["sharpness"] == pytest.approx(exact, rel=1e-4)
    assert out["sharpness"] <= exact * (1 + 1e-9)
    assert out["max_loss"] - out["base_loss"] == out["sharpness"]
    one_step = epsilon_sharpness(model, quad_loss, rho, steps=0)  # the SAM point alone
    assert 0 < one_step["sharpness"] <= out["sharpness"]


def test_a_flatter_quadratic_is_less_sharp():
    w = torch.tensor([0.3, -0.2, 0.5, 1.0], dtype=torch.float64)
    sharp = Quadratic(spd(EIGS), w)
    flat = Quadratic(spd(EIGS / 5), w)
    s_sharp = epsilon_sharpness(sharp, quad_loss, 0.1, steps=10)["sharpness"]
    s_flat = epsilon_sharpness(flat, quad_loss, 0.1, steps=10)["sharpness"]
    e_sharp = top_hessian_eigenvalue(sharp, quad_loss)["eigenvalue"]
    e_flat = top_hessian_eigenvalue(flat, quad_loss)["eigenvalue"]
    assert 0 < s_flat < s_sharp and 0 < e_flat < e_sharp
    assert e_flat == pytest.approx(e_sharp / 5, rel=1e-3)


def test_on_a_tiny_gpt_both_run_deterministically_and_leave_the_model_as_it_was():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1)
    model = GPT(cfg)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)

    def loss_fn(m: nn.Module) -> torch.Tensor:
        return m(x, y)[1]

    loss_fn(model).backward()  # the caller's gradients must survive
    model.blocks[1].eval()  # a mixed train/eval state must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]

    sharp = epsilon_sharpness(model, loss_fn, rho=0.05, steps=3)
    eig = top_hessian_eigenvalue(model, loss_fn, iters=5)
    assert all(math.isfinite(v) for v in (sharp["base_loss"], sharp["max_loss"], eig["eigenvalue"]))
    assert sharp["sharpness"] >= 0 and eig["eigenvalue"] > 0 and 1 <= eig["iters"] <= 5
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    assert [m.training for m in model.modules()] == modes
    assert epsilon_sharpness(model, loss_fn, rho=0.05, steps=3) == sharp  # eval mode: no dropout
    assert top_hessian_eigenvalue(model, loss_fn, iters=5) == eig


def test_bad_arguments_are_clear_errors():
    model = Quadratic(spd(EIGS), torch.ones(4, dtype=torch.float64))
    for rho in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="rho"):
            epsilon_sharpness(model, quad_loss, rho)
    with pytest.raises(ValueError, match="steps"):
        epsilon_sharpness(model, quad_loss, 0.1, steps=-1)
    with pytest.raises(ValueError, match="iters"):
        top_hessian_eigenvalue(model, quad_loss, iters=0)
    with pytest.raises(ValueError, match="scalar"):
        epsilon_sharpness(model, lambda m: m.w * 2, 0.1)
    model.w.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        top_hessian_eigenvalue(model, quad_loss)
