"""The dispatcher: CPU tensors take the torch references (or the C++ CPU kernels where built); prefill tables derived from the chunks
equal the ones the metadata builder makes. Needs no Triton."""

import torch
from kernel_cases import AttnCase, paged_cache

from kvferry.kernels import dispatch
from kvferry.kernels.attention import AttentionMetadata, PrefillChunk, build_prefill_metadata, context_slots
from kvferry.kernels.kv_transfer import gather_kv_blocks_ref
from kvferry.kernels.rms_norm import rms_norm_ref


def test_cpu_tensors_take_the_references():
    case = AttnCase(64, 1, 16, torch.float32)
    cache, _ = paged_cache(case, [40], "cpu", seed=0)
    ids = torch.tensor([2, 0], dtype=torch.int64)
    assert not dispatch._use_triton(cache)
    assert torch.equal(dispatch.gather_kv_blocks(cache, ids), gather_kv_blocks_ref(cache, ids))
    target = torch.zeros_like(cache)
    dispatch.scatter_kv_blocks(dispatch.gather_kv_blocks(cache, ids), target, ids)
    assert torch.equal(target[:, [2, 0]], cache[:, [2, 0]])
    # RMSNorm takes the C++ CPU kernel where it is built: the same sum of squares in another order, so
    # within float rounding of the reference, not bit-equal (seeded: the same input in any test order).
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 64, generator=g), torch.rand(64, generator=g)
    for got, want in zip(dispatch.rms_norm(x, w, 1e-6, x), rms_norm_ref(x, w, 1e-6, x)):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)


def test_derived_prefill_tables_match_the_builder():
    block_size = 4
    tables = [[9, 2, 5], [7], [3, 8, 1, 6]]
    shape = [(0, 10), (2, 1), (5, 9)]  # (prefix_len, query_len); the first has no cached prefix
    chunks, slot_mapping, start = [], [], 0
    for (prefix_len, query_len), table in zip(shape, tables):
        slots = context_slots(table, prefix_len + query_len, block_size)
        chunks.append(PrefillChunk(start, query_len, prefix_len + query_len, slots if prefix_len else None))
        slot_mapping.append(slots[prefix_len:])
        start += query_len
    attn = AttentionMetadata(torch.cat(slot_mapping), chunks, start, None, None, None, None)
    derived = dispatch.prefill_tables(attn, block_size)
    built = build_prefill_metadata(tables, [q for _, q in shape], [p + q for p, q in shape])
    for d, b in zip(derived, built):
        assert d.dtype == b.dtype and torch.equal(d, b)


def test_every_triton_kernel_module_is_reloaded_for_the_interpreter():
    # A kernel module missing from the conftest's reload list keeps the stand-in ``triton.jit`` when
    # an earlier test folder imported it, and its kernels fail only in a full run.
    import pathlib

    from kernel_modules import KERNEL_MODULES

    folder = pathlib.Path(dispatch.__file__).parent
    using = {f"kvferry.kernels.{p.stem}" for p in folder.glob("*.py")
             if "kvferry.kernels._triton import" in p.read_text() or p.stem == "_triton"}
    assert using <= set(KERNEL_MODULES), sorted(using - set(KERNEL_MODULES))
