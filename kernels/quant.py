"""GGUF weights kept in their block formats, and the kernels that multiply by them (``csrc/quant_*``).

Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K (``QTYPES``) stay as ggml's bytes in memory: a ``QuantWeight``
holds a linear's ``[out, in]`` weight as uint8 rows of blocks (blocks run along ``in``, so selecting or
permuting rows is exact), possibly as several segments of different types (a fused q/k/v whose parts
were quantized differently).

- ``quant_linear``: ``x @ W.T + b`` for a few tokens (decode). As llama.cpp does, the kernel quantizes
  ``x`` to Q8 blocks of 32 and runs byte dot products against the weight's quants: the bytes streamed
  are the quantized ones. Its torch reference is ``quant_linear_ref`` (dequantize, then matmul; with
  ``quantize_activations=True`` it also rounds ``x`` as the kernel does, to hold the kernel to float
  rounding in tests).
- ``dequantize``: a weight (or some of its rows, for embedding lookups) back to float32/bfloat16, for
  prompt-sized products and lookups; its reference is ``gguf.quants.dequantize``.

One source is built twice (``kernels/build.py``): ``AVX512`` (AVX-512 with VNNI: ``vpdpbusd``) and
``AVX2`` (AVX2 + FMA + F16C: ``vpmaddubsw``); ``load()`` returns the best one the CPU has
(``cpu_features``; ``ONEDNN_MAX_CPU_ISA=AVX2`` picks the AVX2 build on an AVX-512 machine). Where none
is built the references run (correct, and slow: they dequantize the whole weight on every call).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvferry.kernels import cpu_features
from kvferry.kernels.cpu_extension import LazyExtension

# ggml type id -> (name, values per block, bytes per block)
QTYPES = {
    8: ("Q8_0", 32, 34),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}
MAX_TOKENS = 64  # beyond this a product is compute-bound: dequantized tiles and oneDNN/MKL take it

_SOURCES = ["quant_bindings.cpp", "quant_linear.cpp", "quant_dequantize.cpp"]
_COMMON = ["-O3", "-fopenmp", "-mavx2", "-mfma", "-mf16c"]
AVX512 = LazyExtension(
    "kvferry_quant_avx512",
    [*_SOURCES, "quant_amx.cpp"],  # AMX functions carry their own target attributes
    [*_COMMON, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
    ["-fopenmp"],
    unavailable_reason=lambda: None if cpu_features.has("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
    else "CPU has no AVX-512 VNNI",
    fallback="the AVX2 quant kernels",
)
AVX2 = LazyExtension(
    "kvferry_quant_avx2",
    _SOURCES,
    _COMMON,
    ["-fopenmp"],
    unavailable_reason=lambda: None if cpu_features.has_avx2() else "CPU has no AVX2/FMA/F16C",
    fallback="the dequantize-then-matmul references",
)
EXTENSIONS = [AVX512, AVX2]  # best first


def load():
    """The best built quant extension this CPU can run (its ``isa`` says which), or None."""
    for ext in EXTENSIONS:
        module = ext.load()
        if module is not None:
            return module
    return None


def available() -> bool:
    return load() is not None


def block_shape(qtype: int) -> tuple[int, int]:
    """(values, bytes) per block of a supported ggml type."""
    if qtype not in QTYPES:
        raise ValueError(f"ggml type {qtype} is not kept quantized (supported: "
                         + ", ".join(n for n, _, _ in QTYPES.values()) + ")")
    return QTYPES[qtype][1:]


@dataclass
class QuantWeight:
    """A ``[out_features, in_features]`` weight as segments of GGUF block rows, in output order."""

    segments: list[tuple[int, torch.Tensor]]  # (ggml type, uint8 [rows, row_bytes]) each
    in_features: int

    def __post_init__(self) -> None:
        for qtype, data in self.segments:
            values, nbytes = block_shape(qtype)
            if self.in_features % values or data.dtype != torch.uint8 or data.dim() != 2 \
                    or data.shape[1] != self.in_features // values * nbytes:
                raise ValueError(f"{QTYPES[qtype][0]} rows of {self.in_features} values must be uint8 "
                                 f"[rows, {self.in_features // values * nbytes}], got {data.dtype} "
                                 f"{list(data.shape)}")

    @property
    def out_features(self) -> int:
        return sum(data.shape[0] for _, data in self.segments)

    @property
    def nbytes(self) -> int:
        return sum(data.numel() for _, data in self.segments)

    @property
    def qtypes(self) -> list[int]:
        return [qtype for qtype, _ in self.segments]

    @property
    def datas(self) -> list[torch.Tensor]:
        return [data for _, data in self.segments]

    def describe(self) -> str:
        return "+".join(dict.fromkeys(QTYPES[q][0] for q in self.qtypes))

    @staticmethod
    def cat(weights: list[QuantWeight]) -> QuantWeight:
        """Row-wise concatenation (fused q/k/v, gate/up); neighbouring segments of one type merge."""
        assert len({w.in_features for w in weights}) == 1
        segments: list[tuple[int, torch.Tensor]] = []
        for qtype, data in (s for w in weights for s in w.segments):
            if segments and segments[-1][0] == qtype:
                segments[-1] = (qtype, torch.cat([segments[-1][1], data]))
            else:
                segments.append((qtype, data))
        return QuantWeight(segments, weights[0].in_features)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """uint8 rows at ``index`` (one-segment weights only: an embedding table)."""
        assert len(self.segments) == 1
        return self.segments[0][1].index_select(0, index)


def dequantize_ref(qtype: int, data: torch.Tensor, in_features: int) -> torch.Tensor:
    """gguf's numpy dequantize of uint8 block rows: float32 ``[rows, in_features]``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    out = gguf_dequantize(data.numpy(), GGMLQuantizationType(qtype))
    return torch.from_numpy(np.ascontiguousarray(out)).reshape(data.shape[0], in_features)


class DequantBuffer:
    """One reused buffer that the prompt-sized products of a model dequantize their weight into, layer
    after layer (a fresh tensor of a few MB per call cost more in page faults than the dequantization).
    The products of one model run one at a time: one buffer per model."""

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def take(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:  # [rows, cols], contents undefined
        buf = self._buffers.get(dtype)
        if buf is None or buf.numel() < rows * cols:
            buf = self._buffers[dtype] = torch.empty(rows * cols, dtype=dtype)
        return buf[: rows * cols].view(rows, cols)


def dequantize(weight: QuantWeight, dtype: torch.dtype = torch.float32, buffer: DequantBuffer | None = None
               ) -> torch.Tensor:
    """The whole weight as ``[out, in]`` in ``dtype`` (float32 or bfloat16): a new tensor, or a view of
    ``buffer`` (valid until its next use)."""
    module = load()
    if buffer is None or module is None or dtype not in (torch.float32, torch.bfloat16):
        return torch.cat([dequantize_rows(q, d, weight.in_features, dtype) for q, d in weight.segments])
    out = buffer.take(weight.out_features, weight.in_features, dtype)
    row = 0
    for qtype, data in weight.segments:
        module.quant_dequantize_into(data, qtype, out[row : row + data.shape[0]])
        row += data.shape[0]
    return out


def dequantize_rows(qtype: int, data: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    module = load()
    if module is not None and dtype in (torch.float32, torch.bfloat16):
        return module.quant_dequantize(data, qtype, in_features, dtype)
    return dequantize_ref(qtype, data, in_features).to(dtype)


def quant_linear(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` (float32 bias) in x's dtype (float32 or bfloat16), any leading shape; needs
    ``load()``."""
    rows = x.reshape(-1, x.shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    out = load().quant_linear(rows, weight.datas, weight.qtypes, _EMPTY if bias is None else bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def quantize_activations_ref(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) after the kernel's Q8 rounding: blocks of 32, scale max|x| / 127, round half to even."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    max_abs = blocks.abs().amax(-1, keepdim=True)
    # tensor / tensor: torch computes scalar / tensor as scalar * reciprocal, which rounds differently
    inv = torch.where(max_abs != 0, torch.full_like(max_abs, 127.0) / max_abs, torch.zeros_like(max_abs))
    q = torch.round(blocks * inv)
    return (q * (max_abs / torch.full_like(max_abs, 127.0))).reshape(x.shape)


def quant_linear_ref(
    x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None = None, quantize_activations: bool = False
) -> torch.Tensor:
    """Dequantize (gguf's numpy reference), then matmul in float64; returned in x's dtype."""
    w = torch.cat([dequantize_ref(q, d, weight.in_features) for q, d in weight.segments]).double()
    xs = quantize_activations_ref(x) if quantize_activations else x.float()
    out = xs.double() @ w.T
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)


_EMPTY = torch.empty(0)
