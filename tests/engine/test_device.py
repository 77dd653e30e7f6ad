"""Devices: ``--device auto`` is the CPU on a machine without CUDA, a CUDA device asked for there is a
clear error (no traceback) from every command, and the KV budget of ``--gpu-memory-utilization``."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from kvferry.engine.config import CacheConfig, ConfigError, EngineConfig
from kvferry.engine.device import kv_budget_bytes, resolve_device
from kvferry.worker_common.process import add_engine_arguments, engine_config_from_args

GIB = 2**30
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="these check a machine without CUDA")


@no_cuda
def test_auto_is_the_cpu_without_cuda():
    assert resolve_device("auto") == "cpu"
    assert resolve_device(None) == "cpu"


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_a_device_names_the_reason(name):
    with pytest.raises(ConfigError, match=r"requested, but this torch build .* has no CUDA support"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "mps", "cuda:"])
def test_unknown_device_names_are_refused(name):
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device(name)


def test_engine_config_takes_resolved_devices_only():
    with pytest.raises(ConfigError, match="resolve_device"):
        EngineConfig(model="m", device="auto")


def test_gpu_memory_utilization_is_checked():
    with pytest.raises(ConfigError, match=r"in \(0, 1\]"):
        CacheConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ConfigError, match="on the CPU use --kv-cache-bytes"):
        EngineConfig(model="m", device="cpu", cache=CacheConfig(gpu_memory_utilization=0.5))


def test_kv_budget_is_the_fraction_less_weights_and_activations():
    budget = kv_budget_bytes(total=24 * GIB, free=22 * GIB, used_here=1 * GIB, utilization=0.5,
                             activations=GIB // 2)
    assert budget == 12 * GIB - GIB - GIB // 2


def test_kv_budget_refuses_what_other_processes_hold():
    # 0.9 of 24 GiB with 1 GiB of weights asks for ~20 GiB, but other processes hold 13 GiB.
    with pytest.raises(ConfigError, match=r"only 10\.00 GiB of the device is free \(13\.00 GiB held by other"):
        kv_budget_bytes(total=24 * GIB, free=10 * GIB, used_here=1 * GIB, utilization=0.9, activations=GIB // 2)


def test_kv_budget_refuses_a_fraction_the_weights_fill():
    with pytest.raises(ConfigError, match="leaves no room for a KV cache"):
        kv_budget_bytes(total=8 * GIB, free=6 * GIB, used_here=2 * GIB, utilization=0.25, activations=GIB)


def worker_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return parser.parse_args(["--model", "m", *argv])


@no_cuda
def test_worker_config_from_flags():
    config = engine_config_from_args(worker_args())
    assert config.device == "cpu" and config.cache.kv_cache_bytes == 512 * 2**20
    assert engine_config_from_args(worker_args("--kv-cache-bytes", "1048576")).cache.kv_cache_bytes == 1 << 20
    with pytest.raises(ConfigError, match="both size the KV cache"):
        engine_config_from_args(worker_args("--kv-cache-bytes", "1048576", "--gpu-memory-utilization", "0.5"))


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvferry.cli", *argv], capture_output=True, text=True, timeout=120)


@no_cuda
@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["decode"], ["prefill"], ["serve"]])
def test_every_command_refuses_cuda_without_one(command):
    result = run_cli(*command, "--device", "cuda")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: device cuda requested, but this torch build" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_refuses_two_kv_sizings():
    result = run_cli("generate", "hi", "--kv-cache-bytes", "1000000", "--gpu-memory-utilization", "0.5")
    assert result.returncode == 2 and "both size the KV cache" in result.stderr and "Traceback" not in result.stderr
