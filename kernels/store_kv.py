"""Store new K/V into the paged cache through a slot mapping (Triton), beside its torch reference.

Token ``t``'s K/V go to slot ``slot_mapping[t]``: block ``slot // block_size``, offset
``slot % block_size`` of the layer's ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` cache.
"""

from __future__ import annotations

import torch

from kvferry.kernels._triton import tl, triton
from kvferry.kernels.attention import store_kv_ref

__all__ = ["store_kv", "store_kv_ref"]


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_mapping_ptr,
    key_stride_t,
    key_stride_h,
    value_stride_t,
    value_stride_h,
    cache_stride_kv,
    cache_stride_b,
    cache_stride_s,
    cache_stride_h,
    BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
):
    # One program per token: all its KV heads at once.
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + t)
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, DIM_PAD)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(key_ptr + t * key_stride_t + h * key_stride_h + d, mask=mask)
    v = tl.load(value_ptr + t * value_stride_t + h * value_stride_h + d, mask=mask)
    dst = cache_ptr + (slot // BLOCK_SIZE) * cache_stride_b + (slot % BLOCK_SIZE) * cache_stride_s
    dst = dst + h * cache_stride_h + d
    tl.store(dst, k, mask=mask)
    tl.store(dst + cache_stride_kv, v, mask=mask)


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, distinct slots
) -> None:
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_tokens = key.shape[0]
    assert kv_cache.dim() == 5 and kv_cache.shape[0] == 2, kv_cache.shape
    assert key.shape == value.shape == (num_tokens, num_kv_heads, head_dim), (key.shape, value.shape)
    assert key.dtype == value.dtype == kv_cache.dtype, (key.dtype, value.dtype, kv_cache.dtype)
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype == torch.int64
    assert key.stride(-1) == value.stride(-1) == kv_cache.stride(-1) == 1, "head_dim must be contiguous"
    assert key.device == value.device == kv_cache.device == slot_mapping.device
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping,
        *key.stride()[:2], *value.stride()[:2],  # (token, head)
        *kv_cache.stride()[:4],  # (kv, block, slot, head)
        BLOCK_SIZE=block_size,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        DIM_PAD=triton.next_power_of_2(head_dim),
    )
