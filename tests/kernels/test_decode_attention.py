"""Paged decode attention: the Triton kernel against ``decode_attention_ref``."""

import random

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from kernel_cases import FULL_GRID, SAMPLED_CASES, AttnCase, assert_close, paged_cache, randn  # noqa: E402

from kvferry.kernels.attention import AttentionMetadata, build_decode_metadata  # noqa: E402
from kvferry.kernels.decode_attention import decode_attention, decode_attention_ref  # noqa: E402


def ragged_lens(block_size: int, seed: int) -> list[int]:
    """A single token, exactly one full block, a partial third block, and a random length."""
    rng = random.Random(seed)
    return [1, block_size, 2 * block_size + rng.randint(1, block_size - 1), rng.randint(2, 3 * block_size)]


def check_decode(
    decode_fn,
    case: AttnCase,
    device: str,
    seed: int,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> None:
    lens = ragged_lens(case.block_size, seed)
    cache, tables = paged_cache(case, lens, device, seed)
    block_tables, context_lens, slots, mask = build_decode_metadata(tables, lens, case.block_size)
    block_tables, context_lens = block_tables.to(device), context_lens.to(device)
    attn = AttentionMetadata(
        slot_mapping=torch.zeros(len(lens), dtype=torch.int64, device=device),
        prefills=[],
        num_prefill_tokens=0,
        block_tables=block_tables,
        context_lens=context_lens,
        decode_slots=slots.to(device),
        decode_mask=None if mask is None else mask.to(device),
    )
    query = randn(len(lens), case.num_heads, case.head_dim, dtype=case.dtype, device=device, seed=seed + 1)
    scale = case.head_dim**-0.5
    out = decode_fn(query, cache, block_tables, context_lens, scale, block_n=block_n, num_splits=num_splits)
    assert_close(out, decode_attention_ref(query, cache, attn, scale), case.dtype)


@pytest.mark.parametrize("case", SAMPLED_CASES, ids=str)
def test_decode_attention_matches_reference(case, device):
    check_decode(decode_attention, case, device, case.seed)


@pytest.mark.parametrize("block_n", [16, 64], ids=["tile-smaller-than-block", "tile-spans-blocks"])
def test_decode_attention_tile_sizes(block_n, device):
    check_decode(decode_attention, AttnCase(64, 3, 32, torch.float32), device, seed=7, block_n=block_n)


@pytest.mark.parametrize(
    "case,num_splits",
    [
        (AttnCase(64, 8, 16, torch.float32), 2),
        (AttnCase(128, 3, 32, torch.bfloat16), 3),
        (AttnCase(64, 1, 32, torch.float32), 8),
    ],
    ids=str,
)
def test_decode_attention_split_kv(case, num_splits, device):
    # Splits cover the table width in whole tiles (the last case: 6 splits of 16 tokens over 96), so
    # the 1-token and 1-block sequences leave trailing splits empty, which must weigh nothing.
    check_decode(decode_attention, case, device, seed=num_splits, num_splits=num_splits, block_n=16)


def test_decode_attention_writes_into_strided_out(device):
    case = AttnCase(64, 2, 16, torch.float32)
    cache, tables = paged_cache(case, [5, 20], device, seed=3)
    block_tables, context_lens, _, _ = build_decode_metadata(tables, [5, 20], case.block_size)
    query = randn(2, case.num_heads, case.head_dim, dtype=case.dtype, device=device, seed=4)
    wide = torch.zeros(2, case.num_heads * 2, case.head_dim, device=device)  # out is every other head
    expected = decode_attention(query, cache, block_tables.to(device), context_lens.to(device), 0.1)
    decode_attention(query, cache, block_tables.to(device), context_lens.to(device), 0.1, out=wide[:, ::2])
    assert torch.equal(wide[:, ::2], expected) and not wide[:, 1::2].any()


def test_decode_attention_rejects_wrong_dtypes(device):
    case = AttnCase(64, 1, 16, torch.float32)
    cache, tables = paged_cache(case, [5], device, seed=0)
    block_tables, context_lens, _, _ = build_decode_metadata(tables, [5], case.block_size)
    query = randn(1, case.num_heads, case.head_dim, dtype=case.dtype, device=device, seed=1)
    with pytest.raises(AssertionError):
        decode_attention(query, cache, block_tables.long().to(device), context_lens.to(device), 0.1)
    with pytest.raises(AssertionError):
        decode_attention(query.bfloat16(), cache, block_tables.to(device), context_lens.to(device), 0.1)


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_GRID, ids=str)
@pytest.mark.parametrize("seed", [11, 12])
def test_decode_attention_full_grid(case, seed, device):
    check_decode(decode_attention, case, device, seed)
