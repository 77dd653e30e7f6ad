"""Model loading: a Hugging Face directory (``hf.py``) or a GGUF file (``gguf.py``) -> ``LoadedModel``.

Both formats are read into one dict of tensors under Hugging Face names (``model.layers.0.self_attn.
q_proj.weight``), checked against the shapes the config implies, then fused (q/k/v -> ``qkv_proj``,
gate/up -> ``gate_up_proj``) and assigned to a model built on the meta device (no random init).
Every problem is a ``ConfigError`` naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kvferry.engine.config import ConfigError, ModelConfig
from kvferry.engine.model import LlamaForCausalLM, use_quantized_weights
from kvferry.kernels.quant import QuantWeight
from kvferry.engine.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    model: LlamaForCausalLM  # eval mode, on the device, in the dtype
    config: ModelConfig
    tokenizer: Tokenizer
    generation_config: dict[str, Any]  # at least "eos_token_id": list[int]


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """``("hf", directory)`` or ``("gguf", file)`` for a model path, or a ConfigError saying what is wrong."""
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise ConfigError(f"model path {path} does not exist")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf", path
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return "gguf", os.path.join(path, ggufs[0])
        raise ConfigError(
            f"{path}: a model directory needs config.json (Hugging Face format) or exactly one .gguf file"
            + (f"; found {len(ggufs)}: {', '.join(ggufs)}" if ggufs else "")
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF" or path.endswith(".gguf"):
        return "gguf", path
    raise ConfigError(f"{path}: not a GGUF file and not a directory with config.json")


def load_model(
    path: str, dtype: torch.dtype, device: str = "cpu", weights: str | None = "dequantized"
) -> LoadedModel:
    """Load a Hugging Face directory (config.json + safetensors) or a ``.gguf`` file. ``weights``:
    "dequantized" makes a GGUF's tensors ``dtype``, "quantized" keeps its quantized tensors in their
    blocks, None/"auto" picks (``gguf.resolve_weights``: what the engine asks for by default)."""
    from kvferry.engine.loader import gguf, hf

    kind, path = resolve_checkpoint(path)
    if kind == "hf":
        if weights == "quantized":
            raise ConfigError(f"{path}: --weights quantized needs a quantized GGUF file; this is a Hugging "
                              "Face checkpoint (use --weights dequantized or auto)")
        return hf.load_hf(path, dtype, device)
    return gguf.load_gguf(path, dtype, device, weights)


def load_config_and_tokenizer(path: str) -> tuple[ModelConfig, Tokenizer, str]:
    """Config, tokenizer and a display name, without reading the weights (what a router needs)."""
    from kvferry.engine.loader import gguf, hf

    kind, path = resolve_checkpoint(path)
    if kind == "hf":
        config, _ = hf.read_hf_config(path)
        return config, Tokenizer.from_dir(path, config.eos_token_ids), os.path.basename(os.path.normpath(path))
    config = gguf.config_from_gguf(gguf.read_gguf(path))
    return config, Tokenizer.from_gguf(path, config.eos_token_ids), os.path.basename(path).removesuffix(".gguf")


def checkpoint_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, under its Hugging Face name, with the shape the config implies."""
    h, inter = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        proj = {"q_proj": config.q_size, "k_proj": config.kv_size, "v_proj": config.kv_size}
        for name, rows in proj.items():
            shapes[f"{p}self_attn.{name}.weight"] = (rows, h)
            if config.attention_bias:
                shapes[f"{p}self_attn.{name}.bias"] = (rows,)
        shapes[f"{p}self_attn.o_proj.weight"] = (h, config.q_size)
        shapes[f"{p}mlp.gate_proj.weight"] = (inter, h)
        shapes[f"{p}mlp.up_proj.weight"] = (inter, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, inter)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    return shapes


def build_model(
    config: ModelConfig, tensors: dict[str, Tensor], dtype: torch.dtype, device: str
) -> LlamaForCausalLM:
    """Fuse checked Hugging Face tensors into our parameters and assign them to a fresh model.

    ``tensors`` must hold exactly ``checkpoint_shapes(config)`` (the format loaders check that, as they
    know file and tensor names); it is emptied as tensors are fused, to bound peak memory. A weight may
    be a ``QuantWeight`` (kept in GGUF blocks): its module becomes a quantized one.
    """
    cat = _cat
    state: dict[str, Tensor] = {
        "embed_tokens.weight": tensors.pop("model.embed_tokens.weight"),
        "norm.weight": tensors.pop("model.norm.weight"),
    }
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = tensors.pop("lm_head.weight")
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn = [f"{src}self_attn.{n}_proj" for n in "qkv"]
        state[f"{dst}self_attn.qkv_proj.weight"] = cat([tensors.pop(f"{a}.weight") for a in attn])
        if config.attention_bias:
            state[f"{dst}self_attn.qkv_proj.bias"] = torch.cat([tensors.pop(f"{a}.bias") for a in attn])
        state[f"{dst}self_attn.o_proj.weight"] = tensors.pop(f"{src}self_attn.o_proj.weight")
        state[f"{dst}mlp.gate_up_proj.weight"] = cat(
            [tensors.pop(f"{src}mlp.gate_proj.weight"), tensors.pop(f"{src}mlp.up_proj.weight")]
        )
        state[f"{dst}mlp.down_proj.weight"] = tensors.pop(f"{src}mlp.down_proj.weight")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{dst}{norm}.weight"] = tensors.pop(f"{src}{norm}.weight")
    quantized = {k: v for k, v in state.items() if isinstance(v, QuantWeight)}
    state = {k: v for k, v in state.items() if k not in quantized}
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    use_quantized_weights(model, quantized, dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _cat(parts: list) -> Tensor | QuantWeight:
    """Fuse row-wise: quantized parts stay quantized when all are; else every part is dequantized."""
    if all(isinstance(p, QuantWeight) for p in parts):
        return QuantWeight.cat(parts)
    from kvferry.kernels.quant import dequantize

    return torch.cat([dequantize(p) if isinstance(p, QuantWeight) else p for p in parts])
