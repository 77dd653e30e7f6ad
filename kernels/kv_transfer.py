"""Gather a request's KV blocks into a contiguous transfer buffer, and scatter a buffer back.

This is what KV shipping moves: per layer, the blocks of one request, packed as
``[2, n, block_size, num_kv_heads, head_dim]`` (K then V) in the order of ``block_ids``.
The torch references run anywhere (the CPU transport path); the Triton kernels are the CUDA path.
"""

from __future__ import annotations

import torch

from kvferry.kernels._triton import tl, triton

__all__ = ["gather_kv_blocks", "gather_kv_blocks_ref", "scatter_kv_blocks", "scatter_kv_blocks_ref"]


def gather_kv_blocks_ref(
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int64
) -> torch.Tensor:  # [2, n, block_size, num_kv_heads, head_dim], contiguous, a copy
    return kv_cache_layer.index_select(1, block_ids.to(kv_cache_layer.device))


def scatter_kv_blocks_ref(
    buffer: torch.Tensor,  # [2, n, block_size, num_kv_heads, head_dim]
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int64, distinct
) -> None:
    kv_cache_layer.index_copy_(1, block_ids.to(kv_cache_layer.device), buffer.to(kv_cache_layer.dtype))


@triton.jit
def _copy_blocks_kernel(
    cache_ptr,
    buffer_ptr,
    block_ids_ptr,
    cache_stride_kv,
    cache_stride_b,
    buffer_stride_kv,
    buffer_stride_b,
    BLOCK_ELEMS: tl.constexpr,  # block_size * num_kv_heads * head_dim, contiguous in both
    CHUNK: tl.constexpr,
    TO_BUFFER: tl.constexpr,  # True: gather (cache -> buffer); False: scatter (buffer -> cache)
):
    i = tl.program_id(0).to(tl.int64)  # position in block_ids
    kv = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < BLOCK_ELEMS
    block = tl.load(block_ids_ptr + i)
    cache = cache_ptr + kv * cache_stride_kv + block * cache_stride_b + offs
    buffer = buffer_ptr + kv * buffer_stride_kv + i * buffer_stride_b + offs
    if TO_BUFFER:
        tl.store(buffer, tl.load(cache, mask=mask), mask=mask)
    else:
        tl.store(cache, tl.load(buffer, mask=mask), mask=mask)


def _check_cache_and_ids(kv_cache_layer: torch.Tensor, block_ids: torch.Tensor) -> None:
    assert kv_cache_layer.dim() == 5 and kv_cache_layer.shape[0] == 2, kv_cache_layer.shape
    assert kv_cache_layer[0, 0].is_contiguous(), "each cache block must be contiguous"
    assert block_ids.dim() == 1 and block_ids.dtype == torch.int64, (block_ids.shape, block_ids.dtype)
    assert block_ids.device == kv_cache_layer.device, (block_ids.device, kv_cache_layer.device)


def _launch(
    kv_cache_layer: torch.Tensor, buffer: torch.Tensor, block_ids: torch.Tensor, to_buffer: bool
) -> None:
    n = block_ids.shape[0]
    if n == 0:
        return
    block_elems = kv_cache_layer[0, 0].numel()
    chunk = min(triton.next_power_of_2(block_elems), 4096)
    grid = (n, 2, triton.cdiv(block_elems, chunk))
    _copy_blocks_kernel[grid](
        kv_cache_layer, buffer, block_ids,
        *kv_cache_layer.stride()[:2], *buffer.stride()[:2],  # (kv, block) of each
        BLOCK_ELEMS=block_elems,
        CHUNK=chunk,
        TO_BUFFER=to_buffer,
    )


def gather_kv_blocks(
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int64, on the cache's device
) -> torch.Tensor:  # [2, n, block_size, num_kv_heads, head_dim], contiguous
    _check_cache_and_ids(kv_cache_layer, block_ids)
    _, _, block_size, num_kv_heads, head_dim = kv_cache_layer.shape
    buffer = kv_cache_layer.new_empty(2, block_ids.shape[0], block_size, num_kv_heads, head_dim)
    _launch(kv_cache_layer, buffer, block_ids, to_buffer=True)
    return buffer


def scatter_kv_blocks(
    buffer: torch.Tensor,  # [2, n, block_size, num_kv_heads, head_dim], contiguous
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int64, distinct (duplicates race), on the cache's device
) -> None:
    _check_cache_and_ids(kv_cache_layer, block_ids)
    expected = (2, block_ids.shape[0], *kv_cache_layer.shape[2:])
    assert buffer.shape == expected, (buffer.shape, expected)
    assert buffer.dtype == kv_cache_layer.dtype, (buffer.dtype, kv_cache_layer.dtype)
    assert buffer.is_contiguous() and buffer.device == kv_cache_layer.device
    _launch(kv_cache_layer, buffer, block_ids, to_buffer=False)
