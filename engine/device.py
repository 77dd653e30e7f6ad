"""The torch device an engine runs on, and the KV cache bytes a CUDA device can give it.

``--device auto|cpu|cuda|cuda:N`` on every command that computes: auto is CUDA when torch sees a CUDA
device, else the CPU. A CUDA device asked for where there is none is a ``ConfigError`` that says why
(a CPU-only torch build, or no visible device), never a traceback from deep inside torch.

``--gpu-memory-utilization`` keeps vLLM's meaning: the fraction of the device's total memory this engine
may use in all (weights, activations, KV cache); the KV cache gets what the weights and activations
leave of it. Other processes on the device are not counted against the fraction, but the cache must
fit in the memory that is free now.
"""

from __future__ import annotations

import argparse

import torch

from kvferry.engine.config import CUDA_DEVICE, ConfigError, ModelConfig

DEFAULT_KV_CACHE_BYTES = 512 * 1024 * 1024


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and the KV cache's size, for every command that runs an engine (or passes them on)."""
    parser.add_argument("--device", default="auto",
                        help="torch device: auto (CUDA when torch sees a CUDA device, else cpu), cpu, cuda or "
                             "cuda:N (default auto)")
    parser.add_argument("--kv-cache-bytes", type=int, default=None,
                        help=f"KV cache size in bytes (default {DEFAULT_KV_CACHE_BYTES // 2**20} MiB); exclusive "
                             "with --gpu-memory-utilization")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="CUDA only: fraction of the device's memory this engine may use for weights, "
                             "activations and KV cache together; the KV cache gets what is left (vLLM's meaning)")


def kv_cache_sizing(args: argparse.Namespace) -> dict:
    """CacheConfig's ``kv_cache_bytes`` and ``gpu_memory_utilization`` from the flags; ConfigError when
    both are given (they are two ways of sizing the same cache)."""
    if args.kv_cache_bytes is not None and args.gpu_memory_utilization is not None:
        raise ConfigError("--kv-cache-bytes and --gpu-memory-utilization both size the KV cache: give one")
    return {"kv_cache_bytes": args.kv_cache_bytes or DEFAULT_KV_CACHE_BYTES,
            "gpu_memory_utilization": args.gpu_memory_utilization}

def resolve_device(name: str | None) -> str:
    """``auto`` made concrete, and a CUDA device checked to exist; returns "cpu", "cuda" or "cuda:N"."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    match = CUDA_DEVICE.fullmatch(name)
    if match is None:
        raise ConfigError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name} requested, but {no_cuda_reason()}; use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if match.group(2) is not None and int(match.group(2)) >= count:
        raise ConfigError(f"device {name} requested, but this machine has {count} CUDA device(s): "
                          f"cuda:0 to cuda:{count - 1}")
    return name


def device_label(device: str) -> str:
    """The device as an operator reads it: "cpu", or "cuda:0 (NVIDIA H200)" (kvferry status)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support (install the CUDA build of it)"
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device (no driver, or "
            "CUDA_VISIBLE_DEVICES hides them)")


def llm_device_kwargs(args: argparse.Namespace) -> dict:
    """``LLM``'s device and KV cache arguments from ``add_device_arguments``' flags."""
    return {"device": resolve_device(args.device), **kv_cache_sizing(args)}


def activation_bytes(model: ModelConfig, max_num_batched_tokens: int, max_num_seqs: int,
                     dtype: torch.dtype) -> int:
    """An upper estimate of one step's transient memory: a full token budget through one layer's widest
    tensors (residual, q/k/v, gate+up, attention output) plus fp32 logits for every sampled row."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_token = (3 * model.hidden_size + model.q_size + 2 * model.kv_size + 3 * model.intermediate_size) * itemsize
    return max_num_batched_tokens * per_token + max_num_seqs * model.vocab_size * 4


def kv_budget_bytes(total: int, free: int, used_here: int, utilization: float, activations: int) -> int:
    """KV cache bytes for ``utilization`` of a device of ``total`` bytes, of which ``used_here`` (this
    process: weights) is taken and ``free`` is free now; ConfigError when nothing is left or it does not fit."""
    gib = 2**30
    budget = int(total * utilization) - used_here - activations
    if budget <= 0:
        raise ConfigError(
            f"--gpu-memory-utilization {utilization:g} of {total / gib:.1f} GiB leaves no room for a KV cache: the "
            f"weights take {used_here / gib:.2f} GiB and a step's activations about {activations / gib:.2f} GiB")
    if budget + activations > free:
        raise ConfigError(
            f"--gpu-memory-utilization {utilization:g} asks for a {budget / gib:.2f} GiB KV cache, but only "
            f"{free / gib:.2f} GiB of the device is free ({(total - free - used_here) / gib:.2f} GiB held by other "
            "processes): lower it")
    return budget


def cuda_kv_budget_bytes(device: str, utilization: float, activations: int) -> int:
    """``kv_budget_bytes`` for a CUDA device with its weights already loaded."""
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return kv_budget_bytes(total, free, torch.cuda.memory_reserved(torch.device(device)), utilization, activations)
