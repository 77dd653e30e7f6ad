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

# (prefix_len, query_len) of each prefill chunk, then the context length of each decode (with its new token)
BATCHES = {
    "mixed": ([(0, 21), (19, 12)], [1, 16, 40]),
    "prefill-only": ([(33, 9)], []),
    "decode-only": ([], [7, 32, 33]),
}


def build_batch(case: AttnCase, prefills, decode_lens, device):
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
    fields = dict(block_tables=None, context_lens=None, decode_slots=None, decode_mask=None)
    if decode_lens:
        tensors = build_decode_metadata(decode_tables, decode_lens, case.block_size)
        fields = {k: None if t is None else t.to(device) for k, t in zip(fields, tensors)}
    attn = AttentionMetadata(torch.cat(slot_mapping), chunks, start, **fields)
    num_tokens = start + len(decode_lens)
    qkv = randn(num_tokens, case.num_heads + 2 * case.num_kv_heads, case.head_dim, dtype=case.dtype, device=device, seed=9)
    q = qkv[:, : case.num_heads]
    k = qkv[:, case.num_heads : case.num_heads + case.num_kv_heads]
    v = qkv[:, case.num_heads + case.num_kv_heads :]
    return cache, attn, q, k, v


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("case", [AttnCase(64, 3, 16, torch.float32), AttnCase(128, 8, 32, torch.bfloat16)], ids=str)
def test_triton_path_matches_reference(batch, case, device):
    cache, attn, q, k, v = build_batch(case, *BATCHES[batch], device)
    ref_cache = cache.clone()
    expected = paged_attention_ref(q, k, v, ref_cache, attn, case.head_dim**-0.5)
    out = paged_attention_triton(q, k, v, cache, attn, case.head_dim**-0.5)
    assert torch.equal(cache, ref_cache)
    assert_close(out, expected, case.dtype)


def test_prefill_fields_given_or_derived_agree(device):
    case = AttnCase(64, 3, 16, torch.float32)
    prefills, decode_lens = BATCHES["mixed"]
    cache, attn, q, k, v = build_batch(case, prefills, decode_lens, device)
    tables = [t for t in paged_cache(case, [p + n for p, n in prefills] + decode_lens, device, case.seed)[1]]
    fields = build_prefill_metadata(tables[: len(prefills)], [n for _, n in prefills], [p + n for p, n in prefills])
    given = dataclasses.replace(
        attn, **dict(zip(["prefill_block_tables", "prefill_query_starts", "prefill_context_lens"], [t.to(device) for t in fields]))
    )
    derived_out = paged_attention_triton(q, k, v, cache.clone(), attn, 0.125)
    given_out = paged_attention_triton(q, k, v, cache.clone(), given, 0.125)
    assert torch.equal(derived_out, given_out)
