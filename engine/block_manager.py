"""Paged KV block accounting with reference counts and prefix caching. Knows nothing of tensors.

A block holds ``block_size`` token slots. Full blocks whose K/V has been computed are registered under a
chained hash (the hash of the previous block and this block's token ids), so a later request whose
prompt starts with the same tokens shares them (ref count > 1) instead of recomputing them.

A free block keeps its hash until it is handed out again, so a finished request's prefix stays reusable
until memory is needed: free blocks form an LRU queue and the least recently freed is evicted first.
A request's blocks are freed tail first, so shared prefixes outlive their tails.

Invariant (``check_integrity``): every block is either free (ref 0) or used (ref > 0), never both;
free + used == total; each used block's ref count equals the number of block tables that hold it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from kvferry.engine.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and computed
    token_ids: tuple[int, ...] = ()  # the tokens behind `hash`, checked on every hit


def chain_hash(prev_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((prev_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # chained hash -> block id
        self.num_prefix_hits = 0  # blocks served from the prefix cache since creation (for tests/metrics)

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    # ---- allocation ----------------------------------------------------------------------------
    def allocate(
        self, request: Request, num_tokens: int | None = None, use_prefix_cache: bool = True
    ) -> list[int] | None:
        """Blocks for the request's first ``num_tokens`` tokens (default: all it has), or None if no room.

        Leading full blocks found in the prefix cache are shared; ``request.num_cached_tokens`` says how
        many tokens they cover. At least one token is always left to compute, so the request gets logits.
        """
        assert not request.block_table, f"request {request.request_id} already holds blocks"
        num_tokens = request.num_tokens if num_tokens is None else num_tokens
        use_cache = self.enable_prefix_caching and use_prefix_cache
        hits = self._prefix_hits(request, num_tokens) if use_cache else []
        # Hits on free blocks take them off the free list; count only what must come from it.
        from_free = self.blocks_for(num_tokens) - len(hits) + sum(
            1 for b in hits if self.blocks[b].ref_count == 0
        )
        if from_free > len(self._free):
            return None
        table = []
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            table.append(block_id)
        for _ in range(self.blocks_for(num_tokens) - len(hits)):
            table.append(self._take_free_block())
        self.num_prefix_hits += len(hits)
        request.block_table = table
        request.num_cached_tokens = len(hits) * self.block_size
        return table

    def append_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the block table to hold ``num_computed_tokens + num_new_tokens`` tokens; False if no room."""
        needed = self.blocks_for(request.num_computed_tokens + num_new_tokens) - len(request.block_table)
        if needed > len(self._free):
            return False
        for _ in range(needed):
            request.block_table.append(self._take_free_block())
        return True

    def free(self, request: Request) -> None:
        for block_id in reversed(request.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        request.block_table = []
        request.num_hashed_blocks = 0

    def mark_computed(self, request: Request) -> None:
        """Register the request's newly full, computed blocks in the prefix cache (each block once)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        start = request.num_hashed_blocks
        prev_hash = self.blocks[request.block_table[start - 1]].hash if start else None
        for i in range(start, num_full):
            block = self.blocks[request.block_table[i]]
            if block.hash is None:
                tokens = self._block_tokens(request, i)
                block.hash, block.token_ids = chain_hash(prev_hash, tokens), tokens
                # First writer wins: an identical block computed twice stays a private copy.
                self._cached.setdefault(block.hash, block.block_id)
            prev_hash = block.hash
        request.num_hashed_blocks = max(start, num_full)

    # ---- integrity -----------------------------------------------------------------------------
    def check_integrity(self, requests: Iterable[Request] = ()) -> None:
        """Raise AssertionError if the accounting is inconsistent (tests call this)."""
        used = [b for b in self.blocks if b.ref_count > 0]
        assert all(b.ref_count == 0 for b in (self.blocks[i] for i in self._free)), "free block in use"
        assert len(used) + len(self._free) == self.num_blocks, "free + used != total"
        assert all(b.ref_count >= 0 for b in self.blocks), "negative ref count"
        refs: dict[int, int] = {}
        holders = list(requests)
        for request in holders:
            for block_id in request.block_table:
                refs[block_id] = refs.get(block_id, 0) + 1
        if holders or not used:
            for block in self.blocks:
                assert refs.get(block.block_id, 0) == block.ref_count, (
                    f"block {block.block_id}: ref count {block.ref_count}, "
                    f"held by {refs.get(block.block_id, 0)} block tables"
                )
        for h, block_id in self._cached.items():
            assert self.blocks[block_id].hash == h, f"stale prefix-cache entry for block {block_id}"

    # ---- internals -----------------------------------------------------------------------------
    def _block_tokens(self, request: Request, index: int) -> tuple[int, ...]:
        start = index * self.block_size
        return tuple(request.token_id(i) for i in range(start, start + self.block_size))

    def _prefix_hits(self, request: Request, num_tokens: int) -> list[int]:
        # Never cover the last token: it must be computed to produce logits.
        max_blocks = (num_tokens - 1) // self.block_size
        hits, prev_hash = [], None
        for i in range(max_blocks):
            tokens = self._block_tokens(request, i)
            h = chain_hash(prev_hash, tokens)
            block_id = self._cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
            prev_hash = h
        return hits

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached prefix
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id
