"""The x86 CPU features kvferry picks its CPU paths by, read once from ``/proc/cpuinfo``.

``ONEDNN_MAX_CPU_ISA`` caps them, as it caps oneDNN: set to ``AVX2`` (or lower) it hides every AVX-512
feature from kvferry too, so an AVX512 machine runs exactly the paths an AVX2-only one would (tests use
it to check both kinds of CPU on one machine). kvferry and oneDNN must agree: a bf16 weight reorder that
kvferry believes supported but oneDNN was capped below fails with a traceback.
"""

from __future__ import annotations

import functools
import os

# What oneDNN needs for its bf16 weight reorder and GEMMs (its own error message names these).
ONEDNN_BF16 = (("avx512bw", "avx512vl", "avx512dq"), ("avx_ne_convert",))
_AVX512_CAPS = ("AVX512", "AVX10")  # ONEDNN_MAX_CPU_ISA values that keep AVX-512 (AVX512_CORE_BF16, ...)


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    flags = frozenset(line.partition(":")[2].split())
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and cap != "ALL" and not cap.startswith(_AVX512_CAPS):
        flags = frozenset(f for f in flags if not f.startswith(("avx512", "amx", "avx_ne", "avx_vnni")))
    if cap.startswith(("SSE", "DEFAULT")) or cap == "AVX":
        flags = flags - {"avx2", "fma", "f16c"}
    return flags


def has(*names: str) -> bool:
    return set(names) <= cpu_flags()


def has_avx2() -> bool:
    """AVX2 with FMA and F16C: what the AVX2 kernels are compiled for (every x86-64 since ~2013)."""
    return has("avx2", "fma", "f16c")


def has_avx512_bf16() -> bool:
    return has("avx512f", "avx512bw", "avx512vl", "avx512_bf16")


def has_amx_bf16() -> bool:
    """Whether oneDNN runs bf16 products on AMX tiles (not capped below AMX by ONEDNN_MAX_CPU_ISA)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    allowed = cap in ("", "ALL") or "AMX" in cap or cap.startswith("AVX10")
    return allowed and has("amx_bf16", "amx_tile")


def has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 linears (and their weight reorder) on this CPU."""
    return any(has(*group) for group in ONEDNN_BF16)


def describe() -> str:
    """A short line for logs and benchmark headers: the features the paths are chosen by."""
    names = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16")
    present = [n for n in names if n in cpu_flags()]
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return " ".join(present) + (f" (capped by ONEDNN_MAX_CPU_ISA={cap})" if cap else "")
