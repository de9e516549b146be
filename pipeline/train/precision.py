"""What the pretraining matmuls run in, and whether the model is compiled, for a device.

    compute_dtype(device, cfg.pretrain.dtype)            # torch.bfloat16 or torch.float32
    compile_enabled(device, cfg.pretrain.compile, dtype)  # True: torch.compile the model
    deterministic_wanted(device, cfg.pretrain.deterministic, compiled)  # deterministic_mode

`auto` picks what was measured to be faster and as accurate (benchmarks/README.md):
- dtype: bf16 autocast on CUDA, and on a CPU with native bf16 instructions (x86
  avx512_bf16 or amx_bf16, Arm bf16); float32 on any other CPU, where bf16 is emulated
  and slower (bare step at 1 x 256: x0.82 with AVX-512 alone, x0.04 with AVX2 alone);
- compile: on for CUDA, and on CPU where the matmuls run in native bf16 and inductor's C++
  compiler (`$CXX`, else g++) is on PATH: inductor builds its CPU kernels with it. On CPU
  compile alone gained nothing (x0.98); with native bf16 it adds to it (x2.31 against
  x1.73 for bf16 eager).
Imports only torch, so it runs on the GPU machine.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path

import torch

# /proc/cpuinfo flags of CPUs that run bf16 dot products natively (x86 "flags", Arm "Features").
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU lists a native bf16 instruction set; False where it cannot be read
    (macOS, Windows): the fp32 default is then the safe one."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features") and NATIVE_BF16_FLAGS & set(value.split()):
            return True
    return False


def compute_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """The dtype matmuls run in for `pretrain.dtype`: what it names, or for "auto" bf16
    (autocast) on CUDA and on a CPU with native bf16, float32 elsewhere."""
    if dtype in ("bfloat16", "float32"):
        return getattr(torch, dtype)
    if device.type == "cuda" or cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16: how reports, digests and MLflow params name a dtype."""
    return str(dtype).removeprefix("torch.")


def cpp_compiler() -> str | None:
    """The C++ compiler inductor builds CPU kernels with, or None where it is not on PATH.

    Inductor looks for `$CXX`, else g++ (clang++ on macOS), and nothing else
    (`torch._inductor.config.cpp.cxx`); importing inductor to ask it costs seconds.
    """
    default = "clang++" if sys.platform == "darwin" else "g++"
    return shutil.which(os.environ.get("CXX", default))


def compile_enabled(device: torch.device, compile: str, dtype: torch.dtype) -> bool:
    """`pretrain.compile` resolved: "on"/"off" as given; "auto" on CUDA, and on CPU when
    the matmuls run in bf16 (`dtype`) on native bf16 instructions and a C++ compiler
    exists. bf16 asked for by name on a CPU without them is emulated: compiled, it was
    slower still (x0.92 with AVX-512 alone) or crashed (AVX2 alone)."""
    if compile in ("on", "off"):
        return compile == "on"
    if device.type == "cuda":
        return True
    native = dtype == torch.bfloat16 and cpu_has_native_bf16()
    return native and cpp_compiler() is not None


def deterministic_wanted(device: torch.device, asked: bool, compiled: bool) -> bool:
    """Whether the stage runs under `distributed.deterministic_mode`: when asked
    (`pretrain.deterministic`), and always for a compiled CPU run. Eager CPU training is
    bit-identical on a re-run by construction; compiled, inductor's embedding backward
    scatter-adds with atomics across threads (weights differ by ~1e-9 between re-runs)
    unless deterministic algorithms are on, which cost nothing measurable there."""
    return asked or (device.type == "cpu" and compiled)
