"""The sending half every streaming data plane shares: ``send_layer`` queues row references, one thread
per transfer turns them into the wire's messages, and the poll state, deadline and checksums live here.

``send_layer`` runs on the engine thread and never waits for the network: it only records which rows of
the cache make up the layer (a CPU cache is read in place later; a GPU cache's blocks are gathered on
the GPU here, into a copy the cache's later steps cannot change, and that copy goes to the host once,
on the transfer thread, for the data planes that send host memory; NCCL sends it from the GPU). The
transfer thread
(``QueuedSendHandle._transfer``, one per data plane) takes the items in order: ``Chunk``s of whole rows,
then the trailer. Every wait in it is bounded by the transfer's deadline (``KVTarget.timeout_s``).
"""

from __future__ import annotations

import abc
import queue
import threading
import time
from dataclasses import dataclass

import torch

from kvferry.kernels.cpu_kv_copy import row_runs
from kvferry.transport.base import (
    FirstToken, KVSendHandle, KVTarget, KVTrailer, TransferError, TransferErrorCode, TransferState, gather_blocks,
)
from kvferry.transport.integrity import CHECKSUM_ALGORITHM, NO_CHECKSUM, LayerChecksums


class LayerRows:
    """One layer's rows, shared by its chunks: a CPU cache (read in place), or a GPU cache's blocks
    gathered on the GPU, copied to the host the first time a chunk's host rows are asked for."""

    def __init__(self, rows: torch.Tensor):  # [num_rows, row_bytes] uint8, contiguous
        self.device_rows = rows
        self._host = None if rows.is_cuda else rows

    @property
    def row_bytes(self) -> int:
        return self.device_rows.shape[1]

    def host(self) -> torch.Tensor:
        if self._host is None:  # only the transfer's own thread reads its chunks: no lock needed
            self._host = self.device_rows.cpu()
        return self._host


@dataclass(frozen=True)
class Chunk:
    """Bytes ``[offset, offset + len(row_ids) * row_bytes)`` of a layer's payload: ``rows[row_ids]``."""

    layer_idx: int
    offset: int
    source: LayerRows
    row_ids: list[int]
    row_index: torch.Tensor  # the same ids, int64 on the CPU (for index_select)

    @property
    def rows(self) -> torch.Tensor:
        """[num_rows, row_bytes] uint8, contiguous, on the host."""
        return self.source.host()

    @property
    def device_rows(self) -> torch.Tensor:
        """The same rows where they are: the CPU cache, or the gathered blocks on the GPU."""
        return self.source.device_rows

    @property
    def nbytes(self) -> int:
        return len(self.row_ids) * self.source.row_bytes

    def views(self) -> list[memoryview]:
        """The chunk as memoryviews of the rows, one per run of adjacent rows: no copy."""
        data = memoryview(self.rows.numpy()).cast("B")
        row_bytes = self.rows.shape[1]
        return [data[r * row_bytes : (r + k) * row_bytes] for r, k in row_runs(self.row_ids)]


_TRAILER = object()


class QueuedSendHandle(KVSendHandle):
    """Subclasses implement ``_transfer`` (runs on the transfer thread; returns once acknowledged,
    raises ``TransferError``). What it blocks on registers ``set_interrupt(fn)``: a failure from any
    thread (abort, the deadline) calls ``fn`` so that the blocked call returns at once."""

    def __init__(self, target: KVTarget, request_id: str, num_blocks: int, num_layers: int, chunk_bytes: int):
        self.request_id = request_id
        self.target = target
        self.num_blocks = num_blocks
        self.chunk_bytes = chunk_bytes
        # Of the bytes sent; the transfer thread feeds it. None once the receiver asked for no checksums.
        self.checksums: LayerChecksums | None = LayerChecksums(num_layers)
        self._opened = time.monotonic()
        self._deadline = self._opened + target.timeout_s
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._state = TransferState.PENDING
        self._finished = threading.Event()
        self._first_token: FirstToken | None = None
        self._interrupter = None
        self._before_fail = None
        self._rows_key: tuple | None = None  # the last layer's (block ids, cache blocks): its row ids
        self._row_ids: list[int] = []
        self._row_index = torch.empty(0, dtype=torch.int64)
        self._thread = threading.Thread(target=self._run, name=f"kv-send-{request_id}", daemon=True)
        self._thread.start()

    # ---- the producer's side (engine thread) ----
    def send_layer(self, layer_idx: int, kv_cache_layer: torch.Tensor, block_ids: list[int]) -> None:
        # The payload is 2 * n rows (K rows, then V rows), one cache block each; chunks are whole rows.
        if self._state is not TransferState.PENDING:
            return
        if kv_cache_layer.is_cuda:  # gather on the GPU: a packed copy the next steps cannot change
            source = gather_blocks(kv_cache_layer, block_ids)
            key = (len(block_ids), None)
        else:  # read the blocks in place: no gather copy
            source = kv_cache_layer
            key = (tuple(block_ids), kv_cache_layer.shape[1])
        if key != self._rows_key:  # a transfer's layers share their blocks: the ids are built once
            if kv_cache_layer.is_cuda:
                row_ids = list(range(2 * len(block_ids)))
            else:
                row_ids = list(block_ids) + [kv_cache_layer.shape[1] + b for b in block_ids]
            self._rows_key, self._row_ids = key, row_ids
            self._row_index = torch.tensor(row_ids, dtype=torch.int64)
        row_ids, row_index = self._row_ids, self._row_index
        assert source.is_contiguous()
        rows = LayerRows(source.view(torch.uint8).view(source.shape[0] * source.shape[1], -1))  # [2 * blocks, row_bytes]
        row_bytes = rows.row_bytes
        rows_per_chunk = max(1, self.chunk_bytes // row_bytes)
        for i in range(0, len(row_ids), rows_per_chunk):
            j = i + rows_per_chunk
            self._queue.put(Chunk(layer_idx, i * row_bytes, rows, row_ids[i:j], row_index[i:j]))

    def finish(self, first_token: FirstToken) -> None:
        self._first_token = first_token
        self._queue.put(_TRAILER)

    def abort(self, reason: str) -> None:
        self._fail(TransferError(TransferErrorCode.ABORTED, f"sender aborted: {reason}"))

    def poll(self) -> TransferState:
        return self._state

    def wait(self, timeout: float | None = None) -> TransferState:
        self._finished.wait(timeout)
        return self._state

    # ---- the transfer thread ----
    @abc.abstractmethod
    def _transfer(self) -> None: ...

    def skip_checksums(self) -> None:
        """The receiver does not verify this transfer (shm, same host): hash nothing, and say so in
        the trailer. Before the first chunk."""
        self.checksums = None

    def set_interrupt(self, fn) -> None:
        """``fn()`` (or None to clear) unblocks the wire the transfer thread waits on: a call's cancel,
        a socket's shutdown. Called at once if the transfer already failed."""
        with self._lock:
            self._interrupter = fn
            failed = self._state is TransferState.FAILED
        if failed and fn is not None:
            fn()

    def set_before_fail(self, fn) -> None:
        """``fn()`` (or None to clear) runs when the transfer fails, before ``poll()`` can say FAILED
        (and the prefill worker free the blocks): shm's one copy revokes the receiver's reads there."""
        with self._lock:
            self._before_fail = fn

    def _interrupt(self) -> None:
        with self._lock:
            fn = self._interrupter
        if fn is not None:
            fn()

    def _run(self) -> None:
        try:
            self._transfer()
            with self._lock:
                if self._state is TransferState.PENDING:
                    self.seconds = time.monotonic() - self._opened
                    self._state = TransferState.DONE
        except TransferError as e:
            self._fail(e)
        except Exception as e:  # a bug or an unexpected socket error: fail the transfer, never hang it
            self._fail(TransferError(TransferErrorCode.UNAVAILABLE, f"{type(e).__name__}: {e}"))
        finally:
            self._finished.set()

    def next_item(self) -> Chunk | KVTrailer:
        """The next chunk, or the trailer once every chunk was taken; raises when the transfer failed
        or its deadline passed."""
        while True:
            if self._state is not TransferState.PENDING:
                raise self.error or TransferError(TransferErrorCode.ABORTED, "aborted")
            remaining = self.remaining()
            if remaining <= 0:
                raise TransferError(TransferErrorCode.DEADLINE, self.deadline_message())
            try:
                item = self._queue.get(timeout=min(remaining, 0.1))
            except queue.Empty:
                continue
            if item is _TRAILER:
                if self.checksums is None:
                    return KVTrailer(self._first_token, self.bytes_sent, (), NO_CHECKSUM)
                return KVTrailer(self._first_token, self.bytes_sent, tuple(self.checksums.digests()), CHECKSUM_ALGORITHM)
            return item

    def ready(self) -> bool:
        """True when the next item is queued already (``next_item`` will not wait for the engine)."""
        return not self._queue.empty()

    def remaining(self) -> float:
        return max(self._deadline - time.monotonic(), 0.0)

    def deadline_message(self) -> str:
        return (
            f"KV transfer of {self.request_id!r} to {self.target.address} did not complete within "
            f"{self.target.timeout_s:.1f}s"
        )

    def _fail(self, error: TransferError) -> None:
        with self._lock:
            if self._state is not TransferState.PENDING:
                return
            if self._before_fail is not None:
                self._before_fail()
            self.error = error
            self._state = TransferState.FAILED
        self._interrupt()
