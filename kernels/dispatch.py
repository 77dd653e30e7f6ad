"""The one entry point the engine calls for kernels: Triton on CUDA, the CPU kernels or the torch
reference elsewhere.

A call takes the Triton path when its tensors are on a CUDA device and triton is importable (the
Triton interpreter is for tests only, far too slow to serve). fp32 and bf16 CPU tensors take kvferry's
CPU kernels (``cpu_kernels.py``, AVX-512 or AVX2: decode attention, RoPE + KV store, RMSNorm and
silu*mul) where one is built for this CPU; everything else takes the torch reference (as does
everything with ``KVFERRY_CPU_KERNELS=0``: the bit-faithful path against transformers).

RMSNorm and silu*mul take the kernel for every row count, prompts included: they work row by row, so
a token's result never depends on how many tokens its step holds (a prefix-cache hit or a chunk
boundary must not change a prompt's numerics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvferry.kernels import _triton, cpu_kernels
from kvferry.kernels.attention import AttentionMetadata, paged_attention_ref
from kvferry.kernels.decode_attention import decode_attention
from kvferry.kernels.kv_transfer import gather_kv_blocks_ref, scatter_kv_blocks_ref
from kvferry.kernels.kv_transfer import gather_kv_blocks as _gather_kv_blocks_triton
from kvferry.kernels.kv_transfer import scatter_kv_blocks as _scatter_kv_blocks_triton
from kvferry.kernels.prefill_attention import prefill_attention
from kvferry.kernels.rms_norm import rms_norm as _rms_norm_triton
from kvferry.kernels.rms_norm import rms_norm_ref
from kvferry.kernels.rotary import rotary as _rotary_triton
from kvferry.kernels.rotary import rotary_ref
from kvferry.kernels.store_kv import store_kv as _store_kv_triton
from kvferry.kernels.store_kv import store_kv_ref

__all__ = ["gather_kv_blocks", "paged_attention", "rms_norm", "rotary", "scatter_kv_blocks", "store_kv"]


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and _triton.HAS_TRITON


_CPU_KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def _use_cpu_kernels(t: torch.Tensor) -> bool:
    return t.dtype in _CPU_KERNEL_DTYPES and t.device.type == "cpu" and cpu_kernels.load() is not None


def _decode_attention_cpu(
    query: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata, scale: float
) -> torch.Tensor:
    assert attn.block_tables is not None and attn.context_lens is not None
    return cpu_kernels.decode_attention(query, kv_cache, attn.block_tables, attn.context_lens, scale)


def fused_cpu_decode(qkv: torch.Tensor, attn: AttentionMetadata, head_dim: int) -> bool:
    """Whether a layer's attention can run as ``decode_attention_cpu``: a decode-only CPU batch."""
    return not attn.prefills and _use_cpu_kernels(qkv) and head_dim % 16 == 0


def decode_attention_cpu(
    qkv: torch.Tensor,  # [T, (H + 2 * KVH) * D]: the layer's q/k/v product, RoPE not yet applied
    cos: torch.Tensor,  # [T, 1, D] (duplicated halves), qkv's dtype
    sin: torch.Tensor,  # [T, 1, D] (duplicated halves, sign of rotate_half folded in), qkv's dtype
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
) -> torch.Tensor:  # [T, H, D]
    """RoPE, the K/V store and decode attention in two kernel calls (see ``fused_cpu_decode``)."""
    assert attn.block_tables is not None and attn.context_lens is not None
    q = cpu_kernels.rope_store_kv(qkv, cos, sin, kv_cache, attn.slot_mapping, num_heads, num_kv_heads)
    return cpu_kernels.decode_attention(q, kv_cache, attn.block_tables, attn.context_lens, scale)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] (gate first) -> [T, I]
    if gate_up.dim() == 2 and _use_cpu_kernels(gate_up):
        return cpu_kernels.silu_mul(gate_up.contiguous())
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    attn: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Store the new K/V at ``attn.slot_mapping``, then attend (prefill chunks first, then decodes)."""
    if _use_triton(query):
        return paged_attention_triton(query, key, value, kv_cache, attn, scale)
    if _use_cpu_kernels(query) and query.shape[-1] % 16 == 0:
        return paged_attention_ref(query, key, value, kv_cache, attn, scale, decode=_decode_attention_cpu)
    return paged_attention_ref(query, key, value, kv_cache, attn, scale)


def paged_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """``paged_attention`` on the Triton kernels whatever the device (tests run it in the interpreter)."""
    _store_kv_triton(key, value, kv_cache, attn.slot_mapping)
    out = torch.empty_like(query)
    num_prefill_tokens = attn.num_prefill_tokens
    if attn.prefills:
        tables, starts, lens = prefill_tables(attn, kv_cache.shape[2])
        prefill_attention(
            query[:num_prefill_tokens],
            kv_cache,
            tables,
            starts,
            lens,
            max(c.query_len for c in attn.prefills),
            scale,
            out=out[:num_prefill_tokens],
        )
    if attn.num_decodes:
        assert attn.block_tables is not None and attn.context_lens is not None
        decode_attention(
            query[num_prefill_tokens:],
            kv_cache,
            attn.block_tables,
            attn.context_lens,
            scale,
            out=out[num_prefill_tokens:],
        )
    return out


def prefill_tables(
    attn: AttentionMetadata, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # block tables, query starts, context lens
    """The prefill fields of ``attn``, or, when absent, the same derived from its chunks on device.

    A chunk's block ids are the blocks of every ``block_size``-th slot of its context (its
    ``context_slots``, or its own new slots when it has no cached prefix); no host sync.
    """
    if attn.prefill_block_tables is not None:
        assert attn.prefill_query_starts is not None and attn.prefill_context_lens is not None
        return attn.prefill_block_tables, attn.prefill_query_starts, attn.prefill_context_lens
    device = attn.slot_mapping.device
    chunks = attn.prefills
    max_blocks = max(-(-c.context_len // block_size) for c in chunks)
    tables = torch.zeros(len(chunks), max_blocks, dtype=torch.int32, device=device)
    for i, c in enumerate(chunks):
        slots = c.context_slots
        if slots is None:
            slots = attn.slot_mapping[c.query_start : c.query_start + c.query_len]
        blocks = slots[::block_size] // block_size
        tables[i, : blocks.shape[0]] = blocks.to(torch.int32)
    query_lens = [c.query_len for c in chunks]
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    lens = torch.tensor([c.context_len for c in chunks], dtype=torch.int32, device=device)
    return tables, starts, lens


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    (_store_kv_triton if _use_triton(kv_cache) else store_kv_ref)(key, value, kv_cache, slot_mapping)


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed, new residual = x + residual, or x itself)
    if _use_triton(x):
        return _rms_norm_triton(x, weight, eps, residual)
    if x.dim() == 2 and x.stride(-1) == 1 and weight.dtype == x.dtype and _use_cpu_kernels(x):
        return cpu_kernels.rms_norm(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)


def rotary(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    cos: torch.Tensor,  # [num_tokens, head_dim] (HF cat(freqs, freqs)) or [num_tokens, head_dim // 2]
    sin: torch.Tensor,
) -> None:
    (_rotary_triton if _use_triton(query) else rotary_ref)(query, key, cos, sin)


def gather_kv_blocks(
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int64
) -> torch.Tensor:  # [2, n, block_size, num_kv_heads, head_dim], contiguous
    if _use_triton(kv_cache_layer):
        return _gather_kv_blocks_triton(kv_cache_layer, block_ids.to(kv_cache_layer.device))
    return gather_kv_blocks_ref(kv_cache_layer, block_ids)


def scatter_kv_blocks(
    buffer: torch.Tensor,  # [2, n, block_size, num_kv_heads, head_dim]
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int64, distinct
) -> None:
    if _use_triton(kv_cache_layer):
        device = kv_cache_layer.device
        buffer = buffer.to(device=device, dtype=kv_cache_layer.dtype).contiguous()
        _scatter_kv_blocks_triton(buffer, kv_cache_layer, block_ids.to(device))
    else:
        scatter_kv_blocks_ref(buffer, kv_cache_layer, block_ids)
