"""The CPU kernels chosen by CPU features, through the whole engine: ``ONEDNN_MAX_CPU_ISA=AVX2`` hides
AVX-512 from kvferry (kernels/cpu_features.py), so an AVX-512 machine runs exactly what an AVX2-only one
would; the default model in fp32 on the AVX2 kernels gives the torch references' greedy output
(``KVFERRY_CPU_KERNELS=0``), each in a process of its own (CPU features are read once per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvferry.kernels import cpu_features, cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_features.has_avx2(), reason="CPU has no AVX2/FMA")

SCRIPT = """
import json, sys
from kvferry.engine.llm import LLM
from kvferry.engine.sampling import SamplingParams
from kvferry.kernels import cpu_features, cpu_kernels

llm = LLM(model=sys.argv[1], dtype="float32", weights="dequantized", block_size=16)
prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time " * 12]
params = SamplingParams(max_tokens=12, temperature=0, logprobs=0, ignore_eos=True)
out = llm.generate(prompts, params)
print(json.dumps({"isa": cpu_kernels.isa(), "avx512_bf16": cpu_features.has_avx512_bf16(),
                  "tokens": [c.token_ids for c in out],
                  "logprobs": [[lp.logprob for lp in c.logprobs] for c in out]}))
"""


def _run(model_path: str, **env: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, model_path], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_avx2_cap_selects_the_avx2_kernels():
    code = "from kvferry.kernels import cpu_kernels as k; print(k.isa(), k.takes_skinny(__import__('torch').ones(1)))"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"},
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["avx2", str(cpu_kernels.SKINNY_FP32)], proc.stderr[-3000:]


def test_fp32_greedy_output_on_the_avx2_kernels_is_the_torch_references(model_path):
    kernels = _run(model_path, ONEDNN_MAX_CPU_ISA="AVX2")
    references = _run(model_path, KVFERRY_CPU_KERNELS="0")
    assert (kernels["isa"], kernels["avx512_bf16"]) == ("avx2", False)
    assert references["isa"] is None
    assert kernels["tokens"] == references["tokens"]
    for ours, theirs in zip(kernels["logprobs"], references["logprobs"], strict=True):
        assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 1e-3
