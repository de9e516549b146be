"""Training FLOPs per token and model FLOPs utilisation (MFU) against a GPU's datasheet peak.

    flops/token = 6N + 12·L·H·Q·T        (PaLM appendix B, as in nanoGPT)
    MFU         = tokens/s per device · flops/token / peak FLOP/s of one device, in its dtype

N is the parameter count without position embeddings (they cost no matmul). The peaks are
dense tensor-core figures; `peak_flops` reads the device name and the float32 matmul precision
(TF32 or not) from torch. Imports only torch and the model, so it runs on the GPU machine.
"""

from __future__ import annotations

import torch

from pipeline.model.gpt import GPTConfig, analytic_num_params

# Dense (no sparsity) tensor-core peaks in FLOP/s from NVIDIA's datasheets. bf16 and fp16 share
# a peak; "tf32" is fp32 matmuls with TF32 allowed, "fp32" without.
PEAK_FLOPS: dict[str, float] = {
    "h100-sxm-bf16": 989e12, "h100-sxm-tf32": 494.5e12, "h100-sxm-fp32": 66.9e12,
    "h100-pcie-bf16": 756e12, "h100-pcie-tf32": 378e12, "h100-pcie-fp32": 51.2e12,
    "h100-nvl-bf16": 835e12, "h100-nvl-tf32": 417.5e12, "h100-nvl-fp32": 60.0e12,
    "h200-sxm-bf16": 989e12, "h200-sxm-tf32": 494.5e12, "h200-sxm-fp32": 66.9e12,
    "h200-nvl-bf16": 835e12, "h200-nvl-tf32": 417.5e12, "h200-nvl-fp32": 60.0e12,
    "a100-bf16": 312e12, "a100-tf32": 156e12, "a100-fp32": 19.5e12,
    "l40s-bf16": 362e12, "l40s-tf32": 183e12, "l40s-fp32": 91.6e12,
}  # fmt: skip

# Substrings of torch.cuda.get_device_name(), checked in order (NVL/PCIe before the SXM name).
_GPU_NAMES = (("H200 NVL", "h200-nvl"), ("H200", "h200-sxm"), ("H100 PCIe", "h100-pcie"),
              ("H100 NVL", "h100-nvl"), ("H100", "h100-sxm"), ("A100", "a100"),
              ("L40S", "l40s"))  # fmt: skip


def flops_per_token(cfg: GPTConfig, n_params: int | None = None) -> float:
    """Training FLOPs per token: 6N + 12·L·H·Q·T (PaLM appendix B, as in nanoGPT).

    6N is forward+backward through the weight matmuls (N without position embeddings, from
    `analytic_num_params` when not given); 12·L·H·Q·T is attention's QKᵀ and AV at context T.
    """
    n = analytic_num_params(cfg) if n_params is None else n_params
    L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_size, cfg.block_size
    return 6.0 * n + 12.0 * L * H * Q * T


def peak_flops_for_name(device_name: str, dtype: torch.dtype, tf32: bool = True) -> float | None:
    """Peak FLOP/s of a GPU named like torch.cuda.get_device_name(); None when unknown."""
    if dtype in (torch.bfloat16, torch.float16):
        kind = "bf16"
    elif dtype == torch.float32:
        kind = "tf32" if tf32 else "fp32"
    else:
        return None
    for needle, key in _GPU_NAMES:
        if needle.lower() in device_name.lower():
            return PEAK_FLOPS.get(f"{key}-{kind}")
    return None


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of the CUDA device for matmuls in `dtype`; None on CPU or an unknown GPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    tf32 = torch.get_float32_matmul_precision() != "highest"  # "high"/"medium" allow TF32
    return peak_flops_for_name(torch.cuda.get_device_name(device), dtype, tf32=tf32)


def mfu(
    tokens_per_s: float, cfg: GPTConfig, n_params: int | None, peak: float, *, world_size: int
) -> float:
    """Model FLOPs utilisation per device (0..1): achieved FLOP/s of one device over its peak.

    `tokens_per_s` is the global rate of all `world_size` processes (one device each), and
    `peak` is one device's peak for the dtype its matmuls run in (`peak_flops`), so the
    rate is divided by `world_size`: 8 GPUs at 40% each report 0.40, not 3.2.
    """
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be > 0, got {peak!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size!r}")
    return tokens_per_s / world_size * flops_per_token(cfg, n_params) / peak
