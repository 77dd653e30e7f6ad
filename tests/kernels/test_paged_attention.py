"""The dispatcher's Triton composition (store K/V, prefill chunks, decodes) against
``paged_attention_ref`` on mixed batches built as the model runner builds them."""

import dataclasses

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from kernel_cases import AttnCase, assert_close, paged_cache, randn  # noqa: E402

from kvferry.kernels.attention import (  # noqa: E402
    AttentionMetadata,
    PrefillChunk,
    build_decode_metadata,
    build_prefill_metadata,
    context_slots,
    paged_attention_ref,
)
from kvferry.kernels.dispatch import paged_attention_triton  # noqa: E402

# Per batch: (prefix_len, query_len) of each prefill chunk; context length (new token included) of
# each decode.
BATCHES = {
    "mixed": ([(0, 21), (19, 12)], [1, 16, 40]),
    "prefill-only": ([(33, 9)], []),
    "decode-only": ([], [7, 32, 33]),
}
CASES = [AttnCase(64, 3, 16, torch.float32), AttnCase(128, 8, 32, torch.bfloat16)]


def build_batch(case: AttnCase, prefills: list[tuple[int, int]], decode_lens: list[int], device: str):
    """Cache, metadata (prefill tables left for the dispatcher to derive), q/k/v as views of one
    fused projection, and the block tables."""
    context_lens = [p + q for p, q in prefills] + decode_lens
    cache, tables = paged_cache(case, context_lens, device, seed=case.seed)
    chunks, slot_mapping, start = [], [], 0
    for (prefix_len, query_len), table in zip(prefills, tables):
        slots = context_slots(table, prefix_len + query_len, case.block_size).to(device)
        chunks.append(PrefillChunk(start, query_len, prefix_len + query_len, slots if prefix_len else None))
        slot_mapping.append(slots[prefix_len:])
        start += query_len
    decode_tables = tables[len(prefills) :]
    for n, table in zip(decode_lens, decode_tables):
        slot_mapping.append(context_slots(table, n, case.block_size)[-1:].to(device))
    decode = [None] * 4
    if decode_lens:
        built = build_decode_metadata(decode_tables, decode_lens, case.block_size)
        decode = [None if t is None else t.to(device) for t in built]
    attn = AttentionMetadata(torch.cat(slot_mapping), chunks, start, *decode)
    h, kvh = case.num_heads, case.num_kv_heads
    qkv = randn(start + len(decode_lens), h + 2 * kvh, case.head_dim, dtype=case.dtype, device=device, seed=9)
    return cache, attn, (qkv[:, :h], qkv[:, h : h + kvh], qkv[:, h + kvh :]), tables


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_path_matches_reference(batch, case, device):
    cache, attn, qkv, _ = build_batch(case, *BATCHES[batch], device)
    ref_cache = cache.clone()
    expected = paged_attention_ref(*qkv, ref_cache, attn, case.head_dim**-0.5)
    out = paged_attention_triton(*qkv, cache, attn, case.head_dim**-0.5)
    assert torch.equal(cache, ref_cache)
    assert_close(out, expected, case.dtype)


def test_prefill_fields_given_or_derived_agree(device):
    prefills, decode_lens = BATCHES["mixed"]
    cache, attn, qkv, tables = build_batch(CASES[0], prefills, decode_lens, device)
    query_lens, context_lens = [q for _, q in prefills], [p + q for p, q in prefills]
    fields = build_prefill_metadata(tables[: len(prefills)], query_lens, context_lens)
    names = ["prefill_block_tables", "prefill_query_starts", "prefill_context_lens"]
    given = dataclasses.replace(attn, **{n: t.to(device) for n, t in zip(names, fields)})
    derived_out = paged_attention_triton(*qkv, cache.clone(), attn, 0.125)
    given_out = paged_attention_triton(*qkv, cache.clone(), given, 0.125)
    assert torch.equal(derived_out, given_out)
