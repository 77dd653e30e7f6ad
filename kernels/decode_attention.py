"""Paged decode attention (Triton), beside its torch reference ``decode_attention_ref``.

One query token per sequence, grouped-query heads, keys and values read from the paged cache
through ``block_tables`` up to each sequence's ``context_lens`` (which include the new token, already
stored). One program per (sequence, KV head) computes all query heads of that group, so each K/V
element is read once per step; online softmax over tiles of ``BLOCK_N`` tokens.
"""

from __future__ import annotations

import torch

from kvferry.kernels._triton import tl, triton
from kvferry.kernels.attention import decode_attention_ref

__all__ = ["decode_attention", "decode_attention_ref"]

_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # The interpreter multiplies bf16 operands as raw integers, so on CPU both are widened to fp32
    # first: the same products a bf16 tensor-core dot with fp32 accumulation computes.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _decode_attention_kernel(
    out_ptr,
    q_ptr,
    cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    qk_scale,  # softmax scale * log2(e): scores are kept in base 2
    q_stride_t,
    q_stride_h,
    out_stride_t,
    out_stride_h,
    cache_stride_kv,
    cache_stride_b,
    cache_stride_s,
    cache_stride_h,
    block_tables_stride,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # >= 16, the smallest tl.dot M
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_N: tl.constexpr,  # tokens per tile
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q_mask = (g < GROUP)[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + seq * q_stride_t + heads[:, None] * q_stride_h + d[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    table = block_tables_ptr + seq * block_tables_stride
    for start in range(0, context_len, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < context_len
        block = tl.load(table + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        kv_offs = block * cache_stride_b + (n % BLOCK_SIZE) * cache_stride_s + kv_head * cache_stride_h
        kv_ptrs = cache_ptr + kv_offs[:, None] + d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(kv_ptrs, mask=kv_mask, other=0.0)  # [BLOCK_N, DIM_PAD]
        s = _dot(q, tl.trans(k), UPCAST_DOT, DOT_PRECISION) * qk_scale  # [GROUP_PAD, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(kv_ptrs + cache_stride_kv, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST_DOT, DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + seq * out_stride_t + heads[:, None] * out_stride_h + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=q_mask,
    )


def decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, >= 1, <= max_blocks * block_size
    scale: float,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim], written in place if given
    block_n: int | None = None,  # tile size in tokens (default: the cache block size, at least 16)
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    assert kv_cache.dim() == 5 and kv_cache.shape[0] == 2, kv_cache.shape
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    assert query.dim() == 3 and query.shape[2] == head_dim, (query.shape, kv_cache.shape)
    num_seqs, num_heads, _ = query.shape
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert query.dtype == kv_cache.dtype, (query.dtype, kv_cache.dtype)
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs, block_tables.shape
    assert block_tables.dtype == torch.int32 and block_tables.stride(1) == 1
    assert context_lens.shape == (num_seqs,) and context_lens.dtype == torch.int32, context_lens.shape
    assert query.stride(-1) == 1 and kv_cache.stride(-1) == 1, "head_dim must be contiguous"
    assert query.device == kv_cache.device == block_tables.device == context_lens.device
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.dtype == query.dtype and out.stride(-1) == 1, out.shape
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    _decode_attention_kernel[(num_seqs, num_kv_heads)](
        out,
        query,
        kv_cache,
        block_tables,
        context_lens,
        scale * _LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n or max(16, block_size),
        UPCAST_DOT=not query.is_cuda,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
    return out
