"""Fixtures for cluster tests: the single-process engine's greedy outputs as the reference, and one
`kvferry serve` (router + prefill + decode processes on loopback, default model) per module."""

from __future__ import annotations

import os

import pytest

from cluster_helpers import CHAT, MAX_TOKENS, PROMPTS, Serve, alive


@pytest.fixture(scope="session")
def reference(model_path):
    """Greedy outputs of the single-process engine, one request at a time: {prompt or 'chat': Completion}."""
    import torch

    from kvferry.engine.llm import LLM
    from kvferry.engine.sampling import SamplingParams

    # At the torch threads serve gives each of its two workers (the cores split between them): on an
    # AVX2 CPU the fp32 products round differently at another thread count, enough to move a seeded
    # sample at temperature 0.9 (greedy outputs agree either way).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        llm = LLM(model=model_path)
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
        out = {p: llm.generate([p], params)[0] for p in PROMPTS}
        out["chat"] = llm.chat([CHAT], params)[0]
        out["seeded"] = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9,
                                                                  seed=1234))[0]
        # Decode batches of 16+ rows multiply by the prepacked bf16 copy (docs/KERNELS.md), which rounds
        # unlike batch 1: where a prompt's next token is a near tie, wide batches pick the other one.
        out["wide"] = {p: llm.generate([p] * 32, params)[0] for p in PROMPTS}
        out["tokenizer"] = llm.tokenizer
        del llm
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def serve(model_path):
    # Every prompt through the prefill worker and a KV transfer, short ones too: that path is what these
    # tests check against the engine. Conditional disaggregation has its own (test_placement.py).
    s = Serve("--local-prefill", "never")
    yield s
    if s.process.poll() is None:
        output = s.stop()
        leftover = [pid for pid in s.pids if alive(pid)]
        assert s.process.returncode == 0, output[-3000:]
        assert f"kvferry is serving at {s.url}/v1" in output and f"curl {s.url}/v1/chat/completions" in output
        assert not leftover, f"orphan processes after shutdown: {leftover}"
