"""Every Triton kernel compiles to a CUDA cubin (sm_90 by default; Ampere to Hopper under `slow`),
through the real wrappers' arguments, with no GPU: see cuda_compile.py (run in a fresh process,
since this session's triton is the interpreter)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("cuda_compile.py")


def run_compile(*archs: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *archs], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_kernels_compile_for_hopper():
    out = run_compile("sm_90")
    for kernel in ("store_kv", "kv_transfer", "decode_attention", "combine_splits", "prefill_attention"):
        assert f"sm_90 {kernel} " in out
    assert "sm_90 rms_norm " in out and "sm_90 rotary " in out


@pytest.mark.slow
def test_kernels_compile_for_ampere_and_ada():
    out = run_compile("sm_80", "sm_86", "sm_89")
    assert out.count(" ok ") == 3 * out.count("sm_80 ")
