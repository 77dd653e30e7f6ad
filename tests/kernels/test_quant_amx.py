"""The AMX-BF16 product on GGUF weights (kernels/csrc/quant_amx.cpp) against its reference: the weight
dequantized to bf16 exactly as the dense copy is (gguf's values, rounded to nearest even), times the bf16
activations, summed in float64. Every block format, odd row and token counts (partial tiles on both
sides, more than the four token tiles one pass holds), a bias, mixed segments; a token's result does not
depend on its batch; bad input is refused; and deliberately broken copies of the kernel fail the check.
Runs where the CPU gives this process AMX tiles (skipped elsewhere, with the reason).
"""

from __future__ import annotations


import pytest
import torch
from mutant_build import build_mutants
from quant_blocks import NAMES, in_features_for, random_blocks, weight

from kvferry.kernels import cpu_features, quant
from kvferry.kernels.cpu_extension import CSRC
from kvferry.kernels.quant import QTYPES, QuantWeight, dequantize_ref


def _amx_module():
    module = quant.AVX512.load() if quant.AVX512.unavailable_reason() is None else None
    if module is None or not cpu_features.has_amx_bf16() or not module.quant_amx_available():
        return None
    return module


pytestmark = pytest.mark.skipif(_amx_module() is None, reason="no AMX-BF16 tiles on this CPU (or no AVX-512 build)")


@pytest.fixture(scope="module")
def amx():
    return _amx_module()


def amx_linear(fn, x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return fn(x, qw.datas, qw.qtypes, torch.empty(0) if bias is None else bias)


def check_amx(out: torch.Tensor, x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None) -> None:
    """``out`` against x @ W.T (+ bias) with W as the dense copy's bf16 values, in float64: within the
    float32 sum's error and one bf16 step of the output."""
    assert out.dtype == torch.bfloat16 and out.shape == (x.shape[0], qw.out_features)
    w = torch.cat([dequantize_ref(q, d, qw.in_features) for q, d in qw.segments]).bfloat16().double()
    want = x.double() @ w.T + (0 if bias is None else bias.double())
    terms = x.double().abs() @ w.abs().T
    err = (out.double() - want).abs()
    limit = out.double().abs() * 2**-7 + 1e-5 * terms + 1e-6
    assert (err <= limit).all(), f"not close to the bf16 dense reference: worst excess {(err - limit).max():.3g}"


@pytest.mark.parametrize("qtype", list(QTYPES), ids=[n for n, _, _ in QTYPES.values()])
@pytest.mark.parametrize("tokens", [1, 5, 16, 17, 64, 65, 130])
def test_amx_linear_matches_the_dense_bf16_reference(amx, qtype, tokens):
    for rows, cols in [(1, in_features_for(qtype)[0]), (37, in_features_for(qtype)[1]),
                       (100, in_features_for(qtype)[2])]:
        g = torch.Generator().manual_seed(rows * 131 + tokens)
        qw = QuantWeight([(qtype, random_blocks(qtype, rows, cols, seed=tokens))], cols)
        x = torch.randn(tokens, cols, generator=g).bfloat16()
        x[0, :32] = 0
        bias = torch.randn(rows, generator=g) if tokens % 2 else None
        check_amx(amx_linear(amx.quant_linear_amx, x, qw, bias), x, qw, bias)


def test_amx_segments_of_mixed_types(amx):
    cols = 512
    qw = QuantWeight.cat([weight(NAMES["Q4_K"], 24, cols, 1), weight(NAMES["Q6_K"], 8, cols, 2),
                          weight(NAMES["Q8_0"], 9, cols, 3), weight(NAMES["Q4_1"], 19, cols, 4)])
    x, bias = torch.randn(23, cols).bfloat16(), torch.randn(qw.out_features)
    check_amx(amx_linear(amx.quant_linear_amx, x, qw, bias), x, qw, bias)


@pytest.mark.parametrize("qtype", [NAMES["Q4_1"], NAMES["Q6_K"]], ids=["Q4_1", "Q6_K"])
def test_an_amx_tokens_result_does_not_depend_on_its_batch(amx, qtype):
    cols = in_features_for(qtype)[2]
    qw = weight(qtype, 40, cols)
    x = torch.randn(70, cols).bfloat16()
    out = amx_linear(amx.quant_linear_amx, x, qw)
    for i in (0, 15, 16, 63, 64, 69):
        assert torch.equal(out[i : i + 1], amx_linear(amx.quant_linear_amx, x[i : i + 1].contiguous(), qw))


def test_amx_bad_input_is_refused_with_the_reason(amx):
    qw = weight(NAMES["Q4_0"], 8, 64)
    with pytest.raises(RuntimeError, match="bfloat16"):
        amx.quant_linear_amx(torch.randn(1, 64), qw.datas, qw.qtypes, torch.empty(0))
    with pytest.raises(RuntimeError, match="bytes a row"):
        amx.quant_linear_amx(torch.randn(1, 96).bfloat16(), qw.datas, qw.qtypes, torch.empty(0))
    with pytest.raises(RuntimeError, match="bias"):
        amx.quant_linear_amx(torch.randn(1, 64).bfloat16(), qw.datas, qw.qtypes, torch.randn(3))


# name: (original text in quant_amx.cpp, broken text, (ggml type, rows, in_features, tokens) checked)
MUTANTS = {
    "drops_last_block": ("for (int64_t blk = 0; blk < blocks; ++blk) {",
                         "for (int64_t blk = 0; blk + 1 < blocks; ++blk) {", ("Q4_1", 32, 96, 5)),
    "fourth_token_tile_reads_the_third": ("_tile_loadd(5, b + 3 * kTile * kTile, 64);",
                                          "_tile_loadd(5, b + 2 * kTile * kTile, 64);", ("Q8_0", 16, 64, 64)),
    "outputs_not_transposed": ("transpose16(r);  // r[token] = its 16 outputs", "// not transposed",
                               ("Q4_K", 16, 256, 16)),
    "level_table_one_off": ("_mm512_cvtepu8_epi16(groups.q[g])",
                            "_mm512_add_epi16(_mm512_cvtepu8_epi16(groups.q[g]), _mm512_set1_epi16(1))",
                            ("Q5_K", 16, 256, 8)),
}


@pytest.fixture(scope="module")
def mutants(tmp_path_factory):
    folder = tmp_path_factory.mktemp("amx_mutants")
    source = (CSRC / "quant_amx.cpp").read_text()
    sources, declarations, entries = [str(CSRC / "quant_linear.cpp")], [], {}  # quant_linear.cpp: check_weight
    for name, (original, broken, _) in MUTANTS.items():
        assert source.count(original) == 1, f"mutation target {original!r} not found exactly once"
        renamed = entries[name] = f"amx_{name}"
        cpp = folder / f"{name}.cpp"
        cpp.write_text(f"#define quant_linear_amx {renamed}\n#define quant_amx_available available_{name}\n"
                       + source.replace(original, broken).replace('#include "', f'#include "{CSRC}/'))
        sources.append(str(cpp))
        declarations.append(f"at::Tensor {renamed}(const at::Tensor&, const std::vector<at::Tensor>&, "
                            "const std::vector<int64_t>&, const at::Tensor&);")
    return build_mutants(folder, sources, entries, declarations, quant.AVX512)


@pytest.mark.slow  # one C++ build of the copies, about a minute
@pytest.mark.parametrize("name", list(MUTANTS))
def test_broken_amx_kernel_is_caught(amx, mutants, name):
    qtype, rows, cols, tokens = MUTANTS[name][2]
    qw = weight(NAMES[qtype], rows, cols, seed=rows)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(cols)).bfloat16()
    check_amx(amx_linear(amx.quant_linear_amx, x, qw), x, qw)  # the check passes on the real kernel
    with pytest.raises(AssertionError, match="not close"):
        check_amx(amx_linear(getattr(mutants, name), x, qw), x, qw)
