"""Prefill attention over a cached prefix plus a new chunk: the Triton kernel against
``prefill_attention_ref``, several chunks of one batch in one launch."""

import random

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from kernel_cases import FULL_GRID, SAMPLED_CASES, AttnCase, assert_close, paged_cache, randn  # noqa: E402

from kvferry.kernels.attention import PrefillChunk, build_prefill_metadata, context_slots  # noqa: E402
from kvferry.kernels.prefill_attention import prefill_attention, prefill_attention_ref  # noqa: E402
from kvferry.kernels.store_kv import store_kv_ref  # noqa: E402


def ragged_chunks(block_size: int, seed: int) -> list[tuple[int, int]]:
    """(prefix_len, query_len) per chunk: no prefix; a prefix ending mid-block; a block-aligned
    prefix; a one-token chunk after a prefix."""
    rng = random.Random(seed)
    return [
        (0, rng.randint(17, 40)),
        (block_size + rng.randint(1, block_size - 1), rng.randint(10, 35)),
        (2 * block_size, rng.randint(2, 20)),
        (rng.randint(1, 2 * block_size), 1),
    ]


def check_prefill(
    prefill_fn, case: AttnCase, device: str, seed: int, block_m: int = 16, block_n: int = 16
) -> None:
    chunk_lens = ragged_chunks(case.block_size, seed)
    context_lens = [p + q for p, q in chunk_lens]
    query_lens = [q for _, q in chunk_lens]
    cache, tables = paged_cache(case, context_lens, device, seed)
    num_tokens = sum(query_lens)
    shape_q = (num_tokens, case.num_heads, case.head_dim)
    shape_kv = (num_tokens, case.num_kv_heads, case.head_dim)
    query = randn(*shape_q, dtype=case.dtype, device=device, seed=seed + 1)
    key = randn(*shape_kv, dtype=case.dtype, device=device, seed=seed + 2)
    value = randn(*shape_kv, dtype=case.dtype, device=device, seed=seed + 3)
    chunks, start = [], 0
    for (prefix_len, query_len), table in zip(chunk_lens, tables):
        slots = context_slots(table, prefix_len + query_len, case.block_size).to(device)
        new = slice(start, start + query_len)
        store_kv_ref(key[new], value[new], cache, slots[prefix_len:])
        chunks.append(PrefillChunk(start, query_len, prefix_len + query_len, slots if prefix_len else None))
        start += query_len
    block_tables, query_starts, lens = build_prefill_metadata(tables, query_lens, context_lens)
    scale = case.head_dim**-0.5
    out = prefill_fn(
        query, cache, block_tables.to(device), query_starts.to(device), lens.to(device),
        max(query_lens), scale, block_m=block_m, block_n=block_n,
    )
    expected = []
    for c in chunks:
        sl = slice(c.query_start, c.query_start + c.query_len)
        expected.append(prefill_attention_ref(query[sl], key[sl], value[sl], cache, c, scale))
    assert_close(out, torch.cat(expected), case.dtype)


@pytest.mark.parametrize("case", SAMPLED_CASES, ids=str)
def test_prefill_attention_matches_reference(case, device):
    check_prefill(prefill_attention, case, device, case.seed)


@pytest.mark.parametrize("block_m,block_n", [(64, 64), (16, 32), (32, 16)])
def test_prefill_attention_tile_sizes(block_m, block_n, device):
    check_prefill(prefill_attention, AttnCase(64, 3, 16, torch.float32), device, 5, block_m, block_n)


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_GRID, ids=str)
@pytest.mark.parametrize("seed", [21, 22])
def test_prefill_attention_full_grid(case, seed, device):
    check_prefill(prefill_attention, case, device, seed)
