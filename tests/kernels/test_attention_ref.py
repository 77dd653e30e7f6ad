"""The CPU decode attention (``decode_attention_ref``: block gather + grouped SDPA) against a naive
per-request, per-head softmax computed in float64 from the cache slot by slot."""

from __future__ import annotations

import pytest
import torch
from kvferry.kernels.attention import (
    AttentionMetadata,
    build_decode_metadata,
    decode_attention_ref,
)


def naive_decode(query, kv_cache, tables, lens, block_size, scale):  # -> [B, H, D] float64
    num_heads, num_kv_heads = query.shape[1], kv_cache.shape[-2]
    out = torch.empty(query.shape, dtype=torch.float64)
    for b, (table, n) in enumerate(zip(tables, lens)):
        slots = [table[p // block_size] * block_size + p % block_size for p in range(n)]
        flat = kv_cache.double().view(2, -1, num_kv_heads, kv_cache.shape[-1])
        k, v = flat[0][slots], flat[1][slots]  # [n, KVH, D]
        for h in range(num_heads):
            kh = h // (num_heads // num_kv_heads)
            p = (k[:, kh] @ query[b, h].double() * scale).softmax(0)
            out[b, h] = p @ v[:, kh]
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (8, 1)])
def test_decode_attention_ref_matches_naive(dtype, tol, num_heads, num_kv_heads) -> None:
    gen = torch.Generator().manual_seed(num_heads * 10 + num_kv_heads)
    block_size, head_dim, num_blocks = 16, 64, 40
    lens = [1, 16, 37, 90]  # one token, exactly one block, partial blocks, ragged
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in lens:
        k = -(-n // block_size) + (1 if n == 37 else 0)  # one table with a spare block past its end
        tables.append(perm[used : used + k])
        used += k
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    query = torch.randn(len(lens), num_heads, head_dim, generator=gen).to(dtype)
    block_tables, context_lens, slots, mask = build_decode_metadata(tables, lens, block_size)
    attn = AttentionMetadata(torch.zeros(len(lens), dtype=torch.long), [], 0, block_tables, context_lens,
                             slots, mask)
    out = decode_attention_ref(query, kv_cache, attn, head_dim**-0.5)
    ref = naive_decode(query, kv_cache, tables, lens, block_size, head_dim**-0.5)
    assert out.shape == query.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    # Without the slot table the context bound comes from the lengths: same result.
    attn.decode_slots = None
    assert torch.equal(decode_attention_ref(query, kv_cache, attn, head_dim**-0.5), out)
