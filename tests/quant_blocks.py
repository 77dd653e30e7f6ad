"""Quantized test weights for the quant kernel and model tests: random GGUF blocks of every supported type.

Every byte of a block is drawn at random (so every nibble, high bit and 6-bit scale pattern occurs),
then the fp16 scale fields are overwritten with small finite values; Q8_0/Q4_0/Q4_1 also come from
gguf's own quantizer applied to normal floats (gguf has no K-quant quantizer).
"""

from __future__ import annotations

import numpy as np
import torch

from kvferry.kernels.quant import QTYPES, QuantWeight

# ggml type -> [(byte offset of an fp16 field, low, high)]: d (and m / dmin) of each block
_FP16_FIELDS = {
    8: [(0, -0.02, 0.02)],
    2: [(0, -0.02, 0.02)],
    3: [(0, 0.001, 0.01), (2, -0.05, 0.05)],
    12: [(0, 0.0001, 0.002), (2, 0.0001, 0.002)],
    13: [(0, 0.0001, 0.002), (2, 0.0001, 0.002)],
    14: [(208, -0.002, 0.002)],
}
NAMES = {name: qtype for qtype, (name, _, _) in QTYPES.items()}


def random_blocks(qtype: int, rows: int, cols: int, seed: int = 0) -> torch.Tensor:  # uint8 [rows, row_bytes]
    g = np.random.default_rng(seed)
    values, nbytes = QTYPES[qtype][1:]
    raw = g.integers(0, 256, size=(rows, cols // values, nbytes), dtype=np.uint8)
    for offset, low, high in _FP16_FIELDS[qtype]:
        field = g.uniform(low, high, size=(rows, cols // values)).astype(np.float16)
        raw[..., offset : offset + 2] = field[..., None].view(np.uint8)
    return torch.from_numpy(raw.reshape(rows, -1).copy())


def quantized_floats(qtype: int, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """gguf's quantizer on N(0, 0.05) floats (Q8_0, Q4_0, Q4_1 only)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    w = np.random.default_rng(seed).normal(0, 0.05, size=(rows, cols)).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(quantize(w, GGMLQuantizationType(qtype))))


def weight(qtype: int, rows: int, cols: int, seed: int = 0) -> QuantWeight:
    return QuantWeight([(qtype, random_blocks(qtype, rows, cols, seed))], cols)


def in_features_for(qtype: int) -> list[int]:
    """Row lengths to test: one block, a few, and SmolLM2's (576 is 18 blocks of 32; 1536 is 6 of 256)."""
    return [32, 96, 576] if QTYPES[qtype][1] == 32 else [256, 512, 1536]
