"""Fused residual add + RMSNorm: the Triton kernel against ``rms_norm_ref``, and the reference
against transformers' LlamaRMSNorm applied after the model's own residual add."""

import pytest
import torch
from kernel_cases import TOLERANCES, randn

from kvferry.kernels.rms_norm import rms_norm_ref

# (hidden, dtype, with a residual): 576 is SmolLM2's, not a power of two
CASES = [
    (576, torch.float32, True),
    (576, torch.bfloat16, True),
    (128, torch.bfloat16, False),
    (64, torch.float32, False),
]


def inputs(hidden: int, dtype: torch.dtype, device: str):
    # x is a strided view (every other row of a wider buffer), as a slice of a fused output is.
    x = randn(14, hidden, dtype=dtype, device=device, seed=1)[::2]
    residual = randn(7, hidden, dtype=dtype, device=device, seed=2)
    weight = (1 + 0.1 * randn(hidden, dtype=torch.float32, device=device, seed=3)).to(dtype)
    return x, residual, weight


@pytest.mark.parametrize("hidden,dtype,with_residual", CASES)
def test_rms_norm_matches_reference(hidden, dtype, with_residual, device):
    pytest.importorskip("triton")
    from kvferry.kernels.rms_norm import rms_norm

    x, residual, weight = inputs(hidden, dtype, device)
    residual = residual if with_residual else None
    normed, new_residual = rms_norm(x, weight, 1e-5, residual)
    expected, expected_residual = rms_norm_ref(x, weight, 1e-5, residual)
    torch.testing.assert_close(normed.float(), expected.float(), **TOLERANCES[dtype])
    # The residual sum is one rounding of x + residual: exact in fp32, within one bf16 ulp otherwise.
    torch.testing.assert_close(new_residual.float(), expected_residual.float(), atol=0, rtol=2**-7)
    if not with_residual:
        assert new_residual is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_transformers(dtype):
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    x, residual, weight = inputs(576, dtype, "cpu")
    hf = modeling_llama.LlamaRMSNorm(576, eps=1e-5).to(dtype)
    hf.weight.data.copy_(weight)
    normed, new_residual = rms_norm_ref(x, weight, 1e-5, residual)
    assert torch.equal(new_residual, x + residual)
    assert torch.equal(normed, hf(x + residual))
