"""The sharpness table of the evaluate report: how flat each fine-tuning method's minimum is.

The measures themselves are `pipeline/eval/sharpness.py` (epsilon-sharpness, and the
sentences that read the measures: `flatness_verdict`) and `pipeline/eval/hessian.py` (Lanczos
extreme Hessian eigenvalues); this module applies them to the weights the finetune stage
wrote, on fixed test batches.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.core.names import METHODS_DIR, WEIGHTS_FILE
from pipeline.eval.hessian import hessian_extreme_eigenvalues
from pipeline.eval.sharpness import epsilon_sharpness
from pipeline.model.load import load_model
from pipeline.train.batches import eval_batches


def method_weights(cfg: Config) -> dict[str, Path]:
    """Final weights per fine-tuning method: `methods/<m>/model.safetensors`, sorted by name.

    A finetune run of one method writes no `methods/` folder; its weights are the folder's
    own `model.safetensors`, named after `finetune.method`.
    """
    folder = cfg.path("finetune")
    methods = (
        sorted(p.name for p in (folder / METHODS_DIR).iterdir())
        if (folder / METHODS_DIR).is_dir()
        else []
    )
    return {m: folder / METHODS_DIR / m / WEIGHTS_FILE for m in methods} or {
        cfg.finetune.method: folder / WEIGHTS_FILE
    }


def sharpness_table(cfg: Config, test_tokens: np.ndarray, seed: int) -> dict[str, dict[str, Any]]:
    """Epsilon-sharpness and the extreme Hessian eigenvalues of each fine-tuning method's weights.

    Per method: `test_loss`, `sharpness`, `hessian_max_eig` / `hessian_min_eig` (largest and
    smallest, by Lanczos: see pipeline/eval/hessian.py), their residuals and whether both
    converged. All methods are measured on the same `cfg.evaluate.sharpness_batches` test
    batches of 8 windows, drawn with `seed`.
    """
    folder, f = cfg.path("finetune"), cfg.finetune
    weights = method_weights(cfg)
    model0 = load_model(folder)
    batches = list(
        eval_batches(
            test_tokens, seed, cfg.evaluate.sharpness_batches, 8, model0.config.block_size, 0, 1
        )
    )

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        return sum(m(x, y)[1] for x, y in batches) / len(batches)

    table = {}
    for method, path in weights.items():
        model = load_model(folder, path)
        measures, base_loss = flatness_measures(
            model, loss_fn, f.sharpness_rho, f.sharpness_steps, f.hessian_iters
        )
        table[method] = {**measures, "test_loss": base_loss}
    return table


def flatness_measures(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module], torch.Tensor],
    rho: float,
    steps: int,
    iters: int,
) -> tuple[dict[str, Any], float]:
    """The flatness of `model` on `loss_fn`, as finetune and evaluate both report it.

    Epsilon-sharpness in a ball of radius `rho` (`steps` of projected ascent), and the
    largest and smallest Hessian eigenvalues by Lanczos (`iters` Hessian-vector products
    each) with their residuals and whether both converged; also the loss at the weights.
    The values come from `finetune.sharpness_rho`, `sharpness_steps` and `hessian_iters`.
    """
    sharp = epsilon_sharpness(model, loss_fn, rho, steps)
    eig = hessian_extreme_eigenvalues(model, loss_fn, iters=iters)
    measures = {
        "sharpness": sharp["sharpness"],
        "hessian_max_eig": eig["max"],
        "hessian_min_eig": eig["min"],
        "hessian_max_residual": eig["max_residual"],
        "hessian_min_residual": eig["min_residual"],
        "hessian_converged": eig["max_converged"] and eig["min_converged"],
    }
    return measures, sharp["base_loss"]
