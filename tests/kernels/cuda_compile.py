"""Compile every Triton kernel for CUDA targets on a machine without a GPU (run as a script).

The interpreter is lenient where the compiler is not (types of loop-carried values, constexpr
branches, dot shapes and dtypes), so the kernels are also lowered to a cubin with Triton's bundled
ptxas. Each wrapper is called for real, on CPU tensors, with its kernel replaced by a recorder: the
recorded arguments give the signature, so the wrappers' argument passing is what gets compiled.
ptxas's register report is printed too, and the run fails if any configuration spills registers.

    python tests/kernels/cuda_compile.py [sm_90 sm_80 ...]   (default: sm_90)

Must run in a process where TRITON_INTERPRET is unset and triton not yet imported.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

assert os.environ.get("TRITON_INTERPRET") != "1", "compile check needs the real compiler"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kvferry.kernels._triton as _triton  # noqa: E402

# No GPU here, so _triton did not import triton; hand it the real one before the kernels import it.
_triton.triton, _triton.tl, _triton.HAS_TRITON = triton, triton.language, True

from kvferry.kernels import (  # noqa: E402
    decode_attention,
    kv_transfer,
    prefill_attention,
    rms_norm,
    rotary,
    store_kv,
)

_TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int32: "i32",
    torch.int64: "i64",
}
_SHOWN = ("HEAD_DIM", "GROUP", "NUM_SPLITS", "HIDDEN", "TO_BUFFER", "HAS_RESIDUAL", "COS_HALF_WIDTH")


class Recorder:
    """Stands in for a jitted kernel: ``kernel[grid](*args, **constexprs)`` records the call."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    assert isinstance(value, float), type(value)
    return "fp32"


_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def compile_call(kernel, args, kwargs, target: GPUTarget):
    options = {k: v for k, v in kwargs.items() if k in _LAUNCH_OPTIONS}
    constexprs = {k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS}
    if "UPCAST_DOT" in constexprs:  # the CPU recording asked for the interpreter's workaround
        constexprs["UPCAST_DOT"] = False
    names = kernel.arg_names
    signature = {name: _arg_type(value) for name, value in zip(names, args)}
    signature.update({name: "constexpr" for name in constexprs})
    src = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=target, options=options)


def record_calls() -> list[tuple[str, object, tuple, dict]]:
    """Call every wrapper on small CPU inputs (bf16 and fp32; head dims 64 and 128; GQA 3 and 8)."""
    kernels = {
        "store_kv": (store_kv, "_store_kv_kernel"),
        "kv_transfer": (kv_transfer, "_copy_blocks_kernel"),
        "decode_attention": (decode_attention, "_decode_attention_kernel"),
        "combine_splits": (decode_attention, "_combine_splits_kernel"),
        "prefill_attention": (prefill_attention, "_prefill_attention_kernel"),
        "rms_norm": (rms_norm, "_rms_norm_kernel"),
        "rotary": (rotary, "_rotary_kernel"),
    }
    recorders = {}
    for label, (module, attr) in kernels.items():
        recorders[label] = Recorder(getattr(module, attr))
        setattr(module, attr, recorders[label])
    for dtype, head_dim, num_heads, num_kv_heads, block_size in [
        (torch.bfloat16, 64, 9, 3, 16),
        (torch.bfloat16, 128, 32, 4, 32),
        (torch.float32, 64, 8, 8, 16),
        (torch.float32, 128, 16, 2, 32),
    ]:
        cache = torch.zeros(2, 8, block_size, num_kv_heads, head_dim, dtype=dtype)
        q = torch.zeros(4, num_heads, head_dim, dtype=dtype)
        kv = torch.zeros(4, num_kv_heads, head_dim, dtype=dtype)
        tables = torch.zeros(2, 4, dtype=torch.int32)
        store_kv.store_kv(kv, kv, cache, torch.arange(4))
        kv_transfer.gather_kv_blocks(cache, torch.arange(2))
        buffer = torch.zeros(2, 2, *cache.shape[2:], dtype=dtype)
        kv_transfer.scatter_kv_blocks(buffer, cache, torch.arange(2))
        for num_splits in (1, 4):
            lens = torch.ones(2, dtype=torch.int32)
            decode_attention.decode_attention(q[:2], cache, tables, lens, 0.1, num_splits=num_splits)
        starts, lens = torch.tensor([0, 2, 4], dtype=torch.int32), torch.full((2,), 3, dtype=torch.int32)
        prefill_attention.prefill_attention(q, cache, tables, starts, lens, 2, 0.1)
        x = torch.zeros(4, num_heads * head_dim, dtype=dtype)
        rms_norm.rms_norm(x, torch.ones(x.shape[1], dtype=dtype), 1e-5, x)
        rms_norm.rms_norm(x, torch.ones(x.shape[1], dtype=dtype), 1e-5)
        rotary.rotary(q, kv, torch.zeros(4, head_dim), torch.zeros(4, head_dim))
        rotary.rotary(q, kv, torch.zeros(4, head_dim // 2), torch.zeros(4, head_dim // 2))
    return [(label, r.kernel, args, kw) for label, r in recorders.items() for args, kw in r.calls]


def ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spilled bytes stored + loaded) from ``ptxas -v``."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        proc = subprocess.run(
            [get_ptxas(arch).path, "-v", "--gpu-name", gpu, f.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        )
    registers = int(re.search(r"Used (\d+) registers", proc.stderr).group(1))
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", proc.stderr))
    return registers, spills


def main(archs: list[str]) -> int:
    calls = record_calls()
    spilled = 0
    for arch in archs:
        target = GPUTarget("cuda", int(arch.removeprefix("sm_")), 32)
        for label, kernel, args, kwargs in calls:
            start = time.perf_counter()
            compiled = compile_call(kernel, args, kwargs, target)
            assert compiled.asm.get("cubin"), label
            registers, spills = ptxas_report(compiled.asm["ptx"], target.arch)
            spilled += spills
            shown = {k: v for k, v in kwargs.items() if k in _SHOWN}
            dtype = next(_arg_type(a) for a in args if isinstance(a, torch.Tensor))
            print(
                f"{arch} {label:18s} {dtype:6s} {shown} ok {time.perf_counter() - start:.2f}s, "
                f"{registers} registers, {spills} bytes spilled",
                flush=True,
            )
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["sm_90"]))
