"""Block accounting: allocation, append, free, prefix sharing, eviction and the integrity check."""

import pytest

from kvferry.engine.block_manager import BlockManager
from kvferry.engine.request import Request
from kvferry.engine.sampling import SamplingParams


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams())


def cache_prompt(bm: BlockManager, rid: str, tokens: list[int]) -> None:
    """A request over ``tokens`` computed whole and freed: its full blocks stay in the prefix cache."""
    req = make_request(rid, tokens)
    bm.allocate(req)
    req.num_computed_tokens = req.num_tokens
    bm.mark_computed(req)
    bm.free(req)


def test_allocate_append_free_roundtrip():
    bm = BlockManager(num_blocks=8, block_size=4)
    req = make_request("a", range(10))  # 3 blocks
    assert bm.allocate(req) == req.block_table and len(req.block_table) == 3
    assert bm.num_used_blocks == 3 and bm.num_free_blocks == 5
    req.num_computed_tokens = 10
    assert bm.append_slots(req, 2)  # 12 tokens still fit in 3 blocks
    assert len(req.block_table) == 3
    assert bm.append_slots(req, 3)  # 13 tokens need a 4th block
    assert len(req.block_table) == 4
    bm.check_integrity([req])
    bm.free(req)
    assert bm.num_used_blocks == 0 and req.block_table == []
    bm.check_integrity()


def test_allocate_returns_none_without_partial_state():
    bm = BlockManager(num_blocks=2, block_size=4)
    req = make_request("a", range(9))  # needs 3 blocks
    assert bm.allocate(req) is None
    assert req.block_table == [] and bm.num_free_blocks == 2
    bm.check_integrity([req])


def test_prefix_blocks_are_shared_once_computed():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_request("a", list(range(12)) + [100])
    bm.allocate(a)
    b = make_request("b", list(range(12)) + [200])
    bm.allocate(b)
    assert b.num_cached_tokens == 0, "blocks not yet computed must not be shared"
    bm.free(b)
    a.num_computed_tokens = a.num_tokens
    bm.mark_computed(a)
    c = make_request("c", list(range(12)) + [300, 301])
    bm.allocate(c)
    assert c.num_cached_tokens == 12
    assert c.block_table[:3] == a.block_table[:3]
    assert all(bm.blocks[i].ref_count == 2 for i in a.block_table[:3])
    bm.check_integrity([a, c])
    bm.free(a)
    bm.free(c)
    bm.check_integrity()


def test_last_token_is_never_served_from_cache():
    bm = BlockManager(num_blocks=16, block_size=4)
    cache_prompt(bm, "a", range(8))
    b = make_request("b", range(8))  # identical, block aligned
    bm.allocate(b)
    assert b.num_cached_tokens == 4  # the second block is recomputed so the last token has logits


def test_freed_prefix_survives_until_evicted():
    bm = BlockManager(num_blocks=4, block_size=4)
    cache_prompt(bm, "a", range(9))
    hit = make_request("b", list(range(8)) + [7])
    bm.allocate(hit)
    assert hit.num_cached_tokens == 8
    bm.free(hit)
    big = make_request("c", [50 + i for i in range(16)])  # needs every block: evicts the prefix
    assert bm.allocate(big) is not None
    bm.free(big)
    again = make_request("d", list(range(8)) + [7])
    bm.allocate(again)
    assert again.num_cached_tokens == 0
    bm.check_integrity([again])


def test_integrity_check_catches_corruption():
    bm = BlockManager(num_blocks=4, block_size=4)
    req = make_request("a", range(5))
    bm.allocate(req)
    bm.blocks[req.block_table[0]].ref_count += 1
    with pytest.raises(AssertionError):
        bm.check_integrity([req])
