"""Paged decode attention (Triton), beside its torch reference ``decode_attention_ref``.

One query token per sequence, grouped-query heads, keys and values read from the paged cache
through ``block_tables`` up to each sequence's ``context_lens`` (which include the new token, already
stored). One program per (sequence, KV head, split) computes all query heads of that group, so each
K/V element is read once per step; online softmax over tiles of ``BLOCK_N`` tokens.

Split-KV ("flash-decoding"): when sequences x KV heads are too few programs to fill the GPU (batch 1,
long context), each sequence's context is cut into ``num_splits`` ranges of ``split_len`` tokens, each
program writes its partial output and log-sum-exp, and a second kernel combines the splits.
"""

from __future__ import annotations

import functools

import torch

from kvferry.kernels._triton import tl, triton
from kvferry.kernels.attention import decode_attention_ref
from kvferry.kernels.attention_common import LOG2E, check_paged_attention, dot_options, output_for
from kvferry.kernels.attention_common import online_softmax_tile, paged_key_ptrs

__all__ = ["decode_attention", "decode_attention_ref"]

@triton.jit
def _decode_attention_kernel(
    out_ptr,
    partial_out_ptr,  # [num_seqs, num_heads, NUM_SPLITS, HEAD_DIM] fp32 (unused if NUM_SPLITS == 1)
    partial_lse_ptr,  # [num_seqs, num_heads, NUM_SPLITS] fp32, base-2 log-sum-exp of each split
    q_ptr,
    cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    qk_scale,  # softmax scale * log2(e): scores are kept in base 2
    split_len,  # tokens per split, a multiple of BLOCK_N
    num_heads,
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
    NUM_SPLITS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    split_start = split * split_len
    split_end = tl.minimum(context_len, split_start + split_len)
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
    for start in range(split_start, split_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < split_end
        k_ptrs = paged_key_ptrs(
            cache_ptr, table, n, n_mask, kv_head, d, cache_stride_b, cache_stride_s, cache_stride_h, BLOCK_SIZE
        )
        kv_mask = n_mask[:, None] & d_mask[None, :]
        m_i, l_i, acc = online_softmax_tile(
            q, k_ptrs, cache_stride_kv, kv_mask, n_mask[None, :], m_i, l_i, acc, qk_scale,
            UPCAST_DOT, DOT_PRECISION,
        )
    # A split past the end of a shorter sequence saw no keys: output 0 with weight exp2(-inf) = 0.
    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + seq * out_stride_t + heads[:, None] * out_stride_h + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=q_mask,
        )
    else:
        part = (seq * num_heads + heads) * NUM_SPLITS + split  # [GROUP_PAD]
        tl.store(partial_out_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=q_mask)
        lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(partial_lse_ptr + part, lse, mask=g < GROUP)


@triton.jit
def _combine_splits_kernel(
    out_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    num_heads,
    out_stride_t,
    out_stride_h,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
):
    # One program per (sequence, query head): softmax-weighted sum of the splits' outputs.
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, DIM_PAD)
    s_mask = s < NUM_SPLITS
    d_mask = d < HEAD_DIM
    part = (seq * num_heads + head) * NUM_SPLITS + s
    lse = tl.load(partial_lse_ptr + part, mask=s_mask, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, axis=0))  # split 0 always holds keys, so the max is finite
    o_mask = s_mask[:, None] & d_mask[None, :]
    o = tl.load(partial_out_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=o_mask, other=0.0)
    out = tl.sum(weight[:, None] * o, axis=0) / tl.sum(weight, axis=0)
    out_ptrs = out_ptr + seq * out_stride_t + head * out_stride_h + d
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(query: torch.Tensor, num_programs: int, max_context_len: int) -> int:
    """Splits enough for about two waves of programs, each split at least 256 tokens; 1 off CUDA.
    A heuristic, not tuned on hardware."""
    if not query.is_cuda:
        return 1
    waves = triton.cdiv(2 * _num_sms(query.device), num_programs)
    return max(1, min(waves, max_context_len // 256, 32))


def decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, >= 1, <= max_blocks * block_size
    scale: float,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim], written in place if given
    block_n: int | None = None,  # tile size in tokens (default: the cache block size, at least 16)
    num_splits: int | None = None,  # split-KV ranges per sequence (default: default_num_splits)
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    block_size, num_kv_heads, head_dim = check_paged_attention(query, kv_cache, block_tables)
    num_seqs, num_heads, _ = query.shape
    assert block_tables.shape[0] == num_seqs, (block_tables.shape, query.shape)
    assert context_lens.shape == (num_seqs,) and context_lens.dtype == torch.int32, context_lens.shape
    assert query.device == kv_cache.device == block_tables.device == context_lens.device
    out = output_for(query, out)
    if num_seqs == 0:
        return out
    block_n = block_n or max(16, block_size)
    assert block_n >= 16 and block_n & (block_n - 1) == 0, f"block_n is a power of two >= 16, got {block_n}"
    # Bound every context by the table width: no host sync on context_lens.
    max_context_len = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = default_num_splits(query, num_seqs * num_kv_heads, max_context_len)
    split_len = triton.cdiv(triton.cdiv(max_context_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_context_len, split_len)  # none empty for every sequence
    partial_out = partial_lse = out  # placeholders, never touched with one split
    if num_splits > 1:
        partial_out = query.new_empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32)
        partial_lse = query.new_empty(num_seqs, num_heads, num_splits, dtype=torch.float32)
    group = num_heads // num_kv_heads
    dim_pad = max(16, triton.next_power_of_2(head_dim))
    # 8 warps for the larger K/V tiles: with 4, ptxas spills at head_dim 128 x 32 tokens in fp32.
    num_warps = 8 if dim_pad * block_n > 2048 else 4
    _decode_attention_kernel[(num_seqs, num_kv_heads, num_splits)](
        out,
        partial_out,
        partial_lse,
        query,
        kv_cache,
        block_tables,
        context_lens,
        scale * LOG2E,
        split_len,
        num_heads,
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
        DIM_PAD=dim_pad,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        **dot_options(query),
        num_warps=num_warps,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_seqs, num_heads)](
            out,
            partial_out,
            partial_lse,
            num_heads,
            out.stride(0),
            out.stride(1),
            NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim,
            DIM_PAD=dim_pad,
        )
    return out
