"""kvferry's CPU kernels (kernels/cpu_kernels.py) against their torch references, on every ISA this CPU
runs (the AVX-512 extension where it has AVX512-BF16, the AVX2 one on any AVX2 CPU), fp32 and bf16.

Claims held here: RoPE + KV store and the RMSNorm residual sum are bit for bit the torch expression's
in both dtypes; RMSNorm's output is within one rounding step of the reference (its fp32 sum of squares
runs in another order), silu*mul within one step, rarely (its exp is not torch's); the skinny linear
is an fp32-accumulated product rounded once, the same for a token whatever its batch; decode attention
is within the kernel tests' usual tolerances of the SDPA reference.
"""

import random

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import FULL_GRID, AttnCase, assert_close, paged_cache, randn

from kvferry.engine.model import Linear
from kvferry.kernels import cpu_features, cpu_kernels, dispatch
from kvferry.kernels.attention import AttentionMetadata, build_decode_metadata, decode_attention_ref, store_kv_ref
from kvferry.kernels.rms_norm import rms_norm_ref

pytestmark = pytest.mark.skipif(not cpu_features.has_avx2(), reason="CPU has no AVX2/FMA")

RUNNABLE = [ext for ext in cpu_kernels.EXTENSIONS if ext.unavailable_reason() is None]
DTYPES = [torch.float32, torch.bfloat16]
EMPTY = torch.empty(0)


@pytest.fixture(params=RUNNABLE, ids=lambda ext: ext.name.rsplit("_", 1)[-1])
def kernels(request):
    """Each extension this CPU can run, loaded directly (not only the best, which ``load()`` picks)."""
    module = request.param.load()
    # A missing build would silently leave every caller on the torch paths: here it must show.
    assert module is not None, f"{request.param.name} is not built: run `python -m kvferry.kernels.build`"
    return module


def test_load_picks_the_best_isa_the_cpu_has():
    assert cpu_kernels.isa() == ("avx512" if cpu_features.has_avx512_bf16() else "avx2")
    assert [ext.load().isa for ext in RUNNABLE] == [ext.name.rsplit("_", 1)[-1] for ext in RUNNABLE]


# (out, in): SmolLM2's q/k/v and down shapes, a K that is no multiple of any vector width, fewer rows than a tile
SHAPES = [(960, 576), (576, 1536), (37, 100), (3, 64), (1, 8)]
# (x, weight) dtypes the skinny linear takes
LINEAR_DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float32, torch.float32)]


@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("dtypes", LINEAR_DTYPES, ids=lambda d: "x{}-w{}".format(*(str(t)[6:] for t in d)))
def test_skinny_linear_matches_an_exact_product(kernels, out_features, in_features, tokens, dtypes):
    check_skinny_linear(kernels, out_features, in_features, tokens, dtypes)


def check_skinny_linear(kernels, out_features: int, in_features: int, tokens: int, dtypes) -> None:
    x_dtype, w_dtype = dtypes
    g = torch.Generator().manual_seed(out_features * 31 + in_features * 7 + tokens)
    x = torch.randn(tokens, in_features, generator=g).to(x_dtype)
    w = torch.randn(out_features, in_features, generator=g).to(w_dtype)
    bias = torch.randn(out_features, generator=g) if tokens % 2 else EMPTY
    out = kernels.skinny_linear(x, w, bias, EMPTY)
    assert out.dtype == x_dtype and out.shape == (tokens, out_features)
    expected = x.double() @ w.double().T + (bias.double() if bias.numel() else 0)
    if x_dtype == torch.bfloat16:  # fp32 accumulation, then one rounding to bf16 (relative step 2^-8)
        torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=1e-3 * in_features**0.5)
    else:  # fp32 accumulation of K products
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=2e-6 * in_features**0.5)
    # Prefetching the next weight changes nothing in the result.
    assert torch.equal(out, kernels.skinny_linear(x, w, bias, torch.randn(300, 70).bfloat16()))
    # A token's result does not depend on the others in its batch.
    for i in range(tokens):
        assert torch.equal(out[i : i + 1], kernels.skinny_linear(x[i : i + 1], w, bias, EMPTY))


def test_skinny_fp32_is_as_close_to_an_exact_product_as_mkl():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 1536, generator=g), torch.randn(576, 1536, generator=g)
    exact = x.double() @ w.double().T
    ours = (cpu_kernels.skinny_linear(x, w, None).double() - exact).abs().max()
    mkl = (F.linear(x, w).double() - exact).abs().max()
    assert ours <= 2 * mkl + 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_takes_it_for_few_decode_tokens(dtype):
    torch.manual_seed(0)
    layer = Linear(576, 1536, bias=True).to(dtype)
    layer.pack()
    assert layer.skinny == (dtype == torch.bfloat16 or cpu_kernels.SKINNY_FP32)
    for tokens in (1, 8, 9, 64):
        x = torch.randn(tokens, 576).to(dtype)
        expected = x.double() @ layer.weight.double().T + layer.bias.double()
        tol = dict(rtol=2**-7, atol=0.05) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(layer(x).double(), expected, **tol)
        if tokens <= cpu_kernels.MAX_TOKENS and layer.skinny:
            assert torch.equal(layer(x), cpu_kernels.skinny_linear(x, layer.weight, layer.bias_fp32))
    x = torch.randn(2, 3, 576).to(dtype)  # leading dims are kept
    assert layer(x).shape == (2, 3, 1536)


def test_bad_input_is_refused_with_the_reason(kernels):
    w = torch.randn(8, 64).bfloat16()
    with pytest.raises(RuntimeError, match="dtypes must be"):
        kernels.skinny_linear(torch.randn(1, 64).bfloat16(), w.float(), EMPTY, EMPTY)
    with pytest.raises(RuntimeError, match="M <= 8"):
        kernels.skinny_linear(torch.randn(9, 64).bfloat16(), w, EMPTY, EMPTY)
    with pytest.raises(RuntimeError, match="shapes"):
        kernels.skinny_linear(torch.randn(1, 32).bfloat16(), w, EMPTY, EMPTY)
    with pytest.raises(RuntimeError, match="of its dtype"):
        kernels.rms_norm(torch.randn(2, 64), torch.randn(64).bfloat16(), 1e-6, None)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        kernels.silu_mul(torch.randn(2, 64).half())


def _decode_case(case: AttnCase, lens: list[int]):
    cache, tables = paged_cache(case, lens, "cpu", case.seed)
    block_tables, context_lens, slots, mask = build_decode_metadata(tables, lens, case.block_size)
    attn = AttentionMetadata(torch.zeros(len(lens), dtype=torch.int64), [], 0, block_tables, context_lens, slots, mask)
    # The query as the model hands it over: a view into a wider [tokens, heads + kv heads, D] tensor.
    wide = randn(len(lens), case.num_heads + case.num_kv_heads, case.head_dim, dtype=case.dtype, device="cpu",
                 seed=case.seed + 1)
    return wide[:, : case.num_heads], cache, attn


@pytest.mark.parametrize("case", FULL_GRID, ids=str)
def test_decode_attention_matches_the_reference(kernels, case):
    check_decode_attention(kernels, case)


def check_decode_attention(kernels, case: AttnCase) -> None:
    rng = random.Random(case.seed)
    bs = case.block_size
    lens = [1, bs, 2 * bs + rng.randint(1, bs - 1), rng.randint(2, 3 * bs), 300]
    query, cache, attn = _decode_case(case, lens)
    scale = case.head_dim**-0.5
    out = kernels.decode_attention(query, cache, attn.block_tables, attn.context_lens, scale)
    assert out.dtype == case.dtype
    assert_close(out, decode_attention_ref(query, cache, attn, scale), case.dtype)


# Shapes off the grid: head dims that are not a whole number of the kernel's V register tiles
# (4 vectors on AVX-512, 2 on AVX2) and groups the kernel takes in parts of 4 heads.
@pytest.mark.parametrize("case", [
    AttnCase(80, 6, 16, torch.bfloat16),
    AttnCase(96, 5, 32, torch.float32),
    AttnCase(16, 2, 16, torch.float32, num_kv_heads=3),
    AttnCase(48, 7, 16, torch.bfloat16, num_kv_heads=1),
], ids=str)
def test_decode_attention_matches_the_reference_off_the_grid(kernels, case):
    check_decode_attention(kernels, case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_over_a_long_context_and_peaked_scores(kernels, dtype):
    # Large scores make the softmax peaked: exp's clamping and the max subtraction must hold up.
    case = AttnCase(64, 3, 16, dtype, num_kv_heads=3)
    query, cache, attn = _decode_case(case, [2000, 37])
    scale = 2.0
    out = kernels.decode_attention(query, cache, attn.block_tables, attn.context_lens, scale)
    assert_close(out, decode_attention_ref(query, cache, attn, scale), dtype)


def test_decode_attention_refuses_a_block_outside_the_cache(kernels):
    case = AttnCase(64, 1, 16, torch.bfloat16)
    cache, _ = paged_cache(case, [20], "cpu", 0)
    query = randn(1, case.num_heads, 64, dtype=torch.bfloat16, device="cpu", seed=0)
    tables = torch.tensor([[0, cache.shape[1]]], dtype=torch.int32)  # the second block does not exist
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.decode_attention(query, cache, tables, torch.tensor([20], dtype=torch.int32), 0.125)


@pytest.mark.parametrize("tokens,hidden", [(1, 576), (7, 576), (300, 64), (2, 100), (3, 5)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_the_reference(kernels, tokens, hidden, with_residual, dtype):
    check_rms_norm(kernels, tokens, hidden, with_residual, dtype)


def check_rms_norm(kernels, tokens: int, hidden: int, with_residual: bool, dtype: torch.dtype) -> None:
    x = randn(tokens, hidden, dtype=dtype, device="cpu", seed=tokens)
    w = randn(hidden, dtype=dtype, device="cpu", seed=hidden)
    residual = randn(tokens, hidden, dtype=dtype, device="cpu", seed=3) if with_residual else None
    out, new_residual = kernels.rms_norm(x, w, 1e-5, residual)
    ref_out, ref_residual = rms_norm_ref(x, w, 1e-5, residual)
    assert torch.equal(new_residual, ref_residual)  # the rounded sum, bit for bit
    if dtype == torch.bfloat16:  # the fp32 sum of squares runs in another order: at most one bf16 step apart
        torch.testing.assert_close(out.float(), ref_out.float(), rtol=2**-7, atol=1e-6)
        assert (out != ref_out).float().mean() < 0.02
    else:  # a few fp32 ulps
        torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 8, 128), (4, 1, 16), (6, 2, 48), (3, 3, 6)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_store_kv_equals_the_models_torch_expression(kernels, heads, kv_heads, head_dim, dtype):
    # head_dim 16, 48 and 6: halves that fill no vector, or only AVX2's, take the scalar loop.
    check_rope_store_kv(kernels, heads, kv_heads, head_dim, dtype)


def check_rope_store_kv(kernels, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    tokens, block_size, num_blocks = 5, 16, 4
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device="cpu", seed=heads)
    angles = torch.rand(tokens, head_dim // 2) * 6
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(dtype).unsqueeze(1)  # as Model.forward builds them
    sin = torch.cat((-angles.sin(), angles.sin()), -1).to(dtype).unsqueeze(1)
    slots = torch.tensor([3, 17, 40, 0, 63])
    cache = torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    q = kernels.rope_store_kv(qkv, cos, sin, cache, slots, heads, kv_heads)
    # The model's CPU expression (engine/model.py) and the reference store
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    qk = qk * cos + qk.roll(head_dim // 2, dims=-1) * sin
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    expected_cache = torch.zeros_like(cache)
    store_kv_ref(qk[:, heads:], v, expected_cache, slots)
    assert torch.equal(q, qk[:, :heads])
    assert torch.equal(cache, expected_cache)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.rope_store_kv(qkv, cos, sin, cache, torch.tensor([0, 1, 2, 3, 64]), heads, kv_heads)


@pytest.mark.parametrize("tokens,intermediate", [(1, 1536), (9, 100), (2, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_the_models_expression(kernels, tokens, intermediate, dtype):
    check_silu_mul(kernels, tokens, intermediate, dtype)


def check_silu_mul(kernels, tokens: int, intermediate: int, dtype: torch.dtype) -> None:
    gate_up = randn(tokens, 2 * intermediate, dtype=torch.float32, device="cpu", seed=intermediate) * 4
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, -88.5, 0.0])  # exp's clamped range and silu's zero
    gate_up = gate_up.to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    out = kernels.silu_mul(gate_up)
    if dtype == torch.bfloat16:
        torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=1e-6)
        assert (out != expected).float().mean() < 0.01  # at most a last-bit exp difference, rarely
    else:  # a couple of fp32 ulps of exp
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dispatch_sends_cpu_tensors_of_both_dtypes_to_the_kernels(dtype):
    x = randn(3, 64, dtype=dtype, device="cpu", seed=0)
    w = torch.rand(64).to(dtype)
    got = dispatch.rms_norm(x, w, 1e-6, x)
    assert all(torch.equal(a, b) for a, b in zip(got, cpu_kernels.rms_norm(x, w, 1e-6, x)))
    gate_up = randn(300, 64, dtype=dtype, device="cpu", seed=1)  # prompt-sized too: one path for every row
    assert torch.equal(dispatch.silu_mul(gate_up), cpu_kernels.silu_mul(gate_up))
