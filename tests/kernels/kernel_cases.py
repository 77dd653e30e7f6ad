"""Shared builders for the kernel tests: random paged caches with scattered block tables."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

# Comparison tolerances against the torch references. bf16 allows a couple of ulps: the interpreter
# truncates fp32 -> bf16 where a GPU rounds to nearest even, and the references round at other points.
TOLERANCES = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@dataclass(frozen=True)
class AttnCase:
    head_dim: int
    group: int  # query heads per KV head
    block_size: int
    dtype: torch.dtype
    num_kv_heads: int = 2

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads * self.group

    @property
    def seed(self) -> int:  # deterministic per case (str hashes are salted per process)
        return self.head_dim * 100 + self.group * 10 + self.block_size + (self.dtype == torch.bfloat16)

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"d{self.head_dim}-g{self.group}-bs{self.block_size}-{dtype}"


# A sample of the grid (head dims x GQA ratios x block sizes x dtypes) touching every value of each
# axis in several combinations; the full cross product runs under the `slow` mark.
SAMPLED_CASES = [
    AttnCase(64, 1, 16, torch.float32),
    AttnCase(128, 3, 32, torch.bfloat16),
    AttnCase(64, 8, 32, torch.float32),
    AttnCase(128, 1, 16, torch.bfloat16),
    AttnCase(64, 3, 16, torch.bfloat16),
    AttnCase(128, 8, 16, torch.float32),
]
FULL_GRID = [
    AttnCase(d, g, bs, dt)
    for d in (64, 128)
    for g in (1, 3, 8)
    for bs in (16, 32)
    for dt in (torch.float32, torch.bfloat16)
]


def paged_cache(
    case: AttnCase, context_lens: list[int], device: str, seed: int, spare_blocks: int = 3
) -> tuple[torch.Tensor, list[list[int]]]:
    """A random cache and one block table per sequence, blocks shuffled so no table is contiguous.

    Every cache entry, in use or not, holds random data, so a kernel that reads past a context
    length or through the wrong block picks up garbage rather than zeros.
    """
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // case.block_size) for n in context_lens]
    num_blocks = sum(needed) + spare_blocks
    shape = (2, num_blocks, case.block_size, case.num_kv_heads, case.head_dim)
    cache = torch.randn(shape, generator=gen).to(device=device, dtype=case.dtype)
    order = list(range(num_blocks))
    random.Random(seed).shuffle(order)
    tables, used = [], 0
    for n in needed:
        tables.append(order[used : used + n])
        used += n
    return cache, tables


def randn(*shape: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), **TOLERANCES[dtype])
