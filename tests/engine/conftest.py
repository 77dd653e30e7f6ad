"""Fixtures: small random-weight Hugging Face checkpoints (Llama with llama3 RoPE, Qwen2, Mistral),
saved with transformers' ``save_pretrained`` and carrying the default model's tokenizer (built from its
GGUF metadata, saved as tokenizer.json + tokenizer_config.json with the chat template)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from kvferry.engine.model import LlamaForCausalLM, allocate_kv_caches
from kvferry.kernels.attention import AttentionMetadata, PrefillChunk, build_decode_metadata, context_slots

# Tiny shapes; the vocabulary is the real one so the saved tokenizer fits the embedding.
_COMMON = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
)
VARIANTS: dict[str, dict] = {
    # rope_scaling with a tiny original context, so all three llama3 frequency bands occur at head_dim 16.
    "llama3": dict(model_type="llama", tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32)),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, rope_theta=1000000.0),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, rope_theta=10000.0, sliding_window=4096),
}


@pytest.fixture(scope="session")
def default_model_file(model_path: str) -> str:
    """The default model (tests/conftest.py's ``model_path``) under this folder's name for it."""
    return model_path


@pytest.fixture(scope="session")
def gguf_hf_tokenizer(model_path: str):
    """transformers' own tokenizer for the default GGUF (the reference for tokenizer tests)."""
    from kvferry.engine.tokenizer import Tokenizer

    return Tokenizer.from_gguf(model_path).hf


@pytest.fixture(scope="session")
def make_hf_checkpoint(tmp_path_factory, gguf_hf_tokenizer) -> Callable[..., str]:
    """``make_hf_checkpoint(variant, max_shard_size=None) -> directory`` (cached per arguments)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    made: dict[tuple[str, str | None], str] = {}

    def make(variant: str, max_shard_size: str | None = None) -> str:
        key = (variant, max_shard_size)
        if key in made:
            return made[key]
        fields = dict(_COMMON, **VARIANTS[variant])
        config = AutoConfig.for_model(**fields)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # larger than the default init, and non-trivial norms and biases
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0.0, 0.2 if p.dim() == 1 else 0.1)
        path = str(tmp_path_factory.mktemp(f"hf_{variant}"))
        model.generation_config.eos_token_id = [2, 0]  # a list, as Llama 3 ships it
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(path, **kwargs)
        gguf_hf_tokenizer.save_pretrained(path)
        made[key] = path
        return path

    return make


@pytest.fixture(scope="session")
def paged_runner() -> type[PagedRunner]:
    return PagedRunner


class PagedRunner:
    """One request through prefill + decode on scattered cache blocks, as the engine would run it."""

    block_size = 4

    def __init__(self, model: LlamaForCausalLM, max_len: int, seed: int = 0) -> None:
        self.model = model
        num_blocks = (max_len + self.block_size - 1) // self.block_size
        dtype = model.norm.weight.dtype  # the model dtype (a quantized embedding has no float weight)
        self.kv_caches = allocate_kv_caches(model.config, 2 * num_blocks + 3, self.block_size, dtype, "cpu")
        gen = torch.Generator().manual_seed(seed)
        self.block_table = torch.randperm(2 * num_blocks + 3, generator=gen)[:num_blocks].tolist()
        self.slots = context_slots(self.block_table, max_len, self.block_size)

    def prefill(self, ids: list[int]) -> torch.Tensor:  # [T, vocab]
        n = len(ids)
        attn = AttentionMetadata(self.slots[:n], [PrefillChunk(0, n, n, None)], n, None, None, None, None)
        return self._run(ids, torch.arange(n), attn)

    def decode(self, token: int, position: int) -> torch.Tensor:  # [1, vocab]
        tables, lens, slots, mask = build_decode_metadata([self.block_table], [position + 1], self.block_size)
        attn = AttentionMetadata(self.slots[position : position + 1], [], 0, tables, lens, slots, mask)
        return self._run([token], torch.tensor([position]), attn)

    def _run(self, ids: list[int], positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids), positions, self.kv_caches, attn)
            return self.model.compute_logits(hidden)


def _permute_for_gguf(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py's ``LlamaModel.permute`` (the inverse of our un-permute)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="session")
def make_gguf(tmp_path_factory, make_hf_checkpoint, model_path: str) -> Callable[[str], str]:
    """``make_gguf(variant) -> .gguf path``: the variant's random checkpoint written as llama.cpp would
    (F32 tensors, q/k permuted for ``llama``, llama3 RoPE as ``rope_freqs.weight``) with the default
    model's tokenizer metadata."""
    import json

    from gguf_writing import close_gguf, open_gguf
    from safetensors.torch import load_file

    from kvferry.engine.loader.gguf import read_gguf
    from kvferry.engine.model import rope_inv_freq
    from kvferry.engine.config import RopeScaling

    metadata = read_gguf(model_path).metadata
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}

    def make(variant: str) -> str:
        src = make_hf_checkpoint(variant)
        with open(os.path.join(src, "config.json")) as f:
            cfg = json.load(f)
        arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}[cfg["model_type"]]
        path = str(tmp_path_factory.mktemp(f"gguf_{variant}") / f"{variant}.gguf")
        w = open_gguf(path, arch, "mistral tiny" if variant == "mistral" else f"{variant} tiny", cfg, metadata)
        heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        for name, t in load_file(os.path.join(src, "model.safetensors")).items():
            if name == "model.embed_tokens.weight":
                out = "token_embd.weight"
            elif name == "model.norm.weight":
                out = "output_norm.weight"
            elif name == "lm_head.weight":
                out = "output.weight"
            else:
                _, _, layer, rest = name.split(".", 3)
                module, suffix = rest.rsplit(".", 1)
                out = f"blk.{layer}.{names[module]}.{suffix}"
                if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                    t = _permute_for_gguf(t, heads if "q_proj" in module else kv_heads)
            w.add_tensor(out, t.float().numpy())
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type") == "llama3":
            head_dim = cfg["hidden_size"] // heads
            theta = float(rope.get("rope_theta") or cfg.get("rope_theta"))
            scaling = RopeScaling(rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                                  rope["original_max_position_embeddings"])
            factors = rope_inv_freq(head_dim, theta, None) / rope_inv_freq(head_dim, theta, scaling)
            w.add_tensor("rope_freqs.weight", factors.numpy())
        close_gguf(w)
        return path

    return make
