"""The loss around given weights, as both flatness measures probe it (pipeline/eval/sharpness.py,
pipeline/eval/hessian.py): the model in eval mode, gradients without `.grad`, global norms.

Every probe runs the model in eval mode (no dropout) and restores every module's flag after,
and takes gradients with `torch.autograd.grad`, never accumulated into `.grad`, so a probe
leaves the model as it found it. Attention runs through SDPA's math kernel while
differentiating twice (`math_sdpa`): the fused flash and memory-efficient kernels have no
double backward. Torch and the standard library only (the torch-only core).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module], Tensor]  # model -> scalar loss on a fixed batch


def trainable(model: nn.Module, who: str) -> list[Tensor]:
    """The parameters with requires_grad (a tied weight once); none is an error naming `who`."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight once
    if not params:
        raise ValueError(f"{who}: the model has no parameters with requires_grad=True")
    return params


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() inside; every submodule's own flag restored after (not just the root's)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def math_sdpa() -> contextlib.AbstractContextManager:
    """SDPA restricted to its math kernel, the one with a double backward (Hessian products)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: its default CPU path is differentiable twice
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def scalar_loss(model: nn.Module, loss_fn: LossFn, who: str) -> Tensor:
    """`loss_fn(model)` as a 0-dim tensor, checked to be one scalar that has a graph."""
    loss = loss_fn(model)
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError(
            f"{who}: loss_fn(model) must return a scalar tensor that depends on the parameters, "
            f"got {type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}"
        )
    return loss.reshape(())


def global_norm(tensors: list[Tensor]) -> Tensor:
    """One L2 norm over a list of tensors, accumulated in at least float32."""
    return torch.stack(
        [t.norm(2, dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]
    ).norm(2)


def grads_of(loss: Tensor | list[Tensor], params: list[Tensor], **kwargs: Any) -> list[Tensor]:
    """d loss / d params (a vector-Jacobian product with `grad_outputs`), zeros where unreached."""
    grads = torch.autograd.grad(loss, params, allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def random_unit(params: list[Tensor], seed: int) -> list[Tensor]:
    """A random direction of global norm 1, drawn on the CPU so it is the same on any device."""
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    n = global_norm(v)
    return [(t / n).to(p.device, p.dtype) for t, p in zip(v, params, strict=True)]
