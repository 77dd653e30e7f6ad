"""The quantized-weight kernels (kernels/quant.py) against their references, on every ISA build this
machine can run (the AVX2 build runs on an AVX-512 machine too), plus the reference path itself.

- ``quant_dequantize`` must equal gguf's numpy dequantize bit for bit (float32, and bfloat16 after
  the same rounding).
- ``quant_linear`` quantizes x to Q8 blocks first, so it is held to two references: the one that
  rounds x the same way (``quantize_activations=True``) within float-summation error, and the plain
  dequantize-then-matmul one within the exact bound of that rounding (half a step of each block's
  scale, times the weights' magnitudes).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from quant_blocks import NAMES, in_features_for, quantized_floats, random_blocks, weight

from kvferry.kernels import quant
from kvferry.kernels.quant import QTYPES, QuantWeight, dequantize_ref, quant_linear_ref

BUILDS = [ext for ext in quant.EXTENSIONS if ext.unavailable_reason() is None]


@pytest.fixture(params=BUILDS, ids=[ext.name.removeprefix("kvferry_quant_") for ext in BUILDS])
def kernels(request):
    module = request.param.load()
    if module is None:
        pytest.skip(f"{request.param.name} is not built (python -m kvferry.kernels.build)")
    return module


def test_every_build_this_cpu_can_run_is_built():
    # A missing build would silently leave the model on the slow reference path: here it must show.
    assert BUILDS, "this CPU has no AVX2: the references are all that runs"
    for ext in BUILDS:
        assert ext.load() is not None, f"{ext.name} is not built: python -m kvferry.kernels.build"


def activation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # [M, N]
    """|kernel - x @ w.T| can be at most this: each x is off by at most half its block's step."""
    step = x.float().reshape(x.shape[0], -1, 32).abs().amax(-1) / 127  # [M, K / 32]
    half_step = step.repeat_interleave(32, dim=1) / 2
    return (half_step.double() @ w.abs().double().T) * (1 + 1e-5)


def linear(module, x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return module.quant_linear(x, qw.datas, qw.qtypes, torch.empty(0) if bias is None else bias)


def check_linear(out: torch.Tensor, x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None) -> None:
    """``out``, the kernel's ``x @ W.T + bias``, against both references."""
    assert out.dtype == x.dtype and out.shape == (x.shape[0], qw.out_features)
    w = torch.cat([dequantize_ref(q, d, qw.in_features) for q, d in qw.segments])
    terms = x.float().abs().double() @ w.abs().double().T  # scale of the float summation error
    # bf16 output: one ulp (the fp32 sum and the float64 reference may round on either side of a tie)
    rounding = out.double().abs() * 2**-7 if x.dtype == torch.bfloat16 else 0
    same_rounding = quant_linear_ref(x.float(), qw, bias, quantize_activations=True).double()
    err = (out.double() - same_rounding).abs()
    limit = 1e-5 * terms + 1e-6 + rounding
    assert (err <= limit).all(), f"not close to the Q8-activation reference: worst excess {(err - limit).max():.3g}"
    plain = quant_linear_ref(x.float(), qw, bias).double()
    err = (out.double() - plain).abs()
    limit = activation_bound(x, w) + 1e-5 * terms + 1e-6 + rounding
    assert (err <= limit).all(), f"not close to dequantize-then-matmul: worst excess {(err - limit).max():.3g}"


@pytest.mark.parametrize("qtype", list(QTYPES), ids=[n for n, _, _ in QTYPES.values()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dequantize_is_ggufs(kernels, qtype, dtype):
    for rows, cols in [(1, in_features_for(qtype)[0]), (37, in_features_for(qtype)[1]), (5, in_features_for(qtype)[2])]:
        data = random_blocks(qtype, rows, cols, seed=rows)
        want = dequantize_ref(qtype, data, cols).to(dtype)
        got = kernels.quant_dequantize(data, qtype, cols, dtype)
        assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("qtype", list(QTYPES), ids=[n for n, _, _ in QTYPES.values()])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 8, 9, 17, 64])
def test_linear_matches_the_references(kernels, qtype, tokens):
    for rows, cols in [(1, in_features_for(qtype)[0]), (37, in_features_for(qtype)[1]),
                       (100, in_features_for(qtype)[2])]:
        g = torch.Generator().manual_seed(rows * 131 + tokens)
        qw = QuantWeight([(qtype, random_blocks(qtype, rows, cols, seed=tokens))], cols)
        x = torch.randn(tokens, cols, generator=g)
        x[0, :32] = 0  # an all-zero block (scale 0)
        for dtype in (torch.float32, torch.bfloat16):
            check_linear(linear(kernels, x.to(dtype), qw), x.to(dtype), qw)


@pytest.mark.parametrize("qtype", [NAMES["Q8_0"], NAMES["Q4_0"], NAMES["Q4_1"]], ids=["Q8_0", "Q4_0", "Q4_1"])
def test_linear_on_ggufs_own_quantization(kernels, qtype):
    qw = QuantWeight([(qtype, quantized_floats(qtype, 192, 576))], 576)
    x = torch.randn(3, 576)
    check_linear(linear(kernels, x, qw), x, qw)


@pytest.mark.parametrize("tokens", [5, 19])  # the streamed and the tiled path (quant_linear.cpp)
def test_segments_of_mixed_types_and_a_bias(kernels, tokens):
    """A fused q/k/v whose parts were quantized differently (as K-quant mixes do), with a bias."""
    cols = 512
    qw = QuantWeight.cat([weight(NAMES["Q4_K"], 24, cols, 1), weight(NAMES["Q6_K"], 8, cols, 2),
                          weight(NAMES["Q8_0"], 9, cols, 3), weight(NAMES["Q8_0"], 3, cols, 4)])
    assert qw.qtypes == [NAMES["Q4_K"], NAMES["Q6_K"], NAMES["Q8_0"]] and qw.out_features == 44
    x, bias = torch.randn(tokens, cols), torch.randn(44)
    check_linear(linear(kernels, x, qw, bias), x, qw, bias)
    if quant.available():  # the prompt path: all segments dequantized into one reused buffer
        buffer = quant.DequantBuffer()
        want = torch.cat([dequantize_ref(q, d, cols) for q, d in qw.segments])
        for dtype in (torch.bfloat16, torch.float32):
            assert torch.equal(quant.dequantize(qw, dtype, buffer), want.to(dtype))
        assert torch.equal(quant.dequantize(weight(NAMES["Q4_0"], 3, 64), torch.float32, buffer),
                           dequantize_ref(NAMES["Q4_0"], weight(NAMES["Q4_0"], 3, 64).datas[0], 64))


@pytest.mark.parametrize("qtype", list(QTYPES), ids=[n for n, _, _ in QTYPES.values()])
def test_a_tokens_result_does_not_depend_on_its_batch(kernels, qtype):
    cols = in_features_for(qtype)[1]
    qw = weight(qtype, 21, cols)
    x = torch.randn(19, cols).bfloat16()
    out = kernels.quant_linear(x, qw.datas, qw.qtypes, torch.empty(0))
    for i in (0, 7, 8, 18):
        alone = kernels.quant_linear(x[i : i + 1].contiguous(), qw.datas, qw.qtypes, torch.empty(0))
        assert torch.equal(out[i : i + 1], alone)


def test_a_one_block_error_is_caught(kernels):
    """The tolerances are tight enough to see one wrong block of 32 weights in a 576-long row: a
    swapped pair of nibbles (a kernel that reads them in the wrong order) or a wrong scale."""
    qtype, cols = NAMES["Q4_1"], 576
    data = quantized_floats(qtype, 16, cols)
    qw = QuantWeight([(qtype, data)], cols)
    x = torch.randn(2, cols)
    check_linear(linear(kernels, x, qw), x, qw)
    last = 20 * 17  # the last block of each row: d, m, then the nibbles
    swapped = data.clone()
    swapped[:, last + 4] = (swapped[:, last + 4] >> 4) | (swapped[:, last + 4] << 4)
    with pytest.raises(AssertionError, match="not close"):
        check_linear(linear(kernels, x, QuantWeight([(qtype, swapped)], cols)), x, qw)
    scaled = data.clone()  # the last block's scale d 25% off
    scaled[:, last : last + 2] = (data[:, last : last + 2].contiguous().view(torch.float16) * 1.25).view(torch.uint8)
    with pytest.raises(AssertionError, match="not close"):
        check_linear(linear(kernels, x, QuantWeight([(qtype, scaled)], cols)), x, qw)


def test_bad_input_is_refused_with_the_reason(kernels):
    qw = weight(NAMES["Q4_0"], 8, 64)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.quant_linear(torch.randn(1, 64).half(), qw.datas, qw.qtypes, torch.empty(0))
    with pytest.raises(RuntimeError, match="bytes a row"):
        kernels.quant_linear(torch.randn(1, 96), qw.datas, qw.qtypes, torch.empty(0))
    with pytest.raises(RuntimeError, match="multiple of the block size"):
        kernels.quant_linear(torch.randn(1, 100), qw.datas, qw.qtypes, torch.empty(0))
    with pytest.raises(RuntimeError, match="unsupported ggml type"):
        kernels.quant_linear(torch.randn(1, 64), qw.datas, [1], torch.empty(0))
    with pytest.raises(ValueError, match="not kept quantized"):
        QuantWeight([(16, torch.zeros(1, 4, dtype=torch.uint8))], 256)


def test_the_reference_path_runs_without_kernels():
    """What runs where no build exists: dequantize (gguf), then matmul."""
    qw = weight(NAMES["Q5_K"], 12, 256)
    x = torch.randn(3, 256)
    want = x.double() @ dequantize_ref(NAMES["Q5_K"], qw.datas[0], 256).double().T
    torch.testing.assert_close(quant_linear_ref(x, qw).double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(quant.dequantize_rows(NAMES["Q5_K"], qw.datas[0], 256, torch.float16),
                       dequantize_ref(NAMES["Q5_K"], qw.datas[0], 256).half())


@pytest.mark.skipif(len(BUILDS) < 2, reason="this CPU runs one build only")
def test_onednn_max_cpu_isa_avx2_picks_the_avx2_build():
    code = "from kvferry.kernels import quant; m = quant.load(); print(m.isa if m else None)"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2"),
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["avx2"]
    assert quant.load().isa == "avx512_vnni"
