"""Pieces the Triton attention kernels share: the interpreter-safe dot product and log2(e)."""

from __future__ import annotations

from kvferry.kernels._triton import tl, triton

LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x) = exp2(x * LOG2E)


@triton.jit
def attention_dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # The interpreter multiplies bf16 operands as raw integers, so on CPU both are widened to fp32
    # first: the same products a bf16 tensor-core dot with fp32 accumulation computes.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)
