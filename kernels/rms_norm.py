"""RMSNorm fused with the residual add (Triton), beside its torch reference.

Numerics follow Hugging Face Llama: the residual sum is rounded to the activation dtype (as the
model's own ``residual + hidden`` would be), the norm is computed in float32 from that rounded sum,
cast back to the activation dtype, then multiplied by the weight in that dtype.
"""

from __future__ import annotations

import torch

from kvferry.kernels._triton import tl, triton

__all__ = ["rms_norm", "rms_norm_ref"]


def rms_norm_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden], same dtype as x
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed, new residual = x + residual, or x)
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


@triton.jit
def _rms_norm_kernel(
    out_ptr,
    residual_out_ptr,
    x_ptr,
    residual_ptr,
    weight_ptr,
    eps,
    x_stride,
    residual_stride,
    HIDDEN: tl.constexpr,
    HIDDEN_PAD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    # One program per token; the row stays in registers between the sum, the norm and the scale.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, HIDDEN_PAD)
    mask = cols < HIDDEN
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * residual_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(dtype).to(tl.float32)
        tl.store(residual_out_ptr + row * HIDDEN + cols, x.to(dtype), mask=mask)
    var = tl.sum(x * x, axis=0) / HIDDEN
    y = (x * tl.rsqrt(var + eps)).to(dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * HIDDEN + cols, (w * y).to(dtype), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden], same dtype as x
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed, new residual); both new contiguous tensors
    assert x.dim() == 2 and x.stride(-1) == 1, (x.shape, x.stride())
    num_tokens, hidden = x.shape
    assert weight.shape == (hidden,) and weight.is_contiguous(), weight.shape
    assert weight.dtype == x.dtype and weight.device == x.device, (weight.dtype, x.dtype)
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(-1) == 1, (residual.shape, residual.stride())
        assert residual.dtype == x.dtype and residual.device == x.device
        residual_out = torch.empty_like(out)
    else:
        residual_out = x
    if num_tokens == 0:
        return out, residual_out
    _rms_norm_kernel[(num_tokens,)](
        out,
        residual_out,
        x,
        x if residual is None else residual,
        weight,
        eps,
        x.stride(0),
        x.stride(0) if residual is None else residual.stride(0),
        HIDDEN=hidden,
        HIDDEN_PAD=triton.next_power_of_2(hidden),
        HAS_RESIDUAL=residual is not None,
    )
    return out, residual_out
