"""The CPU kernel comparisons catch real kernel bugs: each kernel source (kernels/csrc/) is copied with one
deliberate bug, all the copies are built into one extension for AVX2 (runs on any AVX2 machine), and
the same check that passes on the real kernel (tests/kernels/test_cpu_kernels.py) must fail on each copy.

A copy's function is renamed by a ``#define`` ahead of its source, so that several copies of one
kernel link side by side; its declaration comes from ``cpu_kernels.h``, renamed the same way.
"""

from __future__ import annotations

import re
import shutil
import types

import pytest
import torch
from kernel_cases import AttnCase
from mutant_build import build_mutants
from test_cpu_kernels import (
    check_decode_attention,
    check_rms_norm,
    check_rope_store_kv,
    check_silu_mul,
    check_skinny_linear,
)

from kvferry.kernels import cpu_features, cpu_kernels
from kvferry.kernels.cpu_extension import CSRC

pytestmark = [
    pytest.mark.skipif(not cpu_features.has_avx2(), reason="CPU has no AVX2/FMA"),
    pytest.mark.slow,  # one C++ build, a minute or two
]

FP32, BF16 = torch.float32, torch.bfloat16

# name: (source file, function, original text, broken text, the check that must catch it)
MUTANTS = {
    "drops_last_value": (
        "decode_attention.cpp", "decode_attention",
        "for (int64_t t = 0; t < len; ++t) {  // values", "for (int64_t t = 0; t < len - 1; ++t) {  // values",
        lambda k: check_decode_attention(k, AttnCase(64, 3, 16, FP32)),
    ),
    "wrong_kv_head": (
        "decode_attention.cpp", "decode_attention",
        "for (int64_t t = 0; t < len; ++t) rows[t] += D;", "for (int64_t t = 0; t < len; ++t) rows[t] += 0;",
        lambda k: check_decode_attention(k, AttnCase(64, 3, 16, BF16)),
    ),
    "rms_norm_drops_tail": (
        "rms_norm.cpp", "rms_norm",
        "rest = hidden - full;", "rest = 0;",
        lambda k: check_rms_norm(k, 2, 100, True, FP32),
    ),
    "rope_wrong_half": (
        "rope_store_kv.cpp", "rope_store_kv",
        "round_as<T>(mul(hi, load(sin + d)))", "round_as<T>(mul(lo, load(sin + d)))",
        lambda k: check_rope_store_kv(k, 9, 3, 64, FP32),
    ),
    "silu_not_rounded": (  # the bf16 rounding of silu before the product (the bit-faithfulness claim)
        "silu_mul.cpp", "silu_mul",
        "store(o + i, mul(round_as<T>(silu(load(g + i))), load(u + i)));",
        "store(o + i, mul(silu(load(g + i)), load(u + i)));",
        lambda k: check_silu_mul(k, 1, 1536, BF16),
    ),
    "skinny_drops_tail": (
        "skinny_linear.cpp", "skinny_linear",
        "for (int64_t k = full; k < K; ++k) s +=", "for (int64_t k = full; k < K - 1; ++k) s +=",
        lambda k: check_skinny_linear(k, 37, 100, 1, (FP32, FP32)),
    ),
}


def _declaration(function: str) -> str:
    header = (CSRC / "cpu_kernels.h").read_text()
    match = re.search(rf"^[^\n/#][^\n]*?\b{function}\(.*?\);", header, re.M | re.S)
    assert match, f"no declaration of {function} in cpu_kernels.h"
    return match.group(0)


@pytest.fixture(scope="module")
def mutants(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cpu_mutants")
    for header in CSRC.glob("*.h"):
        shutil.copy(header, folder)
    sources, declarations, entries = [], [], {}
    for name, (source, function, original, broken, _) in MUTANTS.items():
        text = (CSRC / source).read_text()
        assert text.count(original) == 1, f"mutation target {original!r} not found exactly once in {source}"
        renamed = entries[name] = f"{function}_{name}"
        path = folder / f"{name}.cpp"
        path.write_text(f"#define {function} {renamed}\n" + text.replace(original, broken))
        sources.append(str(path))
        declarations.append(_declaration(function).replace(f" {function}(", f" {renamed}(", 1))
    return build_mutants(folder, sources, entries, declarations, cpu_kernels.AVX2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name", list(MUTANTS))
def test_broken_cpu_kernel_is_caught(mutants, name):
    _, function, _, _, check = MUTANTS[name]
    real = cpu_kernels.AVX2.load()
    assert real is not None, "kvferry_cpu_kernels_avx2 is not built: run `python -m kvferry.kernels.build`"
    check(real)  # the check passes on the real kernel
    with pytest.raises(AssertionError):
        check(types.SimpleNamespace(**{function: getattr(mutants, name)}))
