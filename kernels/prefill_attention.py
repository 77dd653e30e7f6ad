"""Prefill attention over a cached prefix plus a new chunk (Triton), beside ``prefill_attention_ref``.

All prefill chunks of a batch in one launch (variable length). Chunk ``c`` holds the query tokens
``query_starts[c] : query_starts[c + 1]`` of the flat batch; its keys are the ``context_lens[c]`` tokens
of the request (cached prefix, then the chunk itself, already stored), read through
``block_tables[c]``. Causal with an offset: query ``i`` of a chunk of ``query_len`` tokens sits at
absolute position ``context_len - query_len + i`` and sees keys ``0 ..`` that position.
Flash-style: one program per (chunk, query head, tile of ``BLOCK_M`` queries), online softmax over
tiles of ``BLOCK_N`` keys, stopping at the tile's last visible key.
"""

from __future__ import annotations

import torch

from kvferry.kernels._triton import tl, triton
from kvferry.kernels.attention import prefill_attention_ref
from kvferry.kernels.attention_common import LOG2E, check_paged_attention, dot_options, output_for
from kvferry.kernels.attention_common import online_softmax_tile, paged_key_ptrs

__all__ = ["prefill_attention", "prefill_attention_ref"]

@triton.jit
def _prefill_attention_kernel(
    out_ptr,
    q_ptr,
    cache_ptr,
    block_tables_ptr,
    query_starts_ptr,
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
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per tile
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    kv_head = head // GROUP
    query_start = tl.load(query_starts_ptr + chunk)
    query_len = tl.load(query_starts_ptr + chunk + 1) - query_start
    context_len = tl.load(context_lens_ptr + chunk)
    prefix_len = context_len - query_len

    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < query_len
    q_pos = prefix_len + m  # absolute position of each query
    d = tl.arange(0, DIM_PAD)
    d_mask = d < HEAD_DIM
    q_mask = m_mask[:, None] & d_mask[None, :]
    tokens = (query_start + m).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * q_stride_t + head * q_stride_h + d[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    table = block_tables_ptr + chunk * block_tables_stride
    # Keys past the tile's last query position are masked for every row: stop there. Tiles wholly
    # past the chunk (grid padding to the longest chunk) do no work and store nothing.
    key_end = tl.minimum(context_len, prefix_len + (tile + 1) * BLOCK_M)
    key_end = tl.where(tile * BLOCK_M < query_len, key_end, 0)
    for start in range(0, key_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < context_len
        k_ptrs = paged_key_ptrs(
            cache_ptr, table, n, n_mask, kv_head, d, cache_stride_b, cache_stride_s, cache_stride_h, BLOCK_SIZE
        )
        kv_mask = n_mask[:, None] & d_mask[None, :]
        # Key 0 is visible to every row, so each row sees a key in the first tile.
        visible = (n[None, :] <= q_pos[:, None]) & n_mask[None, :]
        m_i, l_i, acc = online_softmax_tile(
            q, k_ptrs, cache_stride_kv, kv_mask, visible, m_i, l_i, acc, qk_scale, UPCAST_DOT, DOT_PRECISION
        )
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + tokens[:, None] * out_stride_t + head * out_stride_h + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=q_mask,
    )


def prefill_attention(
    query: torch.Tensor,  # [num_prefill_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim], chunk K/V stored
    block_tables: torch.Tensor,  # [num_chunks, max_blocks] int32
    query_starts: torch.Tensor,  # [num_chunks + 1] int32, cumulative query lengths from 0
    context_lens: torch.Tensor,  # [num_chunks] int32, >= the chunk's query length
    max_query_len: int,  # host-side bound on the chunk lengths (sizes the grid)
    scale: float,
    out: torch.Tensor | None = None,  # [num_prefill_tokens, num_heads, head_dim], written if given
    block_m: int | None = None,  # queries per program: 64, or 32 in fp32
    block_n: int | None = None,  # keys per tile: 64, or 32 in fp32
    num_warps: int | None = None,  # 4, or 8 for head dims over 64
) -> torch.Tensor:  # [num_prefill_tokens, num_heads, head_dim]
    block_size, num_kv_heads, head_dim = check_paged_attention(query, kv_cache, block_tables)
    num_tokens, num_heads, _ = query.shape
    num_chunks = context_lens.shape[0]
    assert block_tables.shape[0] == num_chunks, (block_tables.shape, context_lens.shape)
    assert query_starts.shape == (num_chunks + 1,) and query_starts.dtype == torch.int32, query_starts.shape
    assert context_lens.dtype == torch.int32 and context_lens.dim() == 1, context_lens.shape
    devices = {t.device for t in (query, kv_cache, block_tables, query_starts, context_lens)}
    assert len(devices) == 1, devices
    # Defaults chosen so that ptxas reports no register spills for sm_90 (compiled, never run).
    block_m = block_m or (32 if query.dtype == torch.float32 else 64)
    block_n = block_n or (32 if query.dtype == torch.float32 else 64)
    for b in (block_m, block_n):
        assert b >= 16 and b & (b - 1) == 0, f"tile sizes are powers of two >= 16, got {b}"
    out = output_for(query, out)
    if num_chunks == 0 or num_tokens == 0:
        return out
    dim_pad = max(16, triton.next_power_of_2(head_dim))
    if num_warps is None:
        num_warps = 8 if dim_pad > 64 else 4
    grid = (num_chunks, num_heads, triton.cdiv(max_query_len, block_m))
    _prefill_attention_kernel[grid](
        out,
        query,
        kv_cache,
        block_tables,
        query_starts,
        context_lens,
        scale * LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        DIM_PAD=dim_pad,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        **dot_options(query),
        num_warps=num_warps,
    )
    return out
