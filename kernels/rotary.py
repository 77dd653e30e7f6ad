"""Rotary position embedding, neox / Llama half-rotation style, in place on q and k (Triton),
beside its torch reference.

``x[..., :half]`` and ``x[..., half:]`` are the two halves rotated together, as Hugging Face
``rotate_half`` does. ``cos``/``sin`` are per token: ``[num_tokens, head_dim]`` as HF builds them
(``cat(freqs, freqs)``) or ``[num_tokens, head_dim // 2]``. Numerics follow HF: cos/sin cast to the
activation dtype, each product and the sum rounded to it.
"""

from __future__ import annotations

import torch

from kvferry.kernels._triton import tl, triton

__all__ = ["rotary", "rotary_ref"]


def _full_width(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    return t if t.shape[-1] == head_dim else torch.cat([t, t], dim=-1)


def rotary_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], modified in place
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], modified in place
    cos: torch.Tensor,  # [num_tokens, head_dim] or [num_tokens, head_dim // 2]
    sin: torch.Tensor,
) -> None:
    head_dim = query.shape[-1]
    half = head_dim // 2
    cos = _full_width(cos, head_dim).to(query.dtype)[:, None, :]
    sin = _full_width(sin, head_dim).to(query.dtype)[:, None, :]
    for x in (query, key):
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        x.copy_(x * cos + rotated * sin)


@triton.jit
def _rotate_heads(
    x_ptr, stride_h, c1, s1, c2, s2, NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < NUM_HEADS) & (d < HALF)
    dtype = x_ptr.dtype.element_ty
    lo_ptr = x_ptr + h * stride_h + d
    x1 = tl.load(lo_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(lo_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    # Round each product and each sum to the activation dtype, as HF's (x * cos) + (rot * sin) does.
    o1 = ((x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)).to(dtype)
    tl.store(lo_ptr, o1, mask=mask)
    tl.store(lo_ptr + HALF, o2, mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_stride_t,
    q_stride_h,
    k_stride_t,
    k_stride_h,
    cos_stride_t,
    sin_stride_t,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    COS_HALF_WIDTH: tl.constexpr,  # cos/sin hold head_dim // 2 values per token, used for both halves
):
    # One program per token: every query and key head of it.
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALF_PAD)[None, :]
    dmask = d < HALF
    dtype = q_ptr.dtype.element_ty
    second = 0 if COS_HALF_WIDTH else HALF
    cos = cos_ptr + t * cos_stride_t + d
    sin = sin_ptr + t * sin_stride_t + d
    c1 = tl.load(cos, mask=dmask, other=0.0).to(dtype).to(tl.float32)
    s1 = tl.load(sin, mask=dmask, other=0.0).to(dtype).to(tl.float32)
    c2 = tl.load(cos + second, mask=dmask, other=0.0).to(dtype).to(tl.float32)
    s2 = tl.load(sin + second, mask=dmask, other=0.0).to(dtype).to(tl.float32)
    _rotate_heads(q_ptr + t * q_stride_t, q_stride_h, c1, s1, c2, s2, NUM_HEADS, Q_HEADS_PAD, HALF, HALF_PAD)
    _rotate_heads(
        k_ptr + t * k_stride_t, k_stride_h, c1, s1, c2, s2, NUM_KV_HEADS, K_HEADS_PAD, HALF, HALF_PAD
    )


def rotary(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], modified in place
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], modified in place
    cos: torch.Tensor,  # [num_tokens, head_dim] or [num_tokens, head_dim // 2]
    sin: torch.Tensor,
) -> None:
    assert query.dim() == 3 and key.dim() == 3, (query.shape, key.shape)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    assert key.shape == (num_tokens, num_kv_heads, head_dim), (query.shape, key.shape)
    assert head_dim % 2 == 0, head_dim
    assert cos.shape == sin.shape and cos.shape[0] == num_tokens, (cos.shape, sin.shape)
    assert cos.shape[1] in (head_dim, head_dim // 2), (cos.shape, head_dim)
    assert query.dtype == key.dtype, (query.dtype, key.dtype)
    assert query.stride(-1) == key.stride(-1) == cos.stride(-1) == sin.stride(-1) == 1
    assert query.device == key.device == cos.device == sin.device
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        query, key, cos, sin,
        *query.stride()[:2], *key.stride()[:2],  # (token, head)
        cos.stride(0), sin.stride(0),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        Q_HEADS_PAD=triton.next_power_of_2(num_heads),
        K_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
        COS_HALF_WIDTH=cos.shape[1] == half,
    )
