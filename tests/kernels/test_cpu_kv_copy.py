"""The KV transfer row copies (kernels/cpu_kv_copy.py): the C++ versions against their references,
bit for bit, on every row size and order the transport can hand them."""

import pytest
import torch

from kvferry.kernels import cpu_kv_copy


def test_it_builds_here():
    # It needs only g++: a build failure would silently put every KV transfer on the slower copies.
    assert cpu_kv_copy.load() is not None


def random_rows(num_rows: int, row_bytes: int, seed: int) -> torch.Tensor:  # any bit pattern, NaNs included
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num_rows, row_bytes), generator=g, dtype=torch.uint8)


# 6144: a SmolLM2 block of 16 tokens in bf16; 128: a multiple of the streaming-store width; 24 and 8:
# rows the streaming stores leave to memcpy; 3: not even a multiple of the 8-byte words of the reference.
ROW_BYTES = [6144, 128, 24, 8, 3]
ORDERS = {
    "ascending": [0, 1, 2, 3, 4, 5],  # one run: a single memcpy in pack_rows
    "reversed": [9, 8, 7, 6, 5, 4],
    "scattered": [3, 11, 4, 5, 0, 10],  # runs of 1 and 2
}


@pytest.mark.parametrize("row_bytes", ROW_BYTES)
@pytest.mark.parametrize("order", list(ORDERS))
def test_pack_rows_matches_the_reference(row_bytes, order):
    cache_rows, row_ids = random_rows(12, row_bytes, row_bytes), ORDERS[order]
    packed = cpu_kv_copy.pack_rows(b"\x12\x05head", cache_rows, row_ids)
    assert isinstance(packed, bytes)
    assert packed == cpu_kv_copy.pack_rows_ref(b"\x12\x05head", cache_rows, row_ids)
    assert packed == b"\x12\x05head" + cache_rows[row_ids].numpy().tobytes()


@pytest.mark.parametrize("row_bytes", ROW_BYTES)
@pytest.mark.parametrize("order", list(ORDERS))
def test_scatter_rows_matches_the_reference(row_bytes, order):
    row_ids = torch.tensor(ORDERS[order])
    data = random_rows(len(row_ids), row_bytes, 7 * row_bytes).numpy().tobytes()
    before = random_rows(12, row_bytes, 1)
    expected = before.clone()
    expected[row_ids] = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(len(row_ids), row_bytes)
    got = before.clone()
    cpu_kv_copy.scatter_rows(got, memoryview(data), row_ids)  # a view into the message, as the receiver has
    assert torch.equal(got, expected)  # the rows written, every other row untouched
    ref = before.clone()
    cpu_kv_copy.scatter_rows_ref(ref, data, row_ids)  # 8-byte words where rows divide into them, else bytes
    assert torch.equal(ref, expected)


def test_bad_arguments_raise_instead_of_writing_out_of_bounds():
    cache_rows = torch.zeros(4, 64, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kv_copy.scatter_rows(cache_rows, bytes(64), torch.tensor([4]))
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kv_copy.pack_rows(b"", cache_rows, [-1])
    with pytest.raises(RuntimeError, match="bytes of data"):
        cpu_kv_copy.scatter_rows(cache_rows, bytes(63), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="contiguous CPU uint8"):
        cpu_kv_copy.scatter_rows(cache_rows.float(), bytes(64), torch.tensor([1]))
    assert not cache_rows.any()
