"""kvferry's CPU kernels (``csrc/``) for x86 with AVX512-BF16: the bf16 decode path's hot spots.

- ``skinny_linear``: a linear over 1-8 tokens. At decode a linear reads its whole weight for a few
  tokens, so its speed is the speed at which it streams the weight; oneDNN's bf16 path reads it at
  about half this machine's bandwidth at batch 1, this kernel at close to it (docs/PERFORMANCE.md).
  Every (token, output) is summed in the same order whatever the token count, so a token's result
  does not depend on its batch.
- ``decode_attention``: one query token per request, straight from the paged cache (the torch
  reference gathers the blocks into a copy, then SDPA's set-up costs more than the attention).
- ``rope_store_kv``: RoPE on q and k and the store of k and v into the cache, in one pass.
- ``rms_norm``: the residual add and RMSNorm in one pass, with the reference's roundings.
- ``silu_mul``: the gated MLP's ``silu(gate) * up`` in one pass.

They are compiled on first use (``cpu_extension.py``; ~1 minute once). Where they cannot run — a
CPU without AVX512-BF16, no compiler, or ``KVFERRY_CPU_KERNELS=0`` — ``load()`` returns None, logs
why once, and callers keep the torch paths (oneDNN, the references). fp32 models never
use them: fp32 stays on the exact-reference path.
"""

from __future__ import annotations

import logging

import torch

from kvferry.kernels.cpu_extension import LazyExtension

MAX_TOKENS = 8  # beyond this a linear is no longer a weight read; oneDNN's GEMM takes it
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"]


def cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512_bf16" in line for line in f)
    except OSError:
        return False


EXTENSION = LazyExtension(
    "kvferry_cpu_kernels",
    ["bindings.cpp", "skinny_linear.cpp", "decode_attention.cpp", "rope_store_kv.cpp", "rms_norm.cpp", "silu_mul.cpp"],
    FLAGS,
    ["-fopenmp"],
    unavailable_reason=lambda: None if cpu_has_avx512_bf16() else "CPU has no AVX512-BF16",
    fallback="oneDNN and the references",
)


def load():
    """The compiled extension, or None where it cannot run (the reason is logged once)."""
    return EXTENSION.load()  # lock-free once settled: the decode step asks several times per layer


def available() -> bool:
    return load() is not None


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias_fp32: torch.Tensor | None, next_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` for 1 to ``MAX_TOKENS`` bf16 rows (any leading shape); needs ``load()``.
    ``next_weight``: the weight the caller reads next, whose start is prefetched as this call ends."""
    rows = x.reshape(-1, x.shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    out = EXTENSION.load().skinny_linear(
        rows, weight, _EMPTY if bias_fp32 is None else bias_fp32, _EMPTY if next_weight is None else next_weight
    )
    return out.view(*x.shape[:-1], weight.shape[0])


def decode_attention(
    query: torch.Tensor,  # [B, H, D] bf16 (rows contiguous; may be a view into a larger tensor)
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KVH, D] bf16
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    return EXTENSION.load().decode_attention(query, kv_cache, block_tables, context_lens, scale)


def rope_store_kv(
    qkv: torch.Tensor,  # [T, (H + 2 * KVH) * D] bf16
    cos: torch.Tensor,  # [T, D] (any shape of T * D elements) bf16
    sin: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KVH, D] bf16
    slot_mapping: torch.Tensor,  # [T] int64
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:  # q [T, H, D], rotated
    return EXTENSION.load().rope_store_kv(qkv, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(EXTENSION.load().rms_norm(x, weight, eps, residual))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] bf16 -> [T, I]
    return EXTENSION.load().silu_mul(gate_up)


_EMPTY = torch.empty(0)


if __name__ == "__main__":  # `python -m kvferry.kernels.cpu_kernels`: build every CPU extension now
    from kvferry.kernels import cpu_kv_copy

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print("kvferry CPU kernels:", "built" if load() is not None else "not available (the torch paths will run)")
    print("kvferry KV copy kernels:", "built" if cpu_kv_copy.load() is not None else "not available (torch copies)")
