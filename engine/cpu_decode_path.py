"""The decode step on the CPU kernels as one flat loop over the layers.

A small model's batch-1 decode step is a few hundred kernel calls of microseconds each (SmolLM2-135M:
30 layers x 9), so the Python around them — nn.Module calls, the dispatch checks each op repeats,
attribute lookups — is a tenth of the step. For a decode-only batch that the CPU kernels take whole,
``CpuDecodePath.run`` calls exactly the kernels the modules would call, in the same order on the same
arguments, with everything decided once when the weights are packed: the output is bit for bit the
modules' (a test holds it to that). Anything else (prompt tokens, Triton, big batches on oneDNN, a
layer hook) takes the modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from kvferry.kernels import cpu_kernels, quant
from kvferry.kernels.attention import AttentionMetadata

if TYPE_CHECKING:
    from kvferry.engine.model import LlamaForCausalLM

_EMPTY = torch.empty(0)


def _decode_call(module) -> Callable[[Tensor], Tensor] | None:
    """The kernel call ``module(x, decode_only=True)`` makes for a small decode batch, bound once; None
    if it would not take a kernel."""
    from kvferry.engine.model import Linear, QuantLinear

    ext = cpu_kernels.load()
    if isinstance(module, QuantLinear) and module.kernel:
        return module.decode
    if isinstance(module, Linear) and module.skinny and ext is not None:
        bias = _EMPTY if module.bias_fp32 is None else module.bias_fp32
        following = _EMPTY if module.next_weight is None else module.next_weight
        skinny, weight = ext.skinny_linear, module.weight
        return lambda x: skinny(x, weight, bias, following)
    return None


class CpuDecodePath:
    def __init__(self, model: LlamaForCausalLM, ext, max_tokens: int) -> None:
        self.ext = ext
        self.max_tokens = max_tokens
        self.dtype = model.norm.weight.dtype
        first = model.layers[0].self_attn
        self.num_heads, self.num_kv_heads, self.scale = first.num_heads, first.num_kv_heads, first.scale
        self.eps = model.norm.eps
        self.norm_weight = model.norm.weight
        self.layers = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            calls = [_decode_call(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            self.layers.append((layer.input_layernorm.weight, layer.post_attention_layernorm.weight, *calls))

    @classmethod
    def build(cls, model: LlamaForCausalLM) -> CpuDecodePath | None:
        """The path for ``model`` as packed now, or None where its decode steps need the modules."""
        from kvferry.engine.model import QuantLinear, RMSNorm

        ext = cpu_kernels.load()
        weight = model.norm.weight
        if ext is None or weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            return None
        if model.config.head_dim % 16:
            return None
        # As many rows as every linear's kernel takes (a quantized one with a dense copy stops short of
        # where the copy is faster).
        limits = [m.kernel_max_tokens for m in model.modules() if isinstance(m, QuantLinear)]
        path = cls(model, ext, min([quant.MAX_TOKENS, cpu_kernels.MAX_TOKENS, *limits]))
        eps = {layer.input_layernorm.eps for layer in model.layers}
        eps |= {layer.post_attention_layernorm.eps for layer in model.layers}
        if eps != {path.eps} or any(call is None for layer in path.layers for call in layer[2:]):
            return None
        if any(n.weight.dtype != path.dtype for n in model.modules() if isinstance(n, RMSNorm)):
            return None
        return path

    def applies(self, x: Tensor, attn: AttentionMetadata) -> bool:
        return (not attn.prefills and x.dim() == 2 and x.shape[0] <= self.max_tokens and x.dtype == self.dtype
                and x.is_contiguous() and attn.block_tables is not None and attn.context_lens is not None)

    def run(self, x: Tensor, cos: Tensor, sin: Tensor, kv_caches: list[Tensor], attn: AttentionMetadata) -> Tensor:
        """The layers and the final norm for a decode batch (``applies``); cos, sin: [T, 1, D]."""
        ext, eps, num_tokens = self.ext, self.eps, x.shape[0]
        rms_norm, rope_store_kv, decode_attention, silu_mul = (
            ext.rms_norm, ext.rope_store_kv, ext.decode_attention, ext.silu_mul)
        slots, tables, lens, scale = attn.slot_mapping, attn.block_tables, attn.context_lens, self.scale
        heads, kv_heads = self.num_heads, self.num_kv_heads
        residual = None
        for (in_norm, post_norm, qkv_proj, o_proj, gate_up_proj, down_proj), kv_cache in zip(
            self.layers, kv_caches, strict=True
        ):
            h, residual = rms_norm(x, in_norm, eps, residual)
            q = rope_store_kv(qkv_proj(h), cos, sin, kv_cache, slots, heads, kv_heads)
            h = o_proj(decode_attention(q, kv_cache, tables, lens, scale).view(num_tokens, -1))
            h, residual = rms_norm(h, post_norm, eps, residual)
            x = down_proj(silu_mul(gate_up_proj(h)))
        return rms_norm(x, self.norm_weight, eps, residual)[0]
