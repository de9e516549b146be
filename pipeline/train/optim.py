"""The optimizer of pretraining and fine-tuning: AdamW with decay on matrices only."""

from __future__ import annotations

import torch
from torch import nn


def configure_optimizer(
    model: nn.Module,
    weight_decay: float,
    lr: float,
    betas: tuple[float, float],
    device_type: str,
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (parameters with dim >= 2).

    Decaying biases and LayerNorm gains only pulls them towards 0 (gains should sit near 1)
    without regularising anything; `fused=True` on CUDA runs the update as one kernel.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # tied weight listed once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")
