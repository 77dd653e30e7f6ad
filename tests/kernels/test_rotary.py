"""Rotary embedding in place on q and k: the Triton kernel against ``rotary_ref``, and the reference
against transformers' ``apply_rotary_pos_emb``."""

import pytest
import torch
from kernel_cases import TOLERANCES, randn

from kvferry.kernels.rotary import rotary_ref

# (head_dim, num_heads, num_kv_heads, dtype, cos/sin width)
CASES = [
    (64, 9, 3, torch.float32, "full"),
    (128, 8, 1, torch.bfloat16, "half"),
    (64, 6, 6, torch.bfloat16, "full"),
]


def cos_sin(head_dim: int, num_tokens: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's float32 tables for scattered positions: [num_tokens, head_dim], cat(freqs, freqs)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    positions = torch.randperm(4096, generator=torch.Generator().manual_seed(0))[:num_tokens].float()
    emb = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def qk(head_dim: int, num_heads: int, num_kv_heads: int, dtype: torch.dtype, device: str):
    # Views into one fused projection output [T, H + 2 * KVH, D], as the model's q and k are.
    qkv = randn(11, num_heads + 2 * num_kv_heads, head_dim, dtype=dtype, device=device, seed=1)
    return qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads]


@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads,dtype,width", CASES)
def test_rotary_matches_reference(head_dim, num_heads, num_kv_heads, dtype, width, device):
    pytest.importorskip("triton")
    from kvferry.kernels.rotary import rotary

    query, key = qk(head_dim, num_heads, num_kv_heads, dtype, device)
    cos, sin = cos_sin(head_dim, query.shape[0], device)
    if width == "half":
        cos, sin = cos[:, : head_dim // 2], sin[:, : head_dim // 2]
    q_ref, k_ref = query.clone(), key.clone()
    rotary_ref(q_ref, k_ref, cos, sin)
    rotary(query, key, cos, sin)
    torch.testing.assert_close(query.float(), q_ref.float(), **TOLERANCES[dtype])
    torch.testing.assert_close(key.float(), k_ref.float(), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_transformers(dtype):
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    query, key = qk(64, 9, 3, dtype, "cpu")
    cos, sin = cos_sin(64, query.shape[0], "cpu")
    # HF: q/k as [batch, heads, tokens, head_dim], cos/sin [batch, tokens, head_dim] in the input dtype.
    q_hf, k_hf = modeling_llama.apply_rotary_pos_emb(
        query.transpose(0, 1)[None], key.transpose(0, 1)[None], cos.to(dtype)[None], sin.to(dtype)[None]
    )
    rotary_ref(query, key, cos, sin)
    assert torch.equal(query, q_hf[0].transpose(0, 1)) and torch.equal(key, k_hf[0].transpose(0, 1))
