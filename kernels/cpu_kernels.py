"""kvferry's CPU kernels (``csrc/``) for x86-64: the decode path's hot spots, fp32 and bf16.

- ``skinny_linear``: a linear over 1-8 tokens. At decode a linear reads its whole weight for a few
  tokens, so its speed is the speed at which it streams the weight; oneDNN's bf16 path reads it at
  about half this machine's bandwidth at batch 1, this kernel at close to it (docs/PERFORMANCE.md).
  Weights in bf16 (``vdpbf16ps`` on AVX512-BF16; widened in registers elsewhere) or fp32, fp32
  accumulation. Every (token, output) is summed in the same order whatever the token count, so a
  token's result does not depend on its batch.
- ``decode_attention``: one query token per request, straight from the paged cache (the torch
  reference gathers the blocks into a copy, then SDPA's set-up costs more than the attention).
- ``rope_store_kv``: RoPE on q and k and the store of k and v into the cache, in one pass.
- ``rms_norm``: the residual add and RMSNorm in one pass, with the reference's roundings.
- ``silu_mul``: the gated MLP's ``silu(gate) * up`` in one pass.

The same sources build one extension per ISA: ``AVX512`` (AVX-512 with AVX512-BF16) and ``AVX2``
(AVX2 + FMA, every x86-64 since ~2013; also what an AVX-512 CPU without AVX512-BF16 runs). ``load()``
returns the best one this CPU has (``cpu_features``, which ``ONEDNN_MAX_CPU_ISA=AVX2`` caps). They are
compiled once by ``python -m kvferry.kernels.build`` (``make setup``; ~1 minute each), never at run
time (``cpu_extension.py``). Where none can run — not built, a CPU without AVX2, or
``KVFERRY_CPU_KERNELS=0`` (which gives back the bit-faithful torch references) — ``load()`` returns
None, logs why once, and callers keep the torch paths (oneDNN, MKL, the references).
"""

from __future__ import annotations

import torch

from kvferry.kernels import cpu_features
from kvferry.kernels.cpu_extension import LazyExtension

MAX_TOKENS = 8  # beyond this a linear is no longer a weight read; oneDNN's GEMM takes it
SOURCES = ["bindings.cpp", "skinny_linear.cpp", "decode_attention.cpp", "rope_store_kv.cpp", "rms_norm.cpp",
           "silu_mul.cpp"]
# -ffp-contract=off: no multiply-add fused where the torch expression rounds the product (vec.h).
COMMON_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
# fp32 weights at 1-8 tokens: MKL's F.linear, or this kernel where it streams faster (docs/KERNELS.md).
SKINNY_FP32 = True

AVX512 = LazyExtension(
    "kvferry_cpu_kernels_avx512",
    [*SOURCES, "skinny_linear_dpbf16.cpp"],
    [*COMMON_FLAGS, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"],
    ["-fopenmp"],
    unavailable_reason=lambda: None if cpu_features.has_avx512_bf16() else "CPU has no AVX512-BF16",
    fallback="the AVX2 kernels",
)
AVX2 = LazyExtension(
    "kvferry_cpu_kernels_avx2",
    SOURCES,
    [*COMMON_FLAGS, "-mavx2", "-mfma", "-mf16c"],
    ["-fopenmp"],
    unavailable_reason=lambda: None if cpu_features.has_avx2() else "CPU has no AVX2/FMA/F16C",
    fallback="oneDNN, MKL and the torch references",
)
EXTENSIONS = [AVX512, AVX2]  # best first


def load():
    """The best built extension this CPU can run (its ``isa`` says which), or None (reasons logged once)."""
    return AVX512.load() or AVX2.load()  # lock-free once settled: the decode step asks several times per layer


def isa() -> str | None:
    """``"avx512"``, ``"avx2"``, or None where the torch paths run."""
    module = load()
    return None if module is None else module.isa


def takes_skinny(weight: torch.Tensor) -> bool:
    """Whether a linear with this weight sends 1-``MAX_TOKENS`` decode tokens to ``skinny_linear``."""
    if weight.device.type != "cpu" or load() is None:
        return False
    return weight.dtype == torch.bfloat16 or (weight.dtype == torch.float32 and SKINNY_FP32)


def available() -> bool:
    return load() is not None


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias_fp32: torch.Tensor | None, next_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` for 1 to ``MAX_TOKENS`` rows (any leading shape), in x's dtype; needs
    ``load()``. (x, weight): (bf16, bf16), (fp32, bf16) or (fp32, fp32).
    ``next_weight``: the weight the caller reads next, whose start is prefetched as this call ends."""
    bias, following = _EMPTY if bias_fp32 is None else bias_fp32, _EMPTY if next_weight is None else next_weight
    if x.dim() == 2 and x.is_contiguous():  # the decode step's case: no reshapes (a few us each)
        return load().skinny_linear(x, weight, bias, following)
    out = load().skinny_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias, following)
    return out.view(*x.shape[:-1], weight.shape[0])


def decode_attention(
    query: torch.Tensor,  # [B, H, D] fp32 or bf16 (rows contiguous; may be a view into a larger tensor)
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KVH, D], query's dtype
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    return load().decode_attention(query, kv_cache, block_tables, context_lens, scale)


def rope_store_kv(
    qkv: torch.Tensor,  # [T, (H + 2 * KVH) * D] fp32 or bf16
    cos: torch.Tensor,  # [T, D] (any shape of T * D elements), qkv's dtype
    sin: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KVH, D], qkv's dtype
    slot_mapping: torch.Tensor,  # [T] int64
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:  # q [T, H, D], rotated
    return load().rope_store_kv(qkv, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(load().rms_norm(x, weight, eps, residual))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] fp32 or bf16 -> [T, I]
    return load().silu_mul(gate_up)


_EMPTY = torch.empty(0)
