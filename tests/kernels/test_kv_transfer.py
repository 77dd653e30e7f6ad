"""Gather a request's blocks into a transfer buffer and scatter them back: the Triton kernels
against the torch references (exact copies), and the references' own round trip."""

import pytest
import torch
from kernel_cases import AttnCase, paged_cache

from kvferry.kernels.kv_transfer import gather_kv_blocks_ref, scatter_kv_blocks_ref

CASES = [
    AttnCase(64, 1, 16, torch.float32, num_kv_heads=3),
    AttnCase(128, 1, 32, torch.bfloat16, num_kv_heads=2),
]


def test_reference_round_trip_moves_only_the_named_blocks():
    case = CASES[0]
    cache, _ = paged_cache(case, [64], "cpu", seed=0)
    block_ids = torch.tensor([5, 0, 3], dtype=torch.int64)
    buffer = gather_kv_blocks_ref(cache, block_ids)
    assert buffer.shape == (2, 3, case.block_size, case.num_kv_heads, case.head_dim)
    assert buffer.is_contiguous()
    assert torch.equal(buffer[1, 0], cache[1, 5])
    target = torch.zeros_like(cache)
    scatter_kv_blocks_ref(buffer, target, torch.tensor([1, 2, 6], dtype=torch.int64))
    assert torch.equal(target[:, [1, 2, 6]], cache[:, [5, 0, 3]])
    assert not target[:, [0, 3, 4]].any()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gather_and_scatter_match_reference(case, device):
    pytest.importorskip("triton")
    from kvferry.kernels.kv_transfer import gather_kv_blocks, scatter_kv_blocks

    cache, _ = paged_cache(case, [6 * case.block_size], device, seed=case.seed)
    block_ids = torch.tensor([4, 1, 6, 0], dtype=torch.int64, device=device)
    buffer = gather_kv_blocks(cache, block_ids)
    assert torch.equal(buffer, gather_kv_blocks_ref(cache, block_ids))
    target, expected = torch.zeros_like(cache), torch.zeros_like(cache)
    dest_ids = torch.tensor([2, 7, 3, 5], dtype=torch.int64, device=device)
    scatter_kv_blocks(buffer, target, dest_ids)
    scatter_kv_blocks_ref(buffer, expected, dest_ids)
    assert torch.equal(target, expected)
    # A cache view whose blocks are contiguous but which is not (one layer of a [layers, 2, ...] stack).
    stack = torch.stack([torch.zeros_like(cache), cache], dim=1)[:, 1]
    assert torch.equal(gather_kv_blocks(stack, block_ids), gather_kv_blocks_ref(cache, block_ids))
