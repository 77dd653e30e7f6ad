"""Small GGUF files for the loader and model tests, written as llama.cpp's converter lays them out: the
header from a Hugging Face style config, the default model's tokenizer metadata, then the tensors."""

from __future__ import annotations


def open_gguf(path: str, arch: str, name: str, cfg: dict, metadata: dict):
    """A ``gguf.GGUFWriter`` with the hyperparameters of ``cfg`` (config.json's names) and every
    ``tokenizer.*`` entry of ``metadata`` (as ``read_gguf`` returns it) written; add tensors, then
    ``close_gguf``."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(float((cfg.get("rope_parameters") or {}).get("rope_theta") or cfg["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    for key, value in metadata.items():
        if key.startswith("tokenizer."):
            _add_value(w, key, value)
    return w


def _add_value(w, key: str, value) -> None:
    if isinstance(value, list):
        w.add_array(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, bool):  # before int: a bool is an int to isinstance
        w.add_bool(key, value)
    else:
        w.add_uint32(key, value)


def close_gguf(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
