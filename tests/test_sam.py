"""SAM / ASAM against hand computations, with SGD and AdamW."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.train.sam import SAM, sam_step

A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)  # symmetric positive definite
W0 = torch.tensor([0.7, -1.3], dtype=torch.float64)


class Quadratic(nn.Module):
    """L(w) = ½ wᵀ A w with w a 2-vector: ∇L = A w."""

    def __init__(self, w: torch.Tensor, a: torch.Tensor = A) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.register_buffer("a", a)

    def loss(self) -> torch.Tensor:
        return 0.5 * self.w @ self.a @ self.w


def hand_sam_step(w: torch.Tensor, rho: float, lr: float, adaptive: bool) -> torch.Tensor:
    g = A @ w
    if adaptive:
        t = w.abs()  # T_w
        e = rho * t * t * g / torch.linalg.vector_norm(t * g)
    else:
        e = rho * g / torch.linalg.vector_norm(g)
    g_adv = A @ (w + e)
    return w - lr * g_adv


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_matches_the_hand_computation_on_a_quadratic(adaptive):
    rho, lr = 0.1, 0.05
    model = Quadratic(W0)
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=lr), rho, adaptive)
    expected = W0.clone()
    for _ in range(3):
        sam_step(sam, model.loss)
        expected = hand_sam_step(expected, rho, lr, adaptive)
        torch.testing.assert_close(model.w.detach(), expected, atol=1e-6, rtol=0)
    assert model.w.grad is None  # sam_step leaves the gradients cleared


def test_first_step_moves_to_the_sam_point_and_second_step_restores_w_exactly():
    rho = 0.2
    model = Quadratic(W0)
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.0), rho)
    model.loss().backward()
    sam.first_step()
    g = A @ W0
    torch.testing.assert_close(model.w.detach(), W0 + rho * g / g.norm(), atol=1e-12, rtol=0)
    with pytest.raises(RuntimeError, match="twice"):
        sam.first_step()
    sam.zero_grad()
    model.loss().backward()
    sam.second_step()  # lr = 0: the step itself changes nothing
    assert torch.equal(model.w.detach(), W0)
    with pytest.raises(RuntimeError, match="before first_step"):
        sam.second_step()


def test_with_adamw_the_update_uses_the_gradient_at_the_perturbed_point():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    twin = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    rho, kw = 0.05, {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.95)}
    sam = SAM(model.parameters(), torch.optim.AdamW(model.parameters(), **kw), rho=rho)
    twin_opt = torch.optim.AdamW(twin.parameters(), **kw)
    params = list(twin.parameters())
    for _ in range(3):
        sam_step(sam, lambda: nn.functional.mse_loss(model(x), y))
        # the same step by hand on the twin
        g = torch.autograd.grad(nn.functional.mse_loss(twin(x), y), params)
        norm = torch.sqrt(sum((gi * gi).sum() for gi in g))
        w = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, gi in zip(params, g, strict=True):
                p.add_(rho * gi / norm)
        g_adv = torch.autograd.grad(nn.functional.mse_loss(twin(x), y), params)
        with torch.no_grad():
            for p, wi, gi in zip(params, w, g_adv, strict=True):
                p.copy_(wi)
                p.grad = gi
        twin_opt.step()
        twin_opt.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=0)
    # and it is not plain AdamW: the perturbation matters
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    opt = torch.optim.AdamW(plain.parameters(), **kw)
    for _ in range(3):
        nn.functional.mse_loss(plain(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert not torch.allclose(plain[0].weight, model[0].weight, atol=1e-6)


def test_parameters_without_grad_are_untouched_and_not_in_the_norm():
    rho = 0.3
    used = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    unused = nn.Parameter(torch.tensor([5.0, -2.0], dtype=torch.float64))  # grad stays None
    frozen = nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64), requires_grad=False)
    params = [used, unused, frozen]
    sam = SAM(params, torch.optim.AdamW([used, unused], lr=0.1, weight_decay=0.5), rho)
    loss = (used * used).sum() * 0.5 + (used * frozen).sum()  # grad = used + frozen = (4, 5)
    loss.backward()
    sam.first_step()
    g = torch.tensor([4.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(
        used.detach(), torch.tensor([3.0, 4.0]).double() + rho * g / g.norm()
    )
    assert torch.equal(unused.detach(), torch.tensor([5.0, -2.0], dtype=torch.float64))
    sam.zero_grad()
    (used.sum() * 2).backward()
    sam.second_step()
    assert torch.equal(unused.detach(), torch.tensor([5.0, -2.0], dtype=torch.float64))
    assert torch.equal(frozen.detach(), torch.ones(2, dtype=torch.float64))
    assert not torch.equal(used.detach(), torch.tensor([3.0, 4.0], dtype=torch.float64))


@pytest.mark.parametrize("rho", [0.0, -0.1, float("nan"), float("inf")])
def test_rho_must_be_positive(rho):
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="rho"):
        SAM([p], torch.optim.SGD([p], lr=0.1), rho=rho)


def test_the_base_optimizer_must_cover_the_parameters():
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="not in base_optimizer"):
        SAM([p, q], torch.optim.SGD([p], lr=0.1))


def test_grad_clip_clips_the_applied_gradient_only():
    rho, lr, clip = 0.1, 1.0, 1e-3
    model = Quadratic(W0)
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=lr), rho)
    sam_step(sam, model.loss, clip=clip)
    g_adv = A @ (W0 + rho * (A @ W0) / (A @ W0).norm())
    expected = W0 - lr * clip * g_adv / g_adv.norm()
    torch.testing.assert_close(model.w.detach(), expected, atol=1e-6, rtol=0)
