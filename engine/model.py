"""The Llama family in plain torch: Llama 2/3 (llama3 RoPE scaling), Mistral, Qwen2/2.5, SmolLM2.

One config-driven model in the style of gpt-fast. Every input is explicit: a flat batch of tokens, their
positions, one paged KV cache tensor per layer and the step's ``AttentionMetadata``. Paging and
scheduling stay outside; attention goes through ``kvferry.kernels.dispatch.paged_attention``.

Numerics follow transformers' Llama/Mistral/Qwen2 code (the reference in tests): RMSNorm in float32
then cast back before the weight multiply, RoPE cos/sin computed in float32 and cast to the model dtype,
rotate-half RoPE applied in the model dtype. q/k/v and gate/up are fused into one linear each; cos/sin
are gathered once per forward from a precomputed table and shared by every layer; the residual add is
fused into the next RMSNorm (``dispatch.rms_norm``). The decode step at batch 1 is Python-bound on CPU,
so each layer is kept to a handful of ops with no avoidable allocations. RMSNorm, RoPE (on CUDA) and
attention go through ``kvferry.kernels.dispatch`` (Triton on CUDA; the CPU kernels, else the torch
references, on the CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvferry.engine.config import ModelConfig, RopeScaling
from kvferry.engine import kv_memory
from kvferry.engine.cpu_decode_path import CpuDecodePath
from kvferry.kernels import cpu_features, cpu_kernels, dispatch, quant
from kvferry.kernels.attention import AttentionMetadata
from kvferry.kernels.quant import QuantWeight


def rotary_in_place(t: Tensor) -> bool:
    """Whether RoPE runs as the in-place kernel (``dispatch.rotary``, Triton on CUDA). On the CPU one
    fused torch expression over q and k together takes fewer ops than the kernel's reference."""
    return t.is_cuda


def _can_pack(weight: Tensor) -> bool:
    """oneDNN-prepacked bf16 weights on the CPU (see ``Linear``), where oneDNN runs bf16 natively: its
    weight reorder fails on CPUs without AVX512BW/VL/DQ or AVX-NE-CONVERT, where ``F.linear`` runs instead."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and cpu_features.has_native_bf16()
    )


class Linear(nn.Linear):
    """``nn.Linear`` that can run on the CPU through faster paths than ``F.linear`` (``pack()``).

    A bf16 ``F.linear`` on the CPU reaches oneDNN's matmul, which lays the weight out anew on every
    call: at batch 1 that costs as much as the product itself. ``pack()`` keeps a copy prepacked in
    oneDNN's layout (same kernel, bit-identical results, about 2x faster at one token, never slower at
    many) for prefill and large batches where oneDNN runs bf16 natively, and, wherever a CPU kernel
    extension is built (AVX-512 or AVX2), sends 1-8 tokens to our skinny kernel
    (``kernels/cpu_kernels.py``), which streams ``weight`` itself at close to memory bandwidth: bf16
    weights, and fp32 ones where that beats MKL (``cpu_kernels.takes_skinny``). Only decode steps take
    it (``decode_only``): the kernels round differently, and a prompt's numerics must not depend on how
    many of its tokens one step computes (a prefix-cache hit or a chunk boundary can leave a few).
    ``weight`` stays the parameter (state dicts, loaders, tests read it); the packed copy is a derived,
    non-persistent buffer. fp32 prompts stay on ``F.linear`` (MKL), what transformers runs.
    """

    packed: Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("packed", None, persistent=False)
        self.skinny = False
        self.bias_fp32: Tensor | None = None
        self.next_weight: Tensor | None = None  # the weight read after this one (see pack_weights)

    def pack(self) -> None:
        self.packed = pack_weight(self.weight) if _can_pack(self.weight) else None
        self.skinny = cpu_kernels.takes_skinny(self.weight)
        self.bias_fp32 = self.bias.detach().float() if self.skinny and self.bias is not None else None

    def forward(self, x: Tensor, decode_only: bool = True) -> Tensor:  # decode_only: no prompt tokens in x
        if self.skinny and decode_only and x.numel() <= cpu_kernels.MAX_TOKENS * x.shape[-1]:
            return cpu_kernels.skinny_linear(x, self.weight, self.bias_fp32, self.next_weight)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


# Decode batches of at least this many rows multiply by the bf16 copy where one is kept prepacked for
# oneDNN: the quant kernels are compute-bound from a few rows on (~24 G weight-rows/s a core at 8-64
# rows, AVX-512 VNNI), oneDNN's native bf16 GEMM is faster from here on (a 16-row step of the default
# model: 48 ms on the kernels, 39 ms dense; AMD EPYC Zen 4, 2 threads). Such rows then round like a
# prompt's. An fp32 copy (MKL) was slower than the AVX2 kernels at 64 rows, so fp32 keeps the kernels.
DENSE_DECODE_MIN_TOKENS = 16
# Where oneDNN multiplies bf16 on AMX tiles the dense copy catches up sooner: a decode step of the default
# model on one thread at ~300 tokens of context took 41 ms either way at 8 rows, and 46 ms dense
# against 59 ms on the kernels at 12 (Xeon with AMX-BF16).
DENSE_DECODE_MIN_TOKENS_AMX = 8


def dense_decode_min_tokens() -> int:
    """The decode batch from which the prepacked bf16 copy beats the quant kernels on this CPU."""
    return DENSE_DECODE_MIN_TOKENS_AMX if cpu_features.has_amx_bf16() else DENSE_DECODE_MIN_TOKENS


# Where the CPU has AMX-BF16, bf16 decode batches from this many rows multiply on AMX tiles, each weight
# block dequantized in L1 (kernels/csrc/quant_amx.cpp): the quantized bytes are what is read, and the
# tiles do the products. The 121 linears of the default model, 2 threads, Xeon with AMX: 4 rows 7.6 ms
# on the VNNI kernel against 8.4 on AMX, 5 rows 9.4 against 8.3, 64 rows 93 against 14 (and 22 on the
# dense bf16 copy, which reads 2 bytes a weight). Fewer rows keep the VNNI kernel, which streams the
# weight once for all of them with less work per weight.
AMX_DECODE_MIN_TOKENS = 5


def amx_decode_kernel(module, dtype: torch.dtype):
    """The quant extension's AMX product where decode batches in ``dtype`` can take it, else None."""
    if (dtype != torch.bfloat16 or module is None or not hasattr(module, "quant_linear_amx")
            or not cpu_features.has_amx_bf16() or not module.quant_amx_available()):
        return None
    return module.quant_linear_amx


class QuantLinear(nn.Module):
    """A linear whose weight stays in GGUF blocks (``QuantWeight``; ``kernels/quant.py``).

    Decode steps (``decode_only``: no prompt tokens in x; up to ``quant.MAX_TOKENS``, or, where a dense
    copy is kept and there is no AMX kernel, fewer than ``dense_decode_min_tokens()``) take the quantized
    kernel: it streams the quantized bytes, and, since it rounds each token's activations to Q8 blocks on
    their own (llama.cpp's numerics), a token's result does not depend on its batch among such steps.
    Where the CPU has AMX-BF16, bf16 batches from ``AMX_DECODE_MIN_TOKENS`` rows take the AMX kernel
    instead (the dense copy's bf16 values, float32 sums along K in a fixed order: also independent of
    the batch). Prompt tokens
    are compute-bound: they multiply the weight dequantized to x's dtype (exactly gguf's values) through
    ``F.linear`` (oneDNN/MKL), as ``--weights dequantized`` does, so a prompt's numbers do not depend on
    how it was chunked. That dequantized weight is a copy kept from ``pack(dense_dtype)`` (prepacked for
    oneDNN where it runs bf16 natively: the same values and kernel as ``Linear``), or, without one, is
    dequantized on every call into the model's shared buffer (the least memory, but every prompt step
    pays for dequantizing every weight). (Rounding prompt activations too would not make a token
    compute alike in a prompt and as a decode step: a perturbation of one ulp tips some Q8 roundings,
    and those grow from layer to layer to the size of the rounding itself.) Without the built kernels every call takes the
    reference (dequantize, then ``F.linear``).
    """

    def __init__(self, weight: QuantWeight, bias: bool = False, buffer: quant.DequantBuffer | None = None) -> None:
        super().__init__()
        self.qweight = weight
        self.buffer = buffer  # where prompt-sized products dequantize the weight (shared by a model's linears)
        self.in_features, self.out_features = weight.in_features, weight.out_features
        # A placeholder until the loader assigns it (load_state_dict(assign=True)), as nn.Linear's.
        self.bias = nn.Parameter(torch.empty(self.out_features, device="meta")) if bias else None
        self.kernel = False
        self.decode: Callable[[Tensor], Tensor] | None = None  # the kernel call for a decode batch, set by pack()
        self.dense: Tensor | None = None  # [out, in] dequantized copy for prompt-sized products
        self.dense_packed: Tensor | None = None  # the same, prepacked for oneDNN (bf16)
        self.kernel_max_tokens = quant.MAX_TOKENS  # decode batches up to this many rows take the kernel

    def pack(self, dense_dtype: torch.dtype | None = None, decode_dtype: torch.dtype | None = None) -> None:
        """Ready the kernel call; ``dense_dtype``: also keep the weight dequantized to it for prompts;
        ``decode_dtype``: the activations' dtype, which picks the AMX kernel for bf16 where there is one."""
        module = quant.load()
        self.kernel = module is not None
        bias = self.bias.detach().float() if self.bias is not None else torch.empty(0)
        self.dense = self.dense_packed = None
        if dense_dtype is not None:
            dense = quant.dequantize(self.qweight, dense_dtype)
            if _can_pack(dense):
                self.dense_packed = pack_weight(dense)  # holds its own copy: the plain one can go
            else:
                self.dense = dense
        self.kernel_max_tokens = quant.MAX_TOKENS
        amx = amx_decode_kernel(module, decode_dtype or dense_dtype)
        if amx is None and self.dense_packed is not None:
            self.kernel_max_tokens = min(quant.MAX_TOKENS, dense_decode_min_tokens() - 1)
        self.decode = None
        if module is not None:
            fn, datas, qtypes = module.quant_linear, self.qweight.datas, self.qweight.qtypes
            if amx is None:
                self.decode = lambda x: fn(x, datas, qtypes, bias)
            else:
                def decode(x: Tensor) -> Tensor:
                    wide = x.shape[0] >= AMX_DECODE_MIN_TOKENS and x.dtype == torch.bfloat16
                    return (amx if wide else fn)(x, datas, qtypes, bias)

                self.decode = decode

    def dense_bytes(self, dtype: torch.dtype) -> int:
        """Memory a dense copy in ``dtype`` takes."""
        return self.out_features * self.in_features * dtype.itemsize

    def forward(self, x: Tensor, decode_only: bool = True) -> Tensor:
        if (self.kernel and decode_only and x.dim() == 2 and x.shape[0] <= self.kernel_max_tokens
                and x.is_contiguous()):
            return self.decode(x)
        if self.dense_packed is not None and x.dtype == torch.bfloat16:
            return torch.ops.mkldnn._linear_pointwise(x, self.dense_packed, self.bias, "none", [], "")
        if self.dense is not None and x.dtype == self.dense.dtype:
            return F.linear(x, self.dense, self.bias)
        return F.linear(x, quant.dequantize(self.qweight, x.dtype, self.buffer), self.bias)


class QuantEmbedding(nn.Module):
    """An embedding table kept in GGUF blocks: a lookup dequantizes the rows it gathers to ``dtype``."""

    def __init__(self, weight: QuantWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.qweight = weight
        self.dtype = dtype  # the model's: no float parameter here for .to() to cast

    def forward(self, input_ids: Tensor) -> Tensor:  # [...] -> [..., hidden]
        (qtype, _), = self.qweight.segments
        rows = self.qweight.rows(input_ids.reshape(-1))
        out = quant.dequantize_rows(qtype, rows, self.qweight.in_features, self.dtype)
        return out.view(*input_ids.shape, self.qweight.in_features)


def use_quantized_weights(model: LlamaForCausalLM, weights: dict[str, QuantWeight], dtype: torch.dtype) -> None:
    """Swap the modules whose weights (by parameter name: ``layers.0.mlp.down_proj.weight``) stay
    quantized for ``QuantLinear`` / ``QuantEmbedding``. A tied, quantized embedding also becomes the
    lm_head (one copy of its blocks serves both)."""
    buffer = quant.DequantBuffer()
    for name, weight in weights.items():
        path = name.removesuffix(".weight")
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if isinstance(old, nn.Embedding):
            setattr(parent, child, QuantEmbedding(weight, dtype))
        else:
            setattr(parent, child, QuantLinear(weight, bias=old.bias is not None, buffer=buffer))
    if "embed_tokens.weight" in weights and model.lm_head is None:
        # No buffer: more rows than a decode step's logits are rare, and the table's 28M values would stay.
        model.lm_head = QuantLinear(weights["embed_tokens.weight"])


def dense_copy_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """What dequantized copies of the model's quantized linears would take in ``dtype`` (0: none)."""
    return sum(m.dense_bytes(dtype) for m in model.modules() if isinstance(m, QuantLinear))


def pack_weight(weight: Tensor) -> Tensor:  # [out, in] bf16 -> opaque oneDNN tensor
    # The batch-size hint picks the blocked layout; 1 (decode) is never slower at prefill sizes either.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


class RMSNorm(nn.Module):
    """Adds the residual first when given one: ``(norm(x + residual), x + residual)``. Numerics as
    transformers' LlamaRMSNorm (float32, cast back, then the weight in the model dtype): see
    ``kernels/rms_norm.py``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return dispatch.rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> Tensor:  # [head_dim // 2]
    """Inverse frequencies exactly as transformers computes them (default and ``llama3`` types)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_len = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_table(config: ModelConfig) -> Tensor:  # [max_position_embeddings, head_dim] float32
    """``cos`` of each position's frequencies in the first half of a row, ``sin`` in the second; built
    on the CPU even under a meta-device context."""
    inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32, device="cpu")
    freqs = positions[:, None] * inv_freq[None, :]  # [max_pos, head_dim // 2], as transformers' product
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.qk_size = config.q_size + config.kv_size
        self.scale = config.head_dim**-0.5
        self.qkv_proj = Linear(
            config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.attention_bias
        )
        self.o_proj = Linear(config.q_size, config.hidden_size, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: Tensor, attn: AttentionMetadata
    ) -> Tensor:  # x: [T, hidden]; cos, sin: [T, 1, D]
        num_tokens, num_heads, head_dim = x.shape[0], self.num_heads, self.head_dim
        decode_only = attn.num_prefill_tokens == 0
        qkv = self.qkv_proj(x, decode_only)  # [T, (H + 2 * KVH) * D]
        # Decode on the CPU kernels: two calls (they take the full-width cos/sin of the fused expression).
        if not rotary_in_place(qkv) and dispatch.fused_cpu_decode(qkv, attn, head_dim):
            out = dispatch.decode_attention_cpu(
                qkv, cos, sin, kv_cache, attn, num_heads, self.num_kv_heads, self.scale
            )
            return self.o_proj(out.view(num_tokens, -1), decode_only)
        if rotary_in_place(qkv):  # cos, sin: [T, D / 2]
            q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
            k = qkv[:, num_heads * head_dim : self.qk_size].view(num_tokens, self.num_kv_heads, head_dim)
            dispatch.rotary(q, k, cos, sin)
        else:  # cos, sin: [T, 1, D]; rotate_half(x) * sin == roll(x, D / 2) * sin_signed
            qk = qkv[:, : self.qk_size].view(num_tokens, num_heads + self.num_kv_heads, head_dim)
            qk = qk * cos + qk.roll(head_dim // 2, dims=-1) * sin  # [T, H + KVH, D], q and k at once
            q, k = qk[:, :num_heads], qk[:, num_heads:]
        v = qkv[:, self.qk_size :].view(num_tokens, self.num_kv_heads, head_dim)
        out = dispatch.paged_attention(q, k, v, kv_cache, attn, self.scale)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, -1), decode_only)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor, decode_only: bool = True) -> Tensor:
        return self.down_proj(dispatch.silu_mul(self.gate_up_proj(x, decode_only)), decode_only)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,  # [T, hidden]: the previous layer's output (MLP), not yet added to the residual
        residual: Tensor | None,  # [T, hidden]: the residual stream before x; None at layer 0
        cos: Tensor,
        sin: Tensor,
        kv_cache: Tensor,
        attn: AttentionMetadata,
    ) -> tuple[Tensor, Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, kv_cache, attn)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h, attn.num_prefill_tokens == 0), residual


class LlamaForCausalLM(nn.Module):
    """Parameter names: ``embed_tokens``, ``layers.N.{input_layernorm, self_attn.{qkv_proj, o_proj},
    post_attention_layernorm, mlp.{gate_up_proj, down_proj}}``, ``norm``, ``lm_head`` (absent if tied)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # An explicit (uniform) weight skips nn.Embedding's normal_ init, which on the meta device (the
        # loader's) imports torch._dynamo: a second of load time.
        embed = torch.empty(config.vocab_size, config.hidden_size).uniform_(-1.0, 1.0)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=embed)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.register_buffer("packed_lm_head", None, persistent=False)  # see pack_weights
        self.skinny_lm_head = False
        self.cpu_decode: CpuDecodePath | None = None  # set by pack_weights where the kernels take decode
        # Real even under a meta-device context (the loader builds the model on meta); cast to the model
        # dtype by ``.to(dtype)``, as transformers casts its float32 cos/sin to the input dtype.
        self.register_buffer("rope", rope_table(config), persistent=False)

    def forward(
        self,
        input_ids: Tensor,  # [num_tokens] int64
        positions: Tensor,  # [num_tokens] int64
        kv_caches: list[Tensor],  # per layer [2, num_blocks, block_size, num_kv_heads, head_dim]
        attn: AttentionMetadata,
        layer_hook: Callable[[int], None] | None = None,  # called after layer i stored its K/V
    ) -> Tensor:  # [num_tokens, hidden_size]
        half = self.config.head_dim // 2
        cos_sin = self.rope[positions]  # [T, D]: cos | sin of the half frequencies
        cos, sin = cos_sin[:, :half], cos_sin[:, half:]  # [T, D / 2], as the rotary kernel takes them
        if not rotary_in_place(cos_sin):
            cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)  # [T, 1, D]
            sin = torch.cat((-sin, sin), dim=-1).unsqueeze(1)  # [T, 1, D], sign of rotate_half folded in
        x, residual = self.embed_tokens(input_ids), None
        if layer_hook is None and self.cpu_decode is not None and self.cpu_decode.applies(x, attn):
            return self.cpu_decode.run(x, cos, sin, kv_caches, attn)  # the same kernels, without the modules
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            x, residual = layer(x, residual, cos, sin, kv_cache, attn)
            if layer_hook is not None:
                layer_hook(i)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: Tensor) -> Tensor:  # [n, hidden] -> [n, vocab] float32
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        if self.skinny_lm_head and hidden.shape[0] <= cpu_kernels.MAX_TOKENS:  # tied: as in Linear
            return cpu_kernels.skinny_linear(hidden, self.embed_tokens.weight, None).float()
        if self.packed_lm_head is not None:
            logits = torch.ops.mkldnn._linear_pointwise(hidden, self.packed_lm_head, None, "none", [], "")
            return logits.float()
        return F.linear(hidden, self.embed_tokens.weight).float()

    def pack_weights(self, dense_prompt_dtype: torch.dtype | None = None) -> None:
        """Prepack every linear weight (and the tied lm_head) for oneDNN where that pays (bf16 on the
        CPU; see ``Linear``), and ready the quantized linears (``QuantLinear``; ``dense_prompt_dtype``:
        with a dequantized copy for prompts). Call again after changing the weights or device."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()
            elif isinstance(module, QuantLinear):
                module.pack(dense_prompt_dtype, decode_dtype=self.norm.weight.dtype)
        head_module = self.embed_tokens if self.lm_head is None else self.lm_head
        head = head_module.weight if isinstance(head_module, (nn.Embedding, Linear)) else None
        self.packed_lm_head = pack_weight(head) if self.lm_head is None and _can_pack(head) else None
        self.skinny_lm_head = self.lm_head is None and head is not None and cpu_kernels.takes_skinny(head)
        # Each skinny linear prefetches the start of the weight read after it, in decode order.
        order = [m for layer in self.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                      layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        following = [m.weight if isinstance(m, Linear) else None for m in order[1:]] + [head]
        for module, weight in zip(order, following, strict=True):
            if isinstance(module, Linear):
                module.next_weight = weight.detach() if module.skinny and weight is not None else None
        self.cpu_decode = CpuDecodePath.build(self)


def allocate_kv_caches(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
) -> list[Tensor]:
    """One zeroed ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` tensor per layer. On the CPU
    under Linux they live in one memfd (``engine/kv_memory.py``), which a decode worker on the same
    host can map read-only and copy blocks out of (the shm plane's one copy); elsewhere plain zeros."""
    shape = (2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
    if torch.device(device).type == "cpu" and kv_memory.memfd_supported():
        return kv_memory.shared_zeros([shape] * config.num_layers, dtype)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
