"""Row copies of KV transfer on the CPU (``csrc/kv_copy.cpp``), each beside its torch reference.

A cache layer viewed as rows (``[2 * num_blocks, row_bytes]`` uint8, one K or V block per row) is
what the transport moves. Both copies are memory-bound, and on a 2-core box they sit on the
transfer's critical path next to gRPC's own copies, so the C++ versions:

- ``pack_rows``: builds the message (a header, then the rows) as one new ``bytes`` with the GIL
  released, so gRPC's threads run while the next message is built (the reference, ``b"".join`` of
  memoryviews, holds the GIL throughout).
- ``copy_rows``: the shm plane's one copy, rows of the prefill worker's cache (mapped read-only) by
  id straight into the decode worker's blocks, with the same streaming stores as ``scatter_rows``.
- ``scatter_rows``: writes a received chunk's rows into their blocks with streaming stores, which skip
  reading each destination line first (the blocks are cold and not read until a later decode step);
  the reference is ``index_put_`` on the rows viewed as 8-byte words.

Both move bytes without arithmetic, so any bit pattern (NaN payloads included) arrives unchanged.
The C++ needs only g++ and the x86-64 baseline (elsewhere it builds with plain memcpy); where it is not
built the references run.
"""

from __future__ import annotations

import warnings

import torch

from kvferry.kernels.cpu_extension import LazyExtension

EXTENSION = LazyExtension("kvferry_kv_copy", ["kv_copy.cpp"], ["-O3"], fallback="torch copies")


def load():
    return EXTENSION.load()


def row_runs(row_ids: list[int]) -> list[tuple[int, int]]:
    """[(first_row, num_rows)] for runs of consecutive row ids, so adjacent blocks are one slice."""
    runs: list[tuple[int, int]] = []
    for r in row_ids:
        if runs and runs[-1][0] + runs[-1][1] == r:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((r, 1))
    return runs


def pack_rows_ref(prefix: bytes, cache_rows: torch.Tensor, row_ids: list[int]) -> bytes:
    data = memoryview(cache_rows.numpy()).cast("B")
    row_bytes = cache_rows.shape[1]
    return b"".join((prefix, *(data[r * row_bytes : (r + k) * row_bytes] for r, k in row_runs(row_ids))))


def pack_rows(prefix: bytes, cache_rows: torch.Tensor, row_ids: list[int]) -> bytes:
    """``prefix`` followed by ``cache_rows[row_ids]`` (``[num_rows, row_bytes]`` uint8, contiguous, CPU)."""
    ext = load()
    if ext is None:
        return pack_rows_ref(prefix, cache_rows, row_ids)
    return ext.pack_rows(prefix, cache_rows, torch.tensor(row_ids, dtype=torch.int64))


def scatter_rows_ref(cache_rows: torch.Tensor, data: memoryview | bytes, row_ids: torch.Tensor) -> None:
    """Also the host-to-device path: ``cache_rows`` may live on a GPU."""
    row_bytes = cache_rows.shape[1]
    with warnings.catch_warnings():  # a read-only buffer is fine: we only copy out of it
        warnings.simplefilter("ignore", UserWarning)
        rows = torch.frombuffer(data, dtype=torch.uint8).view(-1, row_bytes).to(cache_rows.device)
    row_ids = row_ids.to(cache_rows.device)
    if row_bytes % 8 == 0:  # torch's row scatter runs ~3x faster on 8-byte elements than on bytes
        cache_rows, rows = cache_rows.view(torch.float64), rows.view(torch.float64)
    with torch.inference_mode():  # the engine may have made its caches as inference tensors
        cache_rows.index_put_((row_ids,), rows)


def scatter_rows(cache_rows: torch.Tensor, data: memoryview | bytes, row_ids: torch.Tensor) -> None:
    """``cache_rows[row_ids[i]] = data[i * row_bytes : (i + 1) * row_bytes]``; ``cache_rows`` is
    ``[num_rows, row_bytes]`` uint8, contiguous, CPU; ``row_ids`` int64."""
    ext = load()
    if ext is None:
        scatter_rows_ref(cache_rows, data, row_ids)
    else:
        ext.scatter_rows(cache_rows, data, row_ids)


def copy_rows_ref(cache_rows: torch.Tensor, row_ids: torch.Tensor, src, src_row_ids: torch.Tensor) -> None:
    row_bytes = cache_rows.shape[1]
    with warnings.catch_warnings():  # a read-only buffer is fine: we only copy out of it
        warnings.simplefilter("ignore", UserWarning)
        rows = torch.frombuffer(src, dtype=torch.uint8)
    rows = rows[: rows.numel() // row_bytes * row_bytes].view(-1, row_bytes)
    if len(src_row_ids) and not 0 <= int(src_row_ids.min()) <= int(src_row_ids.max()) < rows.shape[0]:
        raise IndexError(f"copy_rows: source rows out of range [0, {rows.shape[0]})")
    scatter_rows_ref(cache_rows, memoryview(rows.index_select(0, src_row_ids).numpy()), row_ids)


def copy_rows(cache_rows: torch.Tensor, row_ids: torch.Tensor, src, src_row_ids: torch.Tensor) -> None:
    """``cache_rows[row_ids[i]] = src_rows[src_row_ids[i]]``, ``src`` any buffer (read-only is fine) of
    whole ``row_bytes`` rows; ``cache_rows`` ``[num_rows, row_bytes]`` uint8, contiguous, CPU."""
    ext = load()
    if ext is None:
        copy_rows_ref(cache_rows, row_ids, src, src_row_ids)
    else:
        ext.copy_rows(cache_rows, row_ids, src, src_row_ids)
