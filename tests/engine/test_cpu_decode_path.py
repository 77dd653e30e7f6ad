"""The flat CPU decode path (engine/cpu_decode_path.py) is the modules' decode step without the modules:
the same tokens and bit-identical logprobs at batch 1 to 8, with quantized and dense weights, and it is
the path decode steps take where the kernels are built (prompts and other batches keep the modules)."""

from __future__ import annotations

import pytest

from kvferry.engine.llm import LLM
from kvferry.engine.sampling import SamplingParams
from kvferry.kernels import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels are not built here")

PROMPTS = [[1, 504, 3458, 282, 4649, 314], list(range(2000, 2040)), [7, 8, 9], list(range(300, 317)),
           [42] * 5, list(range(9000, 9100)), [11, 12], list(range(100, 160))]


@pytest.mark.parametrize("kwargs", [dict(), dict(dtype="float32", weights="dequantized")],
                         ids=["default-quantized", "fp32-dense"])
def test_the_flat_path_gives_the_modules_tokens_and_logprobs(default_model_file, kwargs):
    llm = LLM(model=default_model_file, enable_prefix_caching=False, **kwargs)
    model = llm.engine.runner.model
    path = model.cpu_decode
    assert path is not None
    calls = []
    run = path.run
    path.run = lambda *a: (calls.append(a[0].shape[0]), run(*a))[1]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3)
    widest = path.max_tokens  # 8, or 7 where a dense bf16 copy takes 8 rows (AMX)
    assert len(PROMPTS) >= widest
    for batch in (1, widest):
        flat = llm.generate(PROMPTS[:batch], params)
        model.cpu_decode = None
        modules = llm.generate(PROMPTS[:batch], params)
        model.cpu_decode = path
        for a, b in zip(flat, modules, strict=True):
            assert a.token_ids == b.token_ids
            assert a.logprobs == b.logprobs  # bit for bit: the same kernels on the same arguments
    assert set(calls) == {1, widest}  # decode steps took the flat path
