"""GGUF files: metadata -> ``ModelConfig``, tensors kept quantized or dequantized to the compute dtype,
tokenizer.

The header is parsed here over an ``mmap`` (the ``gguf`` package's ``GGUFReader`` builds Python objects
for every vocabulary entry and takes seconds on a 49k-token vocabulary); tensors are dequantized by
``gguf.quants.dequantize`` (F32/F16/BF16/Q8_0/Q4_0/Q4_1/K-quants...). llama.cpp stores ``attn_q`` and
``attn_k`` of the ``llama`` architecture permuted for its RoPE layout; they are un-permuted exactly as
transformers' GGUF loader does. The tokenizer comes from the file's metadata through transformers'
GGUF tokenizer converter (see ``Tokenizer.from_gguf``).

With ``weights="quantized"`` (the default on the CPU where the quant kernels are built) every linear
weight and the embedding whose type ``kernels/quant.py`` supports (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K,
Q6_K) stays as the file's bytes (``QuantWeight``); q/k are un-permuted by moving whole rows, which is
exact as blocks run along a row. Anything else (norms, F16 or other quant types) is dequantized.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import struct
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from kvferry.engine.config import ConfigError, ModelConfig, RopeScaling
from kvferry.engine.loader import LoadedModel, build_model, checkpoint_shapes
from kvferry.engine.loader.digest import weights_digest
from kvferry.engine.tokenizer import Tokenizer
from kvferry.kernels import quant
from kvferry.kernels.quant import QuantWeight

WEIGHTS = ("quantized", "dequantized")
logger = logging.getLogger(__name__)

# general.architecture -> our architecture; a "llama" file named like Mistral is Mistral (as transformers).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
PERMUTED_ARCHITECTURES = ("llama",)  # convert_hf_to_gguf.py permutes q/k for these only

# Scalar metadata value types -> struct format; 8 is a string, 9 an array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
           12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF lists the fastest dimension first)
    ggml_type: int
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: str
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    buffer: mmap.mmap

    def read(self, name: str) -> Tensor:
        """Dequantized float32 tensor, in torch shape."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensors[name]
        try:
            qtype = GGMLQuantizationType(info.ggml_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
            raw = np.frombuffer(self.buffer, np.uint8, info.nbytes, info.offset)
            raw = raw.reshape(*info.shape[:-1], info.shape[-1] // block * type_size)
            out = dequantize(raw, qtype).reshape(info.shape)
        except (ValueError, KeyError, NotImplementedError) as e:
            raise ConfigError(
                f"{self.path}: cannot dequantize tensor {name} (ggml type {info.ggml_type}): {e}"
            ) from e
        if qtype == GGMLQuantizationType.F32:  # a read-only view of the mapping: copy it out
            out = out.copy()
        return torch.from_numpy(out).float()

    def read_quantized(self, name: str) -> QuantWeight | None:
        """The tensor's blocks as a ``QuantWeight`` (a copy out of the mapping), if its type stays quantized."""
        info = self.tensors[name]
        if info.ggml_type not in quant.QTYPES or len(info.shape) != 2:
            return None
        raw = np.frombuffer(self.buffer, np.uint8, info.nbytes, info.offset).reshape(info.shape[0], -1)
        return QuantWeight([(info.ggml_type, torch.from_numpy(raw.copy()))], info.shape[1])


def read_gguf(path: str) -> GGUFFile:
    """Parse the header (metadata + tensor table); tensor data stays in the mapping until ``read``."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise ConfigError(f"{path}: cannot read GGUF file: {e}")
    size = len(buf)
    try:
        if buf[:4] != b"GGUF":
            raise ConfigError(f"{path}: not a GGUF file (bad magic bytes)")
        version, num_tensors, num_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ConfigError(f"{path}: unsupported GGUF version {version} (need 2 or 3)")
        pos = 24

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", buf, pos)
            if pos + 8 + n > size:
                raise struct.error("string runs past the end of the file")
            pos += 8 + n
            return buf[pos - n : pos].decode("utf-8", errors="replace")

        def value(vtype: int) -> Any:
            nonlocal pos
            if vtype == 8:
                return string()
            if vtype == 9:
                (etype, n) = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if etype == 8:
                    return [string() for _ in range(n)]
                if etype in _NUMPY:
                    arr = np.frombuffer(buf, _NUMPY[etype], n, pos)
                    pos += arr.nbytes
                    return arr.tolist()
                return [value(etype) for _ in range(n)]
            (v,) = struct.unpack_from(_SCALAR[vtype], buf, pos)
            pos += struct.calcsize(_SCALAR[vtype])
            return v

        metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = string()
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            metadata[key] = value(vtype)
        table = []
        for _ in range(num_tensors):
            name = string()
            (ndim,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{ndim}Q", buf, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * ndim)
            pos += 4 + 8 * ndim + 12
            table.append((name, tuple(reversed(dims)), ggml_type, offset))
    except (struct.error, KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{path}: corrupt or truncated GGUF header: {e}")

    alignment = int(metadata.get("general.alignment", 32))
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, shape, ggml_type, offset in table:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise ConfigError(f"{path}: tensor {name} has unknown ggml type {ggml_type}")
        nbytes = prod(shape) // block * type_size
        start = data_start + offset
        if start + nbytes > size:
            raise ConfigError(
                f"{path}: truncated GGUF file: tensor {name} needs bytes {start}..{start + nbytes}, "
                f"the file has {size}"
            )
        tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)
    return GGUFFile(path, metadata, tensors, buf)


def config_from_gguf(gf: GGUFFile) -> ModelConfig:
    md, path = gf.metadata, gf.path
    arch = md.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    architecture = ARCHITECTURES[arch]
    if arch == "llama" and "mistral" in str(md.get("general.name", "")).lower():
        architecture = "MistralForCausalLM"

    def get(key: str, default: Any = None) -> Any:
        full = f"{arch}.{key}"
        if full not in md and default is None:
            raise ConfigError(f"{path}: GGUF metadata has no {full}")
        return md.get(full, default)

    if get("rope.scaling.type", "none") not in ("none", ""):
        raise ConfigError(f"{path}: RoPE scaling {get('rope.scaling.type')!r} is not supported")
    hidden, num_heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // num_heads)
    eos = [md[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                            "tokenizer.ggml.eom_token_id") if k in md]
    vocab = get("vocab_size", 0) or len(md.get("tokenizer.ggml.tokens", ()))
    fields = dict(
        architecture=architecture,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=num_heads,
        num_kv_heads=get("attention.head_count_kv", num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=get("context_length"),
        tie_word_embeddings="output.weight" not in gf.tensors,
        attention_bias="blk.0.attn_q.bias" in gf.tensors,
        rope_scaling=_llama3_scaling(gf, head_dim),
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        name=os.path.basename(path),
    )
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def _llama3_scaling(gf: GGUFFile, head_dim: int) -> RopeScaling | None:
    """llama.cpp stores Llama 3.1+ RoPE scaling as per-frequency factors (``rope_freqs.weight``), not as
    parameters; recover the standard parameters that produce them, or refuse the file."""
    if "rope_freqs.weight" not in gf.tensors:
        return None
    from kvferry.engine.model import rope_inv_freq

    factors = gf.read("rope_freqs.weight")
    theta = float(gf.metadata.get(f"{gf.metadata['general.architecture']}.rope.freq_base", 10000.0))
    base = rope_inv_freq(head_dim, theta, None)
    # The low-frequency factor is the largest; Llama 3.x use low/high_freq_factor 1/4 and 8192.
    factor = float(factors.max())
    for original in (8192, *(2**k for k in range(20, 4, -1))):
        scaling = RopeScaling(factor, 1.0, 4.0, original)
        if torch.allclose(base / rope_inv_freq(head_dim, theta, scaling), factors, rtol=1e-4):
            return scaling
    raise ConfigError(f"{gf.path}: rope_freqs.weight does not match any llama3 RoPE scaling")


def _hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> Hugging Face name (None for tensors we do not load)."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if gguf_name in top:
        return top[gguf_name]
    parts = gguf_name.split(".")  # blk.N.attn_q.weight
    if parts[0] != "blk" or len(parts) != 4:
        return None
    layer = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}.get(parts[2])
    return None if layer is None else f"model.layers.{parts[1]}.{layer}.{parts[3]}"


def unpermute_qk(w: Tensor, num_heads: int) -> Tensor:
    """Undo llama.cpp's RoPE permutation of q/k rows (transformers' ``_reverse_permute_weights``)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def resolve_weights(weights: str | None, device: str) -> str:
    """"quantized" or "dequantized" for a requested mode (None/"auto": quantized on the CPU where the
    quant kernels are built, else dequantized)."""
    if weights in (None, "auto"):
        return "quantized" if device == "cpu" and quant.available() else "dequantized"
    if weights not in WEIGHTS:
        raise ConfigError(f"unknown --weights {weights!r}; choose one of: auto, {', '.join(WEIGHTS)}")
    if weights == "quantized" and device != "cpu":
        raise ConfigError(f"--weights quantized runs on the CPU only (device {device}); use --weights dequantized")
    if weights == "quantized" and not quant.available():
        logger.warning("--weights quantized without the quant kernels (not built: python -m kvferry.kernels.build): "
                       "every product dequantizes its weight first (the reference path, slow)")
    return weights


_QUANTIZABLE = ("proj.weight", "embed_tokens.weight", "lm_head.weight")


def load_gguf_weights(
    gf: GGUFFile, config: ModelConfig, dtype: torch.dtype, quantized: bool = False
) -> dict[str, Tensor | QuantWeight]:
    shapes = checkpoint_shapes(config)
    names = {}
    for gguf_name in gf.tensors:
        hf_name = _hf_name(gguf_name)
        if hf_name is None or hf_name not in shapes:
            if gguf_name == "rope_freqs.weight":  # folded into config.rope_scaling
                continue
            raise ConfigError(
                f"{gf.path}: unexpected tensor {gguf_name} (the metadata says {config.num_layers} layers)"
            )
        names[hf_name] = gguf_name
    missing = [n for n in shapes if n not in names]
    if missing:
        raise ConfigError(f"{gf.path}: missing tensor for {missing[0]}" + (
            f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    permute = gf.metadata["general.architecture"] in PERMUTED_ARCHITECTURES
    tensors = {}
    # A progress bar on a terminal only (disable=None): logs and pipes get none.
    for hf_name, gguf_name in tqdm(names.items(), desc="loading weights", unit="tensor", disable=None, leave=False):
        shape = gf.tensors[gguf_name].shape
        if shape != shapes[hf_name]:
            raise ConfigError(
                f"{gf.path}: tensor {gguf_name} has shape {list(shape)}, the metadata implies "
                f"{list(shapes[hf_name])}"
            )
        w = gf.read_quantized(gguf_name) if quantized and hf_name.endswith(_QUANTIZABLE) else None
        if w is None:
            w = gf.read(gguf_name)
        if permute and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in hf_name else config.num_kv_heads
            if isinstance(w, QuantWeight):  # rows of blocks, permuted as rows of values
                (qtype, data), = w.segments
                w = QuantWeight([(qtype, unpermute_qk(data, heads).contiguous())], w.in_features)
            else:
                w = unpermute_qk(w, heads)
        tensors[hf_name] = w if isinstance(w, QuantWeight) else w.to(dtype)
    return tensors


def load_gguf(
    path: str, dtype: torch.dtype, device: str = "cpu", weights: str | None = "dequantized"
) -> LoadedModel:
    gf = read_gguf(path)
    config = dataclasses.replace(config_from_gguf(gf), weights_digest=weights_digest([path]))
    quantized = resolve_weights(weights, device) == "quantized"
    model = build_model(config, load_gguf_weights(gf, config, dtype, quantized), dtype, device)
    tokenizer = Tokenizer.from_gguf(path, config.eos_token_ids)
    generation_config = {"bos_token_id": config.bos_token_id, "eos_token_id": list(tokenizer.eos_token_ids)}
    return LoadedModel(model, config, tokenizer, generation_config)
