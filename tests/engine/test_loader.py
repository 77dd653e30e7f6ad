"""engine/loader: the default GGUF, Hugging Face directories (single and sharded), and every broken input
failing with a ConfigError that names the file (and tensor) instead of a deep traceback."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from kvferry.engine.config import ConfigError
from kvferry.engine.loader import load_model
from kvferry.engine.loader.gguf import read_gguf, unpermute_qk

# transformers' greedy output for this prompt on the default model (float32), recorded from
# AutoModelForCausalLM.from_pretrained(gguf_file=...).generate(do_sample=False).
CAPITAL_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
CAPITAL_REF_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]


@pytest.fixture(scope="module")
def default_loaded(default_model_file: str):
    torch.set_num_threads(1)
    return load_model(default_model_file, torch.float32)


def test_default_gguf_config_and_greedy_output(default_loaded, paged_runner) -> None:
    cfg = default_loaded.config
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (
        "LlamaForCausalLM", 30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    assert default_loaded.model.lm_head is None
    assert default_loaded.generation_config["eos_token_id"] == [2]
    tok = default_loaded.tokenizer
    ids = tok.encode(tok.apply_chat_template(CAPITAL_PROMPT))
    runner = paged_runner(default_loaded.model, len(ids) + len(CAPITAL_REF_IDS))
    logits = runner.prefill(ids)
    out: list[int] = []
    for _ in CAPITAL_REF_IDS:
        out.append(int(logits[-1].argmax()))
        logits = runner.decode(out[-1], len(ids) + len(out) - 1)
    assert out == CAPITAL_REF_IDS
    assert tok.decode(out, skip_special_tokens=True) == "The capital of France is Paris."


def test_load_bfloat16(make_hf_checkpoint) -> None:
    loaded = load_model(make_hf_checkpoint("qwen2"), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    assert loaded.model.rope.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_hf_generation_config_eos_list(make_hf_checkpoint) -> None:
    loaded = load_model(make_hf_checkpoint("llama3"), torch.float32)
    assert loaded.generation_config["eos_token_id"] == [2, 0]
    assert loaded.tokenizer.eos_token_ids == (2, 0)
    assert loaded.config.rope_scaling is not None and loaded.config.rope_scaling.factor == 8.0


@pytest.mark.parametrize("variant", ["llama3", "qwen2", "mistral"])
def test_gguf_equals_hf_directory(make_gguf, make_hf_checkpoint, paged_runner, variant: str) -> None:
    """The same weights as a llama.cpp-style GGUF (permuted q/k, rope_freqs, biases) and as a Hugging
    Face directory give the same config and the same logits."""
    from_gguf = load_model(make_gguf(variant), torch.float32)
    from_hf = load_model(make_hf_checkpoint(variant), torch.float32)
    fields = ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim", "rope_theta",
              "rope_scaling", "tie_word_embeddings", "attention_bias", "vocab_size")
    assert [getattr(from_gguf.config, f) for f in fields] == [getattr(from_hf.config, f) for f in fields]
    ids = list(range(1000, 1050))  # past original_max_position_embeddings=32 of the llama3 variant
    ours = paged_runner(from_gguf.model, 64).prefill(ids)
    assert torch.equal(ours, paged_runner(from_hf.model, 64).prefill(ids))


def test_unpermute_matches_transformers() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    ref = LlamaTensorProcessor()._reverse_permute_weights(w, 6, 3)  # k: 6 heads, 3 kv heads
    assert np.array_equal(unpermute_qk(torch.from_numpy(w), 3).numpy(), ref)


# --- errors -------------------------------------------------------------------------------------------


def test_missing_path(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(str(tmp_path / "nope"), torch.float32)


def test_directory_without_model(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config.json"):
        load_model(str(tmp_path), torch.float32)


@pytest.mark.parametrize("fraction", [0.001, 0.5])
def test_truncated_gguf(default_model_file: str, tmp_path, fraction: float) -> None:
    """Cut inside the header (metadata) or inside the tensor data."""
    size = os.path.getsize(default_model_file)
    bad = tmp_path / "cut.gguf"
    with open(default_model_file, "rb") as src, open(bad, "wb") as dst:
        dst.write(src.read(int(size * fraction)))
    with pytest.raises(ConfigError, match=r"cut\.gguf.*(truncated|corrupt)"):
        load_model(str(bad), torch.float32)


def test_not_a_gguf(tmp_path) -> None:
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ConfigError, match="junk.gguf: not a GGUF file"):
        load_model(str(bad), torch.float32)


def test_gguf_unknown_architecture(tmp_path) -> None:
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_gguf(str(path)).metadata["general.architecture"] == "gpt2"
    with pytest.raises(ConfigError, match="unsupported GGUF architecture 'gpt2'; supported: llama, qwen2"):
        load_model(str(path), torch.float32)


@pytest.fixture
def hf_copy(make_hf_checkpoint, tmp_path) -> str:
    dst = tmp_path / "ckpt"
    shutil.copytree(make_hf_checkpoint("llama3"), dst)
    return str(dst)


def _edit_config(path: str, **fields) -> None:
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(fields)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def test_unknown_architecture(hf_copy: str) -> None:
    _edit_config(hf_copy, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    expected = (r"config.json: unsupported architecture 'GPT2LMHeadModel'; "
                r"supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM")
    with pytest.raises(ConfigError, match=expected):
        load_model(hf_copy, torch.float32)


def test_shape_mismatch(hf_copy: str) -> None:
    _edit_config(hf_copy, intermediate_size=128)
    expected = r"model.safetensors: tensor model.layers.0.mlp.\w+_proj.weight has shape"
    with pytest.raises(ConfigError, match=expected):
        load_model(hf_copy, torch.float32)


def test_more_layers_in_checkpoint_than_config(hf_copy: str) -> None:
    _edit_config(hf_copy, num_hidden_layers=1)
    with pytest.raises(ConfigError, match="unexpected tensor model.layers.1"):
        load_model(hf_copy, torch.float32)


def test_missing_tensor(hf_copy: str) -> None:
    from safetensors.torch import load_file, save_file

    file = os.path.join(hf_copy, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="no tensor model.layers.1.self_attn.k_proj.weight"):
        load_model(hf_copy, torch.float32)


@pytest.mark.parametrize("damage", ["header", "truncate"])
def test_corrupt_safetensors(hf_copy: str, damage: str) -> None:
    file = os.path.join(hf_copy, "model.safetensors")
    data = open(file, "rb").read()
    data = data[:8] + b"\x00garbage" * 4 + data[40:] if damage == "header" else data[: len(data) // 2]
    with open(file, "wb") as f:
        f.write(data)
    with pytest.raises(ConfigError, match="model.safetensors: cannot read safetensors"):
        load_model(hf_copy, torch.float32)


def test_missing_shard(make_hf_checkpoint, tmp_path) -> None:
    dst = tmp_path / "sharded"
    shutil.copytree(make_hf_checkpoint("qwen2", "1MB"), dst)
    shards = sorted(f for f in os.listdir(dst) if f.endswith(".safetensors"))
    assert len(shards) > 1
    os.remove(dst / shards[-1])
    expected = f"{shards[-1]}: listed in model.safetensors.index.json but missing"
    with pytest.raises(ConfigError, match=expected):
        load_model(str(dst), torch.float32)


def test_unsupported_rope_type(hf_copy: str) -> None:
    _edit_config(hf_copy, rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None)
    with pytest.raises(ConfigError, match="RoPE type 'yarn' is not supported"):
        load_model(hf_copy, torch.float32)
