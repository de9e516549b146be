"""`pretrain.dtype` / `pretrain.compile` resolved per machine (pipeline.train.precision)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from pipeline.train import precision
from pipeline.train.precision import compile_enabled, compute_dtype, cpu_has_native_bf16

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
BF16, FP32 = torch.bfloat16, torch.float32

# Abridged /proc/cpuinfo records of real CPUs: an EPYC Genoa (avx512_bf16), a Sapphire Rapids
# (amx_bf16 and avx512_bf16), a Skylake-X (AVX-512 but no bf16), a Neoverse V1 (Arm bf16), a
# Cortex-A72 (none); "avx512bw" must not read as a bf16 flag.
GENOA = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
SAPPHIRE = "flags\t\t: avx2 avx512f amx_bf16 amx_tile amx_int8 avx512_bf16\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512_vnni\n\n" * 2
NEOVERSE = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16 dcpop\nCPU part\t: 0xd40\n"
A72 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"


@pytest.mark.parametrize(
    ("text", "native"),
    [(GENOA, True), (SAPPHIRE, True), (SKYLAKE, False), (NEOVERSE, True), (A72, False)],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, text, native):
    info = tmp_path / "cpuinfo"
    info.write_text(text)
    assert cpu_has_native_bf16(info) is native


def test_an_unreadable_cpuinfo_means_no_native_bf16(tmp_path):
    assert cpu_has_native_bf16(tmp_path / "absent") is False


def test_this_machines_flags_decide_auto_on_cpu():
    """`auto` on CPU is bf16 exactly where /proc/cpuinfo lists a native bf16 flag."""
    path = Path("/proc/cpuinfo")
    words = set(path.read_text().split()) if path.exists() else set()
    native = bool(words & {"avx512_bf16", "amx_bf16", "bf16"})
    assert compute_dtype(CPU, "auto") == (BF16 if native else FP32)


def test_auto_follows_native_bf16_and_explicit_values_win(monkeypatch):
    assert compute_dtype(CUDA, "auto") == BF16
    assert compute_dtype(CUDA, "float32") == FP32
    assert compute_dtype(CPU, "bfloat16") == BF16  # asked for: autocast on any CPU
    for native, expected in ((True, BF16), (False, FP32)):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda native=native: native)
        assert compute_dtype(CPU, "auto") == expected
        assert compute_dtype(CPU, "float32") == FP32
        assert compute_dtype(CUDA, "auto") == BF16


def test_compile_auto_pays_on_cuda_and_on_native_bf16_cpus_with_a_compiler(monkeypatch, tmp_path):
    assert compile_enabled(CPU, "on", FP32) and not compile_enabled(CUDA, "off", BF16)
    assert compile_enabled(CUDA, "auto", FP32)
    # On CPU compile alone gained nothing (x0.98, benchmarks/README.md): not with fp32.
    assert not compile_enabled(CPU, "auto", FP32)
    # A fake compiler on PATH: the check is that inductor finds one, not what it builds.
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    for native in (True, False):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda native=native: native)
        monkeypatch.setenv("CXX", str(fake))
        assert precision.cpp_compiler() == str(fake)
        # bf16 by name on a CPU that emulates it: compiled it was slower still (x0.92).
        assert compile_enabled(CPU, "auto", BF16) is native
        for missing in (str(tmp_path / "no-such-compiler"), ""):
            monkeypatch.setenv("CXX", missing)
            assert precision.cpp_compiler() is None
            assert not compile_enabled(CPU, "auto", BF16)  # inductor could not build kernels


def test_cpp_compiler_is_the_one_inductor_searches_for():
    import torch._inductor.config as inductor

    search = [c for c in inductor.cpp.cxx if c is not None]  # None: a conda download
    default = "clang++" if sys.platform == "darwin" else "g++"
    assert search == [os.environ.get("CXX", default)]  # $CXX, else the default: nothing else
    assert precision.cpp_compiler() == shutil.which(search[0])
