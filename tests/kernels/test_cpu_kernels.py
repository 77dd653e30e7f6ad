"""kvferry's CPU kernels (kernels/cpu_kernels.py): the skinny linear against an fp32 product, decode
attention and RMSNorm against their torch references."""

import random

import pytest
import torch
from kernel_cases import FULL_GRID, AttnCase, assert_close, paged_cache, randn

from kvferry.engine.model import Linear
from kvferry.kernels import cpu_kernels, dispatch
from kvferry.kernels.attention import AttentionMetadata, build_decode_metadata, decode_attention_ref, store_kv_ref
from kvferry.kernels.rms_norm import rms_norm_ref

pytestmark = pytest.mark.skipif(not cpu_kernels.cpu_has_avx512_bf16(), reason="CPU has no AVX512-BF16")


@pytest.fixture(autouse=True)
def built():  # the wrappers expect load() to have run (the engine's callers check available() first)
    assert cpu_kernels.load() is not None


def test_it_builds_where_the_cpu_can_run_it():
    # A build failure would silently leave every bf16 linear on oneDNN: here it must show.
    assert cpu_kernels.load() is not None


# (out, in): SmolLM2's q/k/v and down shapes, a K that is not a multiple of 32, fewer rows than a tile
SHAPES = [(1728, 576), (576, 1536), (37, 100), (3, 64), (1, 8)]


@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_an_fp32_product(out_features, in_features, tokens, with_bias):
    g = torch.Generator().manual_seed(out_features * 31 + in_features * 7 + tokens)
    x = torch.randn(tokens, in_features, generator=g).bfloat16()
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    bias = torch.randn(out_features, generator=g) if with_bias else None
    out = cpu_kernels.skinny_linear(x, w, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (tokens, out_features)
    expected = x.float() @ w.float().T + (0 if bias is None else bias)
    # fp32 accumulation, then one rounding to bf16 (relative step 2^-8)
    torch.testing.assert_close(out.float(), expected, rtol=2**-8, atol=1e-3 * in_features**0.5)
    # Prefetching the next weight changes nothing in the result.
    assert torch.equal(out, cpu_kernels.skinny_linear(x, w, bias, next_weight=torch.randn(300, 70).bfloat16()))
    # A token's result does not depend on the others in its batch.
    for i in range(tokens):
        assert torch.equal(out[i : i + 1], cpu_kernels.skinny_linear(x[i : i + 1], w, bias))


def test_linear_takes_it_for_few_tokens_and_onednn_for_many():
    torch.manual_seed(0)
    layer = Linear(576, 1536, bias=True).to(torch.bfloat16)
    layer.pack()
    assert layer.skinny
    for tokens in (1, 8, 9, 64):
        x = torch.randn(tokens, 576).bfloat16()
        expected = x.float() @ layer.weight.float().T + layer.bias.float()
        torch.testing.assert_close(layer(x).float(), expected, rtol=2**-7, atol=0.05)
    x = torch.randn(2, 3, 576).bfloat16()  # leading dims are kept
    assert layer(x).shape == (2, 3, 1536)


def test_bad_input_is_refused_with_the_reason():
    w = torch.randn(8, 64).bfloat16()
    with pytest.raises(RuntimeError, match="bf16 only"):
        cpu_kernels.load().skinny_linear(torch.randn(1, 64), w, torch.empty(0), torch.empty(0))
    with pytest.raises(RuntimeError, match="M <= 8"):
        cpu_kernels.load().skinny_linear(torch.randn(9, 64).bfloat16(), w, torch.empty(0), torch.empty(0))
    with pytest.raises(RuntimeError, match="shapes"):
        cpu_kernels.load().skinny_linear(torch.randn(1, 32).bfloat16(), w, torch.empty(0), torch.empty(0))


BF16_CASES = [c for c in FULL_GRID if c.dtype == torch.bfloat16]


@pytest.mark.parametrize("case", BF16_CASES, ids=str)
def test_decode_attention_matches_the_reference(case):
    rng = random.Random(case.seed)
    bs = case.block_size
    lens = [1, bs, 2 * bs + rng.randint(1, bs - 1), rng.randint(2, 3 * bs), 300]
    cache, tables = paged_cache(case, lens, "cpu", case.seed)
    block_tables, context_lens, slots, mask = build_decode_metadata(tables, lens, bs)
    attn = AttentionMetadata(torch.zeros(len(lens), dtype=torch.int64), [], 0, block_tables, context_lens, slots, mask)
    # The query as the model hands it over: a view into a wider [tokens, heads + kv heads, D] tensor.
    wide = randn(len(lens), case.num_heads + case.num_kv_heads, case.head_dim, dtype=case.dtype, device="cpu",
                 seed=case.seed + 1)
    query = wide[:, : case.num_heads]
    scale = case.head_dim**-0.5
    out = cpu_kernels.decode_attention(query, cache, block_tables, context_lens, scale)
    assert_close(out, decode_attention_ref(query, cache, attn, scale), case.dtype)


def test_decode_attention_refuses_a_block_outside_the_cache():
    case = AttnCase(64, 1, 16, torch.bfloat16)
    cache, _ = paged_cache(case, [20], "cpu", 0)
    query = randn(1, case.num_heads, 64, dtype=torch.bfloat16, device="cpu", seed=0)
    tables = torch.tensor([[0, cache.shape[1]]], dtype=torch.int32)  # the second block does not exist
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels.decode_attention(query, cache, tables, torch.tensor([20], dtype=torch.int32), 0.125)


@pytest.mark.parametrize("tokens,hidden", [(1, 576), (7, 576), (300, 64), (2, 100)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_reference(tokens, hidden, with_residual):
    x = randn(tokens, hidden, dtype=torch.bfloat16, device="cpu", seed=tokens)
    w = randn(hidden, dtype=torch.bfloat16, device="cpu", seed=hidden)
    residual = randn(tokens, hidden, dtype=torch.bfloat16, device="cpu", seed=3) if with_residual else None
    out, new_residual = cpu_kernels.rms_norm(x, w, 1e-5, residual)
    ref_out, ref_residual = rms_norm_ref(x, w, 1e-5, residual)
    assert torch.equal(new_residual, ref_residual)  # the rounded sum, bit for bit
    # The norm's fp32 sum runs in another order: at most one bf16 step apart.
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=2**-7, atol=1e-6)
    assert (out != ref_out).float().mean() < 0.02


def test_dispatch_sends_bf16_cpu_tensors_to_the_kernels_and_fp32_to_the_references():
    x = randn(3, 64, dtype=torch.float32, device="cpu", seed=0)
    w = torch.rand(64)
    assert all(torch.equal(a, b) for a, b in zip(dispatch.rms_norm(x, w, 1e-6, x), rms_norm_ref(x, w, 1e-6, x)))
    xb, wb = x.bfloat16(), w.bfloat16()
    got = dispatch.rms_norm(xb, wb, 1e-6, xb)
    assert all(torch.equal(a, b) for a, b in zip(got, cpu_kernels.rms_norm(xb, wb, 1e-6, xb)))


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 8, 128), (4, 1, 16)])
def test_rope_store_kv_equals_the_models_torch_expression(heads, kv_heads, head_dim):
    tokens, block_size, num_blocks = 5, 16, 4
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=torch.bfloat16, device="cpu", seed=heads)
    angles = torch.rand(tokens, head_dim // 2) * 6
    cos = torch.cat((angles.cos(), angles.cos()), -1).bfloat16().unsqueeze(1)  # as Model.forward builds them
    sin = torch.cat((-angles.sin(), angles.sin()), -1).bfloat16().unsqueeze(1)
    slots = torch.tensor([3, 17, 40, 0, 63])
    cache = torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=torch.bfloat16)
    q = cpu_kernels.rope_store_kv(qkv, cos, sin, cache, slots, heads, kv_heads)
    # The model's CPU expression (engine/model.py) and the reference store
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    qk = qk * cos + qk.roll(head_dim // 2, dims=-1) * sin
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    expected_cache = torch.zeros_like(cache)
    store_kv_ref(qk[:, heads:], v, expected_cache, slots)
    assert torch.equal(q, qk[:, :heads])
    assert torch.equal(cache, expected_cache)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels.rope_store_kv(qkv, cos, sin, cache, torch.tensor([0, 1, 2, 3, 64]), heads, kv_heads)


@pytest.mark.parametrize("tokens,intermediate", [(1, 1536), (9, 100)])
def test_silu_mul_matches_the_models_expression(tokens, intermediate):
    gate_up = randn(tokens, 2 * intermediate, dtype=torch.bfloat16, device="cpu", seed=intermediate) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    out = cpu_kernels.silu_mul(gate_up)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=1e-6)
    assert (out != expected).float().mean() < 0.01  # at most a last-bit exp difference, rarely
    # fp32 stays on the torch expression
    fp32 = gate_up.float()
    torch.testing.assert_close(dispatch.silu_mul(fp32), torch.nn.functional.silu(fp32[:, :intermediate]) * fp32[:, intermediate:])
