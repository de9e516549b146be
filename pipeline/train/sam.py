"""Sharpness-aware minimization (SAM, Foret et al. 2021) and ASAM (Kwon et al. 2021), by hand.

SAM minimises max_{‖ε‖≤ρ} L(w + ε) with one ascent and one descent per step:

    g     = ∇L(w)
    e_w   = ρ · g / ‖g‖                         (SAM)
    e_w   = ρ · T_w² g / ‖T_w g‖,  T_w = |w|      (ASAM, adaptive=True; elementwise)
    w    <- base_optimizer.step(w, ∇L(w + e_w))  (the gradient of the perturbed point, at w)

‖·‖ is one global L2 norm over every parameter that has a gradient; parameters without one
(frozen, or unused by this loss) are neither perturbed nor counted.

    sam = SAM(model.parameters(), torch.optim.AdamW(model.parameters(), lr=1e-3), rho=0.05)
    loss = sam_step(sam, lambda: model(x, y)[1])

`sam_step` does the two forward/backward passes. It is written for one process, which is how
fine-tuning runs (pipeline/stages/finetune.py): it has no DistributedDataParallel handling. The
module imports only torch and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class SAM:
    """Wraps a base optimizer (built by the caller over the same parameters) with SAM's ascent.

    Call `first_step()` after the backward pass at w (moves to w + e_w and remembers w), then
    `second_step()` after the backward pass at w + e_w (restores w exactly and lets the base
    optimizer step with that second gradient). Learning rates, weight decay and state live in
    `base_optimizer`; `param_groups` and `state_dict` are the base optimizer's.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: torch.optim.Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
    ) -> None:
        if not isinstance(rho, int | float) or not math.isfinite(rho) or rho <= 0:
            raise ValueError(f"SAM rho must be a finite number > 0, got {rho!r}")
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"SAM base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer)}"
            )
        flat: list[Tensor] = []
        for item in params:  # tensors, or param-group dicts like an optimizer takes
            flat.extend(item["params"] if isinstance(item, dict) else [item])
        self.params: list[Tensor] = list({id(p): p for p in flat}.values())  # tied: once
        if not self.params:
            raise ValueError("SAM got an empty parameter list")
        base_ids = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
        missing = [p for p in self.params if p.requires_grad and id(p) not in base_ids]
        if missing:
            raise ValueError(
                f"SAM: {len(missing)} trainable parameter(s) are not in base_optimizer; "
                "build the base optimizer over the same parameters"
            )
        self.base_optimizer = base_optimizer
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self._saved: list[tuple[Tensor, Tensor]] | None = None  # (param, w) while at w + e_w

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base_optimizer.param_groups

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state)

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """‖g‖ (SAM) or ‖T_w g‖ (ASAM) over every parameter with a gradient, as a 0-d tensor."""
        with_grad = [p for p in self.params if p.grad is not None]
        if not with_grad:
            return torch.zeros(())
        device = with_grad[0].grad.device
        norms = [
            ((p.abs() * p.grad) if self.adaptive else p.grad)
            .norm(2, dtype=torch.promote_types(p.dtype, torch.float32))  # bf16 sums in fp32
            .to(device)
            for p in with_grad
        ]
        return torch.stack(norms).norm(2)

    @torch.no_grad()
    def first_step(self) -> None:
        """w -> w + e_w along the current gradients; the original weights are kept for later."""
        if self._saved is not None:
            raise RuntimeError("SAM.first_step() called twice without second_step()")
        self._saved = []
        scale = self.rho / (self.grad_norm() + 1e-12)  # g = 0 gives e_w = 0
        for p in self.params:
            if p.grad is None:
                continue
            e_w = p.grad * scale.to(p.device, p.dtype)
            if self.adaptive:
                e_w = e_w * p * p  # T_w² g, with T_w = |w|
            self._saved.append((p, p.detach().clone()))
            p.add_(e_w)

    @torch.no_grad()
    def second_step(self) -> None:
        """Restore w bit for bit, then step the base optimizer with the gradient from w + e_w."""
        if self._saved is None:
            raise RuntimeError("SAM.second_step() called before first_step()")
        for p, original in self._saved:
            p.copy_(original)
        self._saved = None
        self.base_optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()


def sam_step(
    optimizer: SAM,
    loss_fn: Callable[[], Tensor],
    clip: float = 0.0,
) -> Tensor:
    """One SAM step: ascent at w, descent with ∇L(w + e_w); returns the loss at w (detached).

    `loss_fn()` runs the forward pass on this step's batch and returns the scalar loss; it is
    called twice (at w and at w + e_w), so with dropout the two passes draw different masks.
    `clip > 0` clips the norm of the gradient the base optimizer applies (the one at w + e_w);
    the ascent direction needs no clipping, since e_w depends only on the direction of g (its
    norm divides out).
    """
    loss = loss_fn()
    loss.backward()
    optimizer.first_step()
    optimizer.zero_grad()

    loss_fn().backward()  # at w + e_w
    if clip > 0:
        with_grad = [p for p in optimizer.params if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(with_grad, clip)
    optimizer.second_step()
    optimizer.zero_grad()
    return loss.detach()
