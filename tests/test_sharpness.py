"""ε-sharpness and the extreme Hessian eigenvalues: exact on quadratics and against a dense
Hessian, harmless on a tiny GPT; and the sentences that say what such numbers show."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from pipeline.eval.hessian import hessian_extreme_eigenvalues
from pipeline.eval.sharpness import epsilon_sharpness, flatness_verdict
from pipeline.model.gpt import GPT, GPTConfig

EIGS = torch.tensor([4.0, 1.5, 1.0, 0.25], dtype=torch.float64)


def spd(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(eigs) Qᵀ with a random orthogonal Q (symmetric; definite only if eigs are > 0)."""
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


def spectrum(head: list[float], n: int, low: float, high: float, seed: int = 0) -> torch.Tensor:
    """`head`, then n - len(head) eigenvalues spread evenly inside (low, high)."""
    rest = np.random.default_rng(seed).uniform(low, high, n - len(head))
    return torch.tensor([*head, *rest], dtype=torch.float64)


def check_residual_bounds_distance_to_spectrum(out: dict, eigs: np.ndarray) -> None:
    """For symmetric A, an eigenvalue lies within ‖Av − θv‖/‖v‖ of any θ: the residual is honest."""
    for end in ("max", "min"):
        gap = np.abs(eigs - out[end]).min()
        assert gap <= out[f"{end}_residual"] * (1 + 1e-9) + 1e-12, (end, gap, out)


def test_lanczos_finds_both_ends_of_a_known_spectrum_with_negative_eigenvalues():
    eigs = spectrum([-3.0, -1.0, 0.5, 2.0, 7.0], 40, -0.5, 1.5)
    a = spd(eigs)
    reference = np.linalg.eigvalsh(a.numpy())  # an independent dense solver
    model = Quadratic(a, torch.linspace(-1, 1, 40, dtype=torch.float64))
    out = hessian_extreme_eigenvalues(model, quad_loss, iters=30, tol=1e-10)
    assert out["max"] == pytest.approx(7.0, abs=1e-8) == reference[-1]
    assert out["min"] == pytest.approx(-3.0, abs=1e-8) == reference[0]
    assert out["max_converged"] and out["min_converged"]
    assert out["max_residual"] < 1e-8 and out["min_residual"] < 1e-8
    assert out["hvps"] <= 2 * 30 + 2 and out["dim"] == 40
    check_residual_bounds_distance_to_spectrum(out, reference)
    assert hessian_extreme_eigenvalues(model, quad_loss, iters=30, tol=1e-10) == out  # seeded


def test_the_largest_eigenvalue_is_not_the_largest_in_magnitude():
    """Spectrum {-10, 2, (-1, 1)...}: λmax is 2. Power iteration (the old code) returned -10."""
    eigs = spectrum([-10.0, 2.0], 40, -1.0, 1.0, seed=1)
    model = Quadratic(spd(eigs, seed=2), torch.ones(40, dtype=torch.float64))
    out = hessian_extreme_eigenvalues(model, quad_loss, iters=30, tol=1e-10)
    assert out["max"] == pytest.approx(2.0, abs=1e-8)
    assert out["min"] == pytest.approx(-10.0, abs=1e-8)


def test_few_weights_are_diagonalised_exactly():
    """n <= iters: H from n products and a dense eigensolver; same answer, n + 2 products."""
    eigs = torch.tensor([-3.0, -1.0, 0.5, 2.0, 7.0], dtype=torch.float64)
    model = Quadratic(spd(eigs, seed=4), torch.ones(5, dtype=torch.float64))
    out = hessian_extreme_eigenvalues(model, quad_loss, iters=10)
    assert out["max"] == pytest.approx(7.0, abs=1e-12) and out["min"] == pytest.approx(
        -3.0, abs=1e-12
    )
    assert out["max_converged"] and out["min_converged"] and out["hvps"] == 5 + 2
    assert out["max_residual"] < 1e-12 and out["min_residual"] < 1e-12


@pytest.mark.parametrize("iters", [1, 2, 5])
def test_a_spent_budget_gives_bounds_with_honest_residuals(iters):
    """Stopped early: Ritz values lie inside [λmin, λmax] (Courant–Fischer), converged=False."""
    eigs = spectrum([-3.0, -1.0, 0.5, 2.0, 7.0], 40, -0.5, 1.5)
    a = spd(eigs)
    model = Quadratic(a, torch.ones(40, dtype=torch.float64))
    out = hessian_extreme_eigenvalues(model, quad_loss, iters=iters, tol=1e-10)
    assert not out["max_converged"] and not out["min_converged"]
    assert -3.0 - 1e-12 <= out["min"] <= out["max"] <= 7.0 + 1e-12
    assert out["hvps"] <= 2 * iters + 2
    check_residual_bounds_distance_to_spectrum(out, eigs.numpy())


def test_converged_means_the_measured_residual_passes_arpacks_test():
    """Whether ARPACK stopped by itself or the budget stopped it: ‖Hv − λv‖ <= tol·|λ|."""
    eigs = spectrum([-3.0, -1.0, 0.5, 2.0, 7.0], 40, -0.5, 1.5)
    model = Quadratic(spd(eigs), torch.ones(40, dtype=torch.float64))
    seen = set()
    for iters in range(3, 13):
        out = hessian_extreme_eigenvalues(model, quad_loss, iters=iters, tol=1e-3)
        for end in ("max", "min"):
            passes = out[f"{end}_residual"] <= 1e-3 * abs(out[end])
            assert out[f"{end}_converged"] == passes, (iters, end, out)
            seen.add(passes)
        check_residual_bounds_distance_to_spectrum(out, eigs.numpy())
    assert seen == {True, False}  # the budgets cover both outcomes


def test_on_a_nonconvex_network_both_ends_match_the_dense_hessian():
    """A tanh MLP (a saddle: negative curvature), against torch.func.hessian + eigvalsh."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    names = [n for n, _ in mlp.named_parameters()]
    shapes = [p.shape for p in mlp.parameters()]

    def loss_of_flat(flat: torch.Tensor) -> torch.Tensor:  # (32,) -> ()
        chunks = flat.split([s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return ((functional_call(mlp, params, (x,)) - y) ** 2).mean()

    flat = torch.cat([p.detach().reshape(-1) for p in mlp.parameters()])
    reference = np.linalg.eigvalsh(hessian(loss_of_flat)(flat).numpy())  # (32,)
    assert reference[0] < 0 < reference[-1]  # not a minimum: the case the old code got wrong
    out = hessian_extreme_eigenvalues(mlp, lambda m: ((m(x) - y) ** 2).mean(), iters=28, tol=1e-10)
    assert out["dim"] == 32 and out["max_converged"] and out["min_converged"]
    assert out["max"] == pytest.approx(reference[-1], abs=1e-9)
    assert out["min"] == pytest.approx(reference[0], abs=1e-9)


def test_weights_with_a_constant_gradient_add_the_eigenvalue_zero():
    """loss = ½wᵀAw + b·c with A negative definite: H = blockdiag(A, 0), so λmax = 0."""

    class WithLinear(Quadratic):
        def __init__(self, a: torch.Tensor, w: torch.Tensor) -> None:
            super().__init__(a, w)
            self.b = nn.Parameter(torch.ones(3, dtype=torch.float64))
            self.register_buffer("c", torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))

    a = spd(spectrum([-5.0, -0.5], 30, -4.0, -1.0))
    model = WithLinear(a, torch.ones(30, dtype=torch.float64))
    full = np.zeros((33, 33))
    full[:30, :30] = a.numpy()
    reference = np.linalg.eigvalsh(full)
    out = hessian_extreme_eigenvalues(
        model, lambda m: quad_loss(m) + m.b @ m.c, iters=25, tol=1e-10
    )
    assert out["max"] == reference[-1] == 0.0 and out["max_converged"]
    assert out["min"] == pytest.approx(reference[0], abs=1e-8) and out["dim"] == 33


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
    e_sharp = hessian_extreme_eigenvalues(sharp, quad_loss)["max"]
    e_flat = hessian_extreme_eigenvalues(flat, quad_loss)["max"]
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
    eig = hessian_extreme_eigenvalues(model, loss_fn, iters=5)
    numbers = (sharp["base_loss"], sharp["max_loss"], eig["max"], eig["min"])
    assert all(math.isfinite(v) for v in numbers)
    assert sharp["sharpness"] >= 0 and eig["min"] <= eig["max"] and eig["max"] > 0
    assert eig["hvps"] <= 2 * 5 + 2 and eig["max_residual"] >= 0 and eig["min_residual"] >= 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    assert [m.training for m in model.modules()] == modes
    assert epsilon_sharpness(model, loss_fn, rho=0.05, steps=3) == sharp  # eval mode: no dropout
    assert hessian_extreme_eigenvalues(model, loss_fn, iters=5) == eig


def test_bad_arguments_are_clear_errors():
    model = Quadratic(spd(EIGS), torch.ones(4, dtype=torch.float64))
    for rho in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="rho"):
            epsilon_sharpness(model, quad_loss, rho)
    with pytest.raises(ValueError, match="steps"):
        epsilon_sharpness(model, quad_loss, 0.1, steps=-1)
    with pytest.raises(ValueError, match="iters"):
        hessian_extreme_eigenvalues(model, quad_loss, iters=0)
    with pytest.raises(ValueError, match="scalar"):
        epsilon_sharpness(model, lambda m: m.w * 2, 0.1)
    model.w.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        hessian_extreme_eigenvalues(model, quad_loss)


def test_without_scipy_the_module_imports_and_the_eigenvalues_say_scipy_is_needed():
    """The torch-only core (the GPU machine has no scipy): scipy is imported only when needed."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["scipy"] = None  # what the GPU machine has: `import scipy` fails
        import torch
        from torch import nn
        from pipeline.eval.hessian import hessian_extreme_eigenvalues
        from pipeline.eval.sharpness import epsilon_sharpness
        m = nn.Linear(2, 1)
        loss = lambda m: (m(torch.ones(1, 2)) ** 2).sum()
        assert epsilon_sharpness(m, loss, 0.1, steps=1)["sharpness"] >= 0
        try:
            hessian_extreme_eigenvalues(m, loss)
        except ImportError as err:
            print("ImportError:", err)
        """
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True
    )
    assert "ImportError: hessian_extreme_eigenvalues needs scipy" in done.stdout, done.stderr


def measured(sharpness: float, lmax: float, lmin: float, converged: bool = True) -> dict:
    """One method's flatness numbers as finetune reports them."""
    return {
        "sharpness": sharpness,
        "hessian_max_eig": lmax,
        "hessian_min_eig": lmin,
        "hessian_max_residual": 1e-3,
        "hessian_min_residual": 1e-3,
        "hessian_converged": converged,
    }


def test_verdict_says_flatter_when_both_measures_are_lower():
    lines = flatness_verdict(
        {"adamw": measured(0.39, 386.0, 0.5), "sam": measured(0.154, 68.2, 0.01)}
    )
    assert lines == [
        "sam is flatter than adamw by ε-sharpness (0.154 vs 0.39) "
        "and by the largest Hessian eigenvalue (68.2 vs 386).",
        "No negative Hessian eigenvalue for adamw and sam: consistent with a minimum.",
    ]


def test_verdict_says_not_flatter_and_names_negative_curvature():
    """The default preset's case: SAM sharper than AdamW, and its Hessian indefinite."""
    results = {
        "adamw": measured(0.15, 68.0, -2.5),
        "sam": measured(0.39, 386.0, -255.6, converged=False),
        "sam+swa": measured(0.10, 90.0, -0.0004),  # 0.0004 < 1e-4 x 90: rounding
    }
    lines = flatness_verdict(results)
    assert lines[0] == (
        "sam is NOT flatter than adamw by ε-sharpness (0.39 vs 0.15) "
        "nor by the largest Hessian eigenvalue (386 vs 68)."
    )
    assert lines[1] == (
        "sam+swa is flatter than adamw by ε-sharpness (0.1 vs 0.15) "
        "but NOT by the largest Hessian eigenvalue (90 vs 68)."
    )
    assert lines[2].startswith(
        "The Hessian has a negative eigenvalue for adamw (-2.5) and sam (≤ -256): those "
        "weights are not at a minimum"
    )
    assert lines[3].startswith("The smallest Hessian eigenvalue of sam+swa (-0.0004, next to 90)")
    assert (
        lines[4].startswith("Lanczos did not converge within its budget")
        and "for sam (" in lines[4]
    )
    assert len(lines) == 5


def test_verdict_shows_enough_digits_to_tell_close_numbers_apart():
    lines = flatness_verdict(
        {"adamw": measured(0.08055, 5.0, 1.0), "swa": measured(0.08052, 6.0, 1.0)}
    )
    assert lines[0].startswith("swa is flatter than adamw by ε-sharpness (0.08052 vs 0.08055)")


def test_verdict_without_a_baseline_or_with_missing_numbers():
    only = flatness_verdict({"sam": measured(0.2, 10.0, 1.0)})
    assert only[0] == "No adamw baseline was measured, so flatness is not compared."
    partial = {"adamw": measured(0.3, 10.0, 1.0), "swa": measured(0.2, float("nan"), 1.0)}
    assert flatness_verdict(partial)[0] == (
        "swa is flatter than adamw by ε-sharpness (0.2 vs 0.3) "
        "(the largest Hessian eigenvalue not measured)."
    )
