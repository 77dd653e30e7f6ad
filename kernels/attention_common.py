"""What the two Triton paged attention kernels share: the wrappers' argument checks, and inside the
kernels the paged key lookup, one online-softmax step over a tile of keys, and the interpreter-safe dot.
Loop bounds and masks stay in each kernel: they are where the two differ."""

from __future__ import annotations

import torch

from kvferry.kernels._triton import tl, triton

LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x) = exp2(x * LOG2E)


def check_paged_attention(
    query: torch.Tensor,  # [num_rows, num_heads, head_dim]: one row a sequence (decode) or a token (prefill)
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_tables, max_blocks] int32 (the caller checks num_tables)
) -> tuple[int, int, int]:
    """Asserts the layout both kernels read; returns (block_size, num_kv_heads, head_dim)."""
    assert kv_cache.dim() == 5 and kv_cache.shape[0] == 2, kv_cache.shape
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    assert query.dim() == 3 and query.shape[2] == head_dim, (query.shape, kv_cache.shape)
    assert query.shape[1] % num_kv_heads == 0, (query.shape, num_kv_heads)
    assert query.dtype == kv_cache.dtype, (query.dtype, kv_cache.dtype)
    assert block_tables.dim() == 2, block_tables.shape
    assert block_tables.dtype == torch.int32 and block_tables.stride(1) == 1
    assert query.stride(-1) == 1 and kv_cache.stride(-1) == 1, "head_dim must be contiguous"
    return block_size, num_kv_heads, head_dim


def output_for(query: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``out`` checked against ``query``, or a new tensor like it."""
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.dtype == query.dtype and out.stride(-1) == 1, out.shape
    return out


def dot_options(query: torch.Tensor) -> dict[str, object]:
    """The kernels' ``UPCAST_DOT`` and ``DOT_PRECISION`` for this query: see ``attention_dot``; fp32
    inputs multiply in full precision, bf16/fp16 ones as the tensor cores do."""
    return {"UPCAST_DOT": not query.is_cuda, "DOT_PRECISION": "ieee" if query.dtype == torch.float32 else "tf32"}


@triton.jit
def attention_dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # The interpreter multiplies bf16 operands as raw integers, so on CPU both are widened to fp32
    # first: the same products a bf16 tensor-core dot with fp32 accumulation computes.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def paged_key_ptrs(
    cache_ptr, table, n, n_mask, kv_head, d, cache_stride_b, cache_stride_s, cache_stride_h,
    BLOCK_SIZE: tl.constexpr,
):
    # Token n of a sequence sits in cache block table[n // BLOCK_SIZE] at offset n % BLOCK_SIZE; its
    # value is cache_stride_kv past its key.
    block = tl.load(table + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    kv_offs = block * cache_stride_b + (n % BLOCK_SIZE) * cache_stride_s + kv_head * cache_stride_h
    return cache_ptr + kv_offs[:, None] + d[None, :]  # [BLOCK_N, DIM_PAD]


@triton.jit
def online_softmax_tile(
    q, k_ptrs, cache_stride_kv, kv_mask, visible, m_i, l_i, acc, qk_scale,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Folds one tile of keys and values into the running max m_i, sum l_i and output acc of the query
    # rows q [rows, DIM_PAD]; visible [rows, BLOCK_N] masks the scores. Every row must see a key in
    # its first tile, or m_new stays -inf and alpha = exp2(-inf + inf) is NaN.
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # [BLOCK_N, DIM_PAD]
    s = attention_dot(q, tl.trans(k), UPCAST_DOT, DOT_PRECISION) * qk_scale  # [rows, BLOCK_N]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # Value pointers formed only here, after the scores: live beside the key pointers, the two
    # [BLOCK_N, DIM_PAD] pointer tiles spill registers on sm_80 at head_dim 128.
    v = tl.load(k_ptrs + cache_stride_kv, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + attention_dot(p.to(v.dtype), v, UPCAST_DOT, DOT_PRECISION)
    return m_new, l_i, acc
