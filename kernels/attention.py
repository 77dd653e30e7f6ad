"""Paged attention: metadata, KV store, prefill and decode attention (torch references = the CPU path).

KV cache layout, per layer: one tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(index 0 = K, 1 = V). Token slot ``s`` lives in block ``s // block_size`` at offset ``s % block_size``.

A batch is a flat run of tokens: first every prefill chunk (several tokens each, in order), then one
token per decoding request. The engine builds an ``AttentionMetadata`` once per step and every layer
reads it; anything derivable once per step (gather indices, masks) is computed here, not per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    """One request's chunk of new tokens, ``query_len`` of them, ending at ``context_len``."""

    query_start: int  # offset of the chunk's first token in the flat batch
    query_len: int
    context_len: int  # tokens in the cache after this chunk (cached prefix + chunk)
    # Slots of the whole context [context_len] int64, or None when the chunk is the whole context
    # (no cached prefix): then attention runs on the chunk's own K/V without touching the cache.
    context_slots: torch.Tensor | None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: the cache slot each new token's K/V goes to
    prefills: list[PrefillChunk]
    num_prefill_tokens: int
    # Decode part (one query token per request), None when the batch has no decodes.
    block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int32, rows padded with 0
    context_lens: torch.Tensor | None  # [num_decodes] int32, including the new token
    decode_slots: torch.Tensor | None  # [num_decodes, max_context_len] int64, padded with slot 0
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_context_len] bool, or None if no padding
    # Prefill part as the Triton kernel reads it (see build_prefill_metadata). Optional: the CPU path
    # never reads them, and on CUDA the dispatcher derives them from ``prefills`` when they are None
    # (per layer, so a CUDA engine should build them once per step).
    prefill_block_tables: torch.Tensor | None = None  # [num_prefills, max_blocks] int32, padded with 0
    prefill_query_starts: torch.Tensor | None = None  # [num_prefills + 1] int32, cumulative query_len
    prefill_context_lens: torch.Tensor | None = None  # [num_prefills] int32

    @property
    def num_decodes(self) -> int:
        return 0 if self.context_lens is None else int(self.context_lens.shape[0])


def build_decode_metadata(
    block_tables: list[list[int]], context_lens: list[int], block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Block tables, lengths, per-token gather slots and padding mask for the decode requests."""
    max_blocks = max(len(t) for t in block_tables)
    # One tensor from padded lists (a tensor per row costs ~5 us each: 0.3 ms a step at 64 rows).
    tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    max_len = max(context_lens)
    pos = torch.arange(max_len)
    slots = tables.long()[:, pos // block_size] * block_size + pos % block_size  # [B, max_len]
    valid = pos[None, :] < lens[:, None].long()
    slots = torch.where(valid, slots, torch.zeros_like(slots))
    mask = None if bool(valid.all()) else valid[:, None, None, :]
    return tables, lens, slots, mask


def build_prefill_metadata(
    block_tables: list[list[int]], query_lens: list[int], context_lens: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block tables, cumulative query starts and context lengths of the prefill chunks (Triton path)."""
    max_blocks = max(len(t) for t in block_tables)
    tables = torch.zeros(len(block_tables), max_blocks, dtype=torch.int32)
    for i, t in enumerate(block_tables):
        tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    starts = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    starts[1:] = torch.tensor(query_lens, dtype=torch.int32).cumsum(0)
    return tables, starts, torch.tensor(context_lens, dtype=torch.int32)


def context_slots(block_table: list[int], context_len: int, block_size: int) -> torch.Tensor:
    """Slots of the first ``context_len`` tokens of a request: [context_len] int64."""
    table = torch.tensor(block_table, dtype=torch.long)
    pos = torch.arange(context_len)
    return table[pos // block_size] * block_size + pos % block_size


def store_kv_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    flat[0].index_copy_(0, slot_mapping, key)
    flat[1].index_copy_(0, slot_mapping, value)


def _gather(kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # index_select copies whole rows; advanced indexing (flat[0][slots]) is ~10x slower on the CPU.
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    return flat[0].index_select(0, slots), flat[1].index_select(0, slots)


def prefill_attention_ref(
    query: torch.Tensor,  # [n, num_heads, head_dim]
    key: torch.Tensor,  # [n, num_kv_heads, head_dim] (the chunk's own keys)
    value: torch.Tensor,  # [n, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,
    chunk: PrefillChunk,
    scale: float,
) -> torch.Tensor:  # [n, num_heads, head_dim]
    n = chunk.query_len
    q = query.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
    if chunk.context_slots is None:
        k, v = key, value
        mask, causal = None, True
    else:
        k, v = _gather(kv_cache, chunk.context_slots)  # [ctx, KVH, D]
        # Query i sits at absolute position ctx - n + i and sees keys 0..ctx - n + i.
        q_pos = torch.arange(chunk.context_len - n, chunk.context_len)
        mask = torch.arange(chunk.context_len)[None, :] <= q_pos[:, None]
        causal = False
    k = k.transpose(0, 1).unsqueeze(0)
    v = v.transpose(0, 1).unsqueeze(0)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
    )
    return out[0].transpose(0, 1)


def decode_attention_ref(
    query: torch.Tensor,  # [num_decodes, num_heads, head_dim]
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_decodes, num_heads, head_dim]
    """Gathers each request's whole blocks (one ``index_select`` for K and V: block-sized row copies,
    not per-token indexing), and runs SDPA with a KV head's group of query heads as its query rows.

    That is the same attention as GQA with one query token (no causal mask is needed: every cached
    key precedes the new token), but SDPA's CPU kernel then reads each K/V row once per group instead
    of once per query head, and tiles G rows instead of one (~3x faster at batch 1, more at 64).
    """
    assert attn.block_tables is not None and attn.context_lens is not None
    num_decodes, num_heads, head_dim = query.shape
    num_kv_heads = kv_cache.shape[-2]
    # The longest context: the width of the slot table when it was built (no host sync), else the max.
    max_len = attn.decode_slots.shape[1] if attn.decode_slots is not None else int(attn.context_lens.max())
    kv = kv_cache.index_select(1, attn.block_tables.flatten())  # [2, B * max_blocks, block_size, KVH, D]
    kv = kv.view(2, num_decodes, -1, num_kv_heads, head_dim)[:, :, :max_len].transpose(2, 3)  # [2, B, KVH, L, D]
    q = query.reshape(num_decodes, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, KVH, G, D]
    out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=attn.decode_mask, scale=scale)
    return out.reshape(num_decodes, num_heads, head_dim)


# (query [B, H, D], kv_cache, attn, scale) -> [B, H, D]: one query token per decoding request
DecodeAttention = Callable[[torch.Tensor, torch.Tensor, "AttentionMetadata", float], torch.Tensor]


def paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    decode: DecodeAttention | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Store the new K/V, then attend: each prefill chunk, then all decodes at once (by ``decode``,
    ``decode_attention_ref`` unless given: the dispatcher passes its CPU kernel)."""
    decode = decode or decode_attention_ref
    store_kv_ref(key, value, kv_cache, attn.slot_mapping)
    if not attn.prefills:
        return decode(query, kv_cache, attn, scale)
    parts = []
    for chunk in attn.prefills:
        sl = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        parts.append(prefill_attention_ref(query[sl], key[sl], value[sl], kv_cache, chunk, scale))
    if attn.num_decodes:
        parts.append(decode(query[attn.num_prefill_tokens :], kv_cache, attn, scale))
    return torch.cat(parts) if len(parts) > 1 else parts[0]
