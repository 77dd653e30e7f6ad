"""The quant kernel comparisons catch real kernel bugs: quant_linear.cpp (or the block layouts it includes,
quant_formats.h) is copied with one deliberate bug, the copies are built into one extension for AVX2
(runs on any AVX2 machine), and the check that passes on the real kernel (test_quant.py) must fail on
each copy.

A copy's entry point and its whole ``kvq`` namespace are renamed by ``#define``s ahead of its source,
so that the copies link side by side.
"""

from __future__ import annotations

import types

import pytest
import torch
from mutant_build import build_mutants
from quant_blocks import NAMES, weight
from test_quant import check_linear, linear

from kvferry.kernels import cpu_features, quant
from kvferry.kernels.cpu_extension import CSRC

pytestmark = [
    pytest.mark.skipif(not cpu_features.has_avx2(), reason="CPU has no AVX2/FMA/F16C"),
    pytest.mark.slow,  # one C++ build of four copies, a few minutes
]

# name: (file the bug is in, original text, broken text, (ggml type, rows, in_features, tokens) checked)
MUTANTS = {
    "nibbles_swapped": (
        "quant_formats.h",
        "_mm256_insertf128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1)",
        "_mm256_insertf128_si256(_mm256_castsi128_si256(_mm_srli_epi16(v, 4)), v, 1)",
        ("Q4_1", 37, 96, 2),
    ),
    "q5k_wrong_high_bit": (
        "quant_formats.h", "high_bit(qh, 2 * j + 1)", "high_bit(qh, 2 * j)", ("Q5_K", 9, 512, 1),
    ),
    "drops_last_block": (
        "quant_linear.cpp", "for (int64_t blk = 0; blk < num_blocks; ++blk) {",
        "for (int64_t blk = 0; blk + 1 < num_blocks; ++blk) {", ("Q6_K", 7, 512, 3),
    ),
    "rounds_activations_toward_zero": (
        "quant_linear.cpp", "_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC", "_MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC",
        ("Q8_0", 16, 576, 1),
    ),
}


@pytest.fixture(scope="module")
def mutants(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quant_mutants")
    (folder / "quant_kernels.h").write_text((CSRC / "quant_kernels.h").read_text())
    sources, declarations, entries = [], [], {}
    for name, (path, original, broken, _) in MUTANTS.items():
        header, source = (CSRC / "quant_formats.h").read_text(), (CSRC / "quant_linear.cpp").read_text()
        text = header if path == "quant_formats.h" else source
        assert text.count(original) == 1, f"mutation target {original!r} not found exactly once in {path}"
        if path == "quant_formats.h":
            header = header.replace(original, broken)
        else:
            source = source.replace(original, broken)
        (folder / f"{name}_formats.h").write_text(header)
        renamed = entries[name] = f"quant_linear_{name}"
        cpp = folder / f"{name}.cpp"
        cpp.write_text(f"#define quant_linear {renamed}\n#define kvq kvq_{name}\n"
                       + source.replace('#include "quant_formats.h"', f'#include "{name}_formats.h"'))
        sources.append(str(cpp))
        declarations.append(f"at::Tensor {renamed}(const at::Tensor&, const std::vector<at::Tensor>&, "
                            "const std::vector<int64_t>&, const at::Tensor&);")
    return build_mutants(folder, sources, entries, declarations, quant.AVX2)


@pytest.mark.parametrize("name", list(MUTANTS))
def test_broken_quant_kernel_is_caught(mutants, name):
    qtype, rows, cols, tokens = MUTANTS[name][3]
    qw = weight(NAMES[qtype], rows, cols, seed=rows)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(cols))
    real = quant.AVX2.load()
    assert real is not None, "kvferry_quant_avx2 is not built: run `python -m kvferry.kernels.build`"
    check_linear(linear(real, x, qw), x, qw)  # the check passes on the real kernel
    broken = types.SimpleNamespace(quant_linear=getattr(mutants, name))
    with pytest.raises(AssertionError, match="not close"):
        check_linear(linear(broken, x, qw), x, qw)
