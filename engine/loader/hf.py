"""Hugging Face directories: config.json -> ``ModelConfig``, safetensors (single or sharded with
``model.safetensors.index.json``) -> tensors in the compute dtype, tokenizer, generation_config.json."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from kvferry.engine.config import SUPPORTED_ARCHITECTURES, ConfigError, ModelConfig, RopeScaling
from kvferry.engine.loader import LoadedModel, build_model, checkpoint_shapes
from kvferry.engine.loader.digest import weights_digest
from kvferry.engine.tokenizer import Tokenizer

MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers some old checkpoints saved


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read JSON: {e}") from e


def _eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def config_from_hf(raw: dict[str, Any], path: str, eos_token_ids: list[int]) -> ModelConfig:
    """``raw``: config.json; ``path`` names it in errors. Refuses what the model code does not do."""
    model_type = str(raw.get("model_type"))
    arch = (raw.get("architectures") or [MODEL_TYPES.get(model_type, model_type)])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ConfigError(f"{path}: unsupported architecture {arch!r}; supported: {supported}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    if raw.get("mlp_bias") or (arch != "Qwen2ForCausalLM" and raw.get("attention_bias")):
        raise ConfigError(f"{path}: mlp_bias / attention_bias on o_proj is not supported")
    # transformers 5 writes rope_parameters (with rope_theta inside); older files rope_scaling + rope_theta.
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if any(k not in rope for k in keys):
            raise ConfigError(f"{path}: llama3 RoPE scaling needs {', '.join(keys)}")
        scaling = RopeScaling(*(float(rope[k]) for k in keys[:3]), int(rope[keys[3]]))
    elif rope_type != "default":
        raise ConfigError(f"{path}: RoPE type {rope_type!r} is not supported (default and llama3 are)")
    uses_window = arch == "MistralForCausalLM" or raw.get("use_sliding_window")
    sliding = raw.get("sliding_window") if uses_window else None
    try:
        num_heads = raw["num_attention_heads"]
        return ModelConfig(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM",
            rope_scaling=scaling,
            sliding_window=sliding,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(eos_token_ids or _eos_list(raw.get("eos_token_id"))),
            name=os.path.basename(os.path.normpath(path.removesuffix("config.json"))),
        )
    except KeyError as e:
        raise ConfigError(f"{path}: missing field {e.args[0]}") from e
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def _weight_files(path: str) -> list[str]:
    """The shards named by model.safetensors.index.json, or every *.safetensors file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{index}: no weight_map")
        return [os.path.join(path, f) for f in dict.fromkeys(weight_map.values())]
    found = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not found:
        raise ConfigError(f"{path}: no *.safetensors weights (other formats are not supported)")
    return found


def load_hf_weights(path: str, config: ModelConfig, dtype: torch.dtype) -> dict[str, Tensor]:
    from safetensors import safe_open

    shapes = checkpoint_shapes(config)
    tensors: dict[str, Tensor] = {}
    files = _weight_files(path)  # a progress bar on a terminal only (disable=None), one step per shard
    for file in tqdm(files, desc="loading weights", unit="file", disable=None if len(files) > 1 else True):
        if not os.path.isfile(file):
            raise ConfigError(f"{file}: listed in model.safetensors.index.json but missing")
        name = "<header>"
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    tied_head = name == "lm_head.weight" and config.tie_word_embeddings
                    if name.endswith(IGNORED_SUFFIXES) or tied_head:
                        continue
                    if name not in shapes:
                        raise ConfigError(
                            f"{file}: unexpected tensor {name} (config.json says {config.num_layers} layers, "
                            f"tie_word_embeddings={config.tie_word_embeddings})"
                        )
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != shapes[name]:
                        raise ConfigError(
                            f"{file}: tensor {name} has shape {list(shape)}, "
                            f"config.json implies {list(shapes[name])}"
                        )
                    tensors[name] = f.get_tensor(name).to(dtype)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - corrupt/truncated file: name it, not a deep traceback
            raise ConfigError(f"{file}: cannot read safetensors tensor {name}: {e}") from e
    missing = [n for n in shapes if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"{path}: checkpoint has no tensor {missing[0]}{more}")
    return tensors


def read_hf_config(path: str) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config and generation_config.json (EOS ids from the latter win, as in transformers)."""
    gen_path = os.path.join(path, "generation_config.json")
    generation_config = _read_json(gen_path) if os.path.isfile(gen_path) else {}
    raw = _read_json(os.path.join(path, "config.json"))
    eos = _eos_list(generation_config.get("eos_token_id")) or _eos_list(raw.get("eos_token_id"))
    return config_from_hf(raw, os.path.join(path, "config.json"), eos), generation_config


def load_hf(path: str, dtype: torch.dtype, device: str = "cpu") -> LoadedModel:
    config, generation_config = read_hf_config(path)
    model = build_model(config, load_hf_weights(path, config, dtype), dtype, device)
    # After loading, which names a missing or unreadable shard better than a failed hash would.
    config = dataclasses.replace(config, weights_digest=weights_digest(_weight_files(path)))
    tokenizer = Tokenizer.from_dir(path, config.eos_token_ids)
    generation_config["eos_token_id"] = list(tokenizer.eos_token_ids)
    return LoadedModel(model, config, tokenizer, generation_config)
