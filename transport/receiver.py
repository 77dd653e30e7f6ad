"""The receiving end of KV transfers, shared by every transport: bytes in, KV blocks written.

The decode worker tells the receiver which blocks each request reserved (``expect``); a transport opens
a session per incoming transfer (``open(header)``), writes each layer's bytes (``write``; chunks of a
layer arrive in order) and ends it with the first token (``finish``). A layer is scattered into its
blocks as soon as all of its bytes are in, so receiving overlaps the sender's compute.

Invariants: a session writes only into the blocks of a reservation that is still PENDING, under that
reservation's lock (checked again by each queued copy); ``cancel`` takes the same lock, so once it
returns no write can touch the blocks and the caller may free them. Each reservation accepts one session (a second is refused).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvferry.common.fingerprint import KVFingerprint
from kvferry.kernels import cpu_kv_copy
from kvferry.transport.base import (
    FirstToken, HandshakeResult, KVTrailer, KVTransferHeader, TransferError, TransferErrorCode, TransferState,
    TransportOffer,
)
from kvferry.transport.integrity import CHECKSUM_ALGORITHM, NO_CHECKSUM, LayerChecksums, mismatched_layers
from kvferry.transport.metrics import PairStats

DEFAULT_MAX_CHUNK_BYTES = 64 * 1024 * 1024

# Called once per reservation when its transfer ends: (request_id, DONE, first_token, None) or
# (request_id, FAILED, None, error). Runs on the transport's thread; must not block for long.
OnTransferEnd = Callable[[str, TransferState, FirstToken | None, TransferError | None], None]


@dataclass
class _Reservation:
    request_id: str
    block_ids: list[int]
    lock: threading.Lock = field(default_factory=threading.Lock)
    state: TransferState = TransferState.PENDING
    opened: bool = False
    layers_done: set[int] = field(default_factory=set)
    progress: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # layer -> (bytes in, partial row)
    checksums: LayerChecksums | None = None  # of the bytes received, per layer; made at open unless not verified
    bytes_received: int = 0
    created: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    started: float | None = None
    seconds: float = 0.0


class KVReceiver:
    def __init__(
        self,
        kv_caches: list[torch.Tensor],  # per layer [2, num_blocks, block_size, num_kv_heads, head_dim]
        fingerprint: KVFingerprint,
        receiver_id: str = "",
        on_transfer_end: OnTransferEnd | None = None,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        max_pending_copies: int = 8,
    ):
        assert len(kv_caches) == fingerprint.num_layers, (len(kv_caches), fingerprint.num_layers)
        self.kv_caches = kv_caches
        assert all(c.is_contiguous() for c in kv_caches)
        with torch.inference_mode():  # the engine may have made its caches as inference tensors
            # Each layer as rows of bytes, one K or V block per row: what a transfer writes.
            self.cache_rows = [c.view(torch.uint8).view(2 * c.shape[1], -1) for c in kv_caches]
        self.fingerprint = fingerprint
        self.receiver_id = receiver_id
        self.instance_id = uuid.uuid4().hex  # new on every start: stale pushes from before a restart fail
        self.on_transfer_end = on_transfer_end
        self.max_chunk_bytes = max_chunk_bytes
        self.max_pending_copies = max_pending_copies
        # One thread copies received chunks into the blocks (torch releases the GIL), overlapping the
        # transports' receiving; FIFO, so one transfer's copies run in order.
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-copy")
        self._lock = threading.Lock()  # guards the dict; each reservation has its own lock for writes
        self._reservations: dict[str, _Reservation] = {}
        self._offers: dict[str, TransportOffer] = {"grpc": TransportOffer("grpc")}
        self._data_planes: list = []  # closed with the receiver
        self.bytes_received_total = 0
        self.transfers_total = 0
        self.transfer_seconds_total = 0.0
        self.checksum_failures_total = 0
        self.pair_stats = PairStats()  # per (sender id, transport); exported by transport/metrics.py

    # ---- the decode worker's side ----------------------------------------------------------------
    def expect(self, request_id: str, block_ids: list[int]) -> None:
        with self._lock:
            if request_id in self._reservations:
                raise ValueError(f"request {request_id!r} already expects KV")
            self._reservations[request_id] = _Reservation(request_id, list(block_ids))

    def cancel(self, request_id: str) -> bool:
        """Forget the reservation; when this returns no write touches its blocks. False if unknown
        (never expected, or its transfer already ended)."""
        with self._lock:
            res = self._reservations.pop(request_id, None)
        if res is None:
            return False
        with res.lock:
            if res.state is TransferState.PENDING:
                res.state = TransferState.FAILED
        return True

    def poll(self, request_id: str) -> TransferState | None:
        res = self._reservations.get(request_id)
        return None if res is None else res.state

    def last_activity(self, request_id: str) -> float | None:
        res = self._reservations.get(request_id)
        return None if res is None else res.last_activity

    def close(self) -> None:
        """Close the data planes (their connections fail their sessions), then stop the copy thread."""
        for plane in self._data_planes:
            plane.close()
        self._copier.shutdown(wait=True)

    # ---- data planes -----------------------------------------------------------------------------
    def set_offers(self, offers: list[TransportOffer], data_planes: list) -> None:
        """The data planes this receiver accepts KV over (the handshake lists them, in this order);
        ``data_planes`` (objects with ``close()``) are closed with the receiver. Without a call: gRPC."""
        self._offers = {o.name: o for o in offers}
        self._data_planes = list(data_planes)

    @property
    def offers(self) -> tuple[TransportOffer, ...]:
        return tuple(self._offers.values())

    @property
    def data_planes(self) -> tuple:
        return tuple(self._data_planes)

    def check_accepts(self, transport: str) -> None:
        """Raise INCOMPATIBLE when KV may not arrive over ``transport`` here (--kv-transport). The
        in-process sender is no network path and is never negotiated: always accepted."""
        if transport != "inprocess" and transport not in self._offers:
            raise TransferError(
                TransferErrorCode.INCOMPATIBLE,
                f"this decode worker accepts KV over {', '.join(self._offers) or 'nothing'}, not {transport} "
                "(its --kv-transport)",
            )

    @property
    def num_pending(self) -> int:
        return sum(1 for r in list(self._reservations.values()) if r.state is TransferState.PENDING)

    # ---- the transport's side --------------------------------------------------------------------
    def handshake(self, sender_fingerprint: KVFingerprint) -> HandshakeResult:
        mismatches = sender_fingerprint.differences(self.fingerprint)
        return HandshakeResult(
            compatible=not mismatches,
            mismatches=tuple(mismatches),
            receiver_fingerprint=self.fingerprint,
            receiver_id=self.receiver_id,
            receiver_instance_id=self.instance_id,
            max_chunk_bytes=self.max_chunk_bytes,
            transports=self.offers,
        )

    def open(self, header: KVTransferHeader, transport: str = "grpc", verify_checksums: bool = True) -> ReceiveSession:
        """``transport``: the data plane the session's bytes come over (refused unless offered).
        ``verify_checksums=False``: the plane's bytes never leave this host's memory (shm by default,
        see integrity.py); nothing is hashed and the trailer's checksums are not compared."""
        self.check_accepts(transport)
        fp = self.fingerprint
        if header.fingerprint_digest != fp.digest:
            raise TransferError(
                TransferErrorCode.INCOMPATIBLE,
                f"fingerprint digest {header.fingerprint_digest!r} != receiver's {fp.digest!r}; "
                "handshake again to see which fields differ",
            )
        if header.receiver_instance_id and header.receiver_instance_id != self.instance_id:
            raise TransferError(
                TransferErrorCode.INCOMPATIBLE,
                f"reservation was made by receiver instance {header.receiver_instance_id}, "
                f"this is {self.instance_id} (the decode worker restarted)",
            )
        res = self._reservations.get(header.request_id)
        if res is None:
            raise TransferError(
                TransferErrorCode.NOT_FOUND,
                f"no reservation for request {header.request_id!r} (never made, aborted or lease expired)",
            )
        expected_nbytes = fp.layer_nbytes(len(res.block_ids))
        problems = []
        if header.num_layers != fp.num_layers:
            problems.append(f"num_layers {header.num_layers} != {fp.num_layers}")
        if header.num_blocks != len(res.block_ids):
            problems.append(f"num_blocks {header.num_blocks} != {len(res.block_ids)} reserved")
        if header.layer_nbytes != expected_nbytes:
            problems.append(f"layer_nbytes {header.layer_nbytes} != {expected_nbytes}")
        if problems:
            raise TransferError(TransferErrorCode.INVALID, f"request {header.request_id!r}: " + "; ".join(problems))
        with res.lock:
            if res.state is not TransferState.PENDING:
                raise TransferError(TransferErrorCode.ABORTED, f"request {header.request_id!r} was aborted")
            if res.opened:
                raise TransferError(TransferErrorCode.INVALID, f"request {header.request_id!r} already has a transfer")
            res.opened = True
            res.started = res.last_activity = time.monotonic()
            res.checksums = LayerChecksums(fp.num_layers) if verify_checksums else None
        return ReceiveSession(self, res, header.layer_nbytes, (header.sender_id, transport))

    def _end(
        self, res: _Reservation, first_token: FirstToken | None, error: TransferError | None, pair: tuple[str, str]
    ) -> None:
        with self._lock:  # the transfer is over: the engine owns the blocks from here
            if self._reservations.get(res.request_id) is res:
                del self._reservations[res.request_id]
            if error is None:
                self.bytes_received_total += res.bytes_received
                self.transfers_total += 1
                self.transfer_seconds_total += res.seconds
            elif error.code is TransferErrorCode.CORRUPT:
                self.checksum_failures_total += 1
        sender, transport = pair[0] or "unnamed", pair[1]
        if error is None:
            self.pair_stats.record(sender, transport, res.bytes_received, res.seconds)
        else:
            self.pair_stats.record_failure(sender, transport)
        if self.on_transfer_end is not None:
            self.on_transfer_end(res.request_id, res.state, first_token, error)


class ReceiveSession:
    """One incoming transfer. Every method raises ``TransferError`` once the transfer cannot succeed."""

    def __init__(self, receiver: KVReceiver, res: _Reservation, layer_nbytes: int, pair: tuple[str, str]):
        self._receiver = receiver
        self._res = res
        self.layer_nbytes = layer_nbytes
        self._pair = pair  # (sender id, transport)
        cache = receiver.kv_caches[0]  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        self._row_bytes = receiver.cache_rows[0].shape[1]  # one K or V block
        ids = torch.tensor(res.block_ids, dtype=torch.int64)
        self._target_rows = torch.cat([ids, ids + cache.shape[1]])  # payload row -> cache row
        self._pending: deque[Future] = deque()  # copies submitted to the receiver's copy thread
        # Into a CPU cache the copy runs here (it releases the GIL; the transport keeps receiving into
        # its flow-control window meanwhile): cheaper than a hand-off to a thread. A GPU cache's
        # host-to-device copy goes to the copy thread.
        self._copy_inline = cache.device.type == "cpu"

    @property
    def request_id(self) -> str:
        return self._res.request_id

    @property
    def bytes_received(self) -> int:
        return self._res.bytes_received

    @property
    def seconds(self) -> float:
        """Open to trailer, once finished."""
        return self._res.seconds

    @property
    def copies_inline(self) -> bool:
        """True when ``write`` is done with its buffer on return (a CPU cache); otherwise call
        ``flush`` before reusing the buffer."""
        return self._copy_inline

    def flush(self) -> None:
        """Wait for the queued copies into the blocks (re-raises their errors)."""
        self._wait_copies(keep=0)

    def write(self, layer_idx: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Bytes ``[offset, offset + len(data))`` of the layer's payload; a layer's chunks come in order.

        The payload is ``2 * num_blocks`` rows (K rows then V rows), one cache block each; whole rows are
        copied straight into their blocks, a partial row waits for the next chunk (senders that cut
        chunks on row boundaries, as ours do, never leave one)."""
        res, n = self._res, len(data)
        copy = None
        with res.lock:
            carry = self._check_chunk(layer_idx, offset, n)
            if res.checksums is not None:  # chunks of a layer come in order: the payload's order
                res.checksums.update(layer_idx, data)
            if carry:
                data = bytes(carry) + bytes(data)
            row_start = (offset - len(carry)) // self._row_bytes
            num_rows = len(data) // self._row_bytes
            if num_rows:
                rows = memoryview(data)[: num_rows * self._row_bytes]
                target = self._target_rows[row_start : row_start + num_rows]
                if self._copy_inline:
                    copy = (layer_idx, target, rows)
                else:  # by the copy thread, so this (transport) thread goes on receiving meanwhile
                    self._pending.append(self._receiver._copier.submit(self._copy, layer_idx, target, rows))
            self._advance(layer_idx, offset, n, bytes(data[num_rows * self._row_bytes :]))
        if copy is not None:
            self._copy(*copy)
        self._wait_copies(keep=self._receiver.max_pending_copies)

    def write_rows(self, layer_idx: int, offset: int, rows: torch.Tensor) -> None:
        """Whole rows of the layer's payload already on the cache's device (``[num_rows, row_bytes]``
        uint8: the NCCL plane's staging buffer on the GPU), copied into their blocks there. They are
        hashed on the host (one device-to-host copy: the checksum has no GPU kernel yet). ``offset``
        must start a row."""
        res, n = self._res, rows.numel()
        assert rows.dim() == 2 and rows.shape[1] == self._row_bytes and rows.dtype == torch.uint8, rows.shape
        with res.lock:
            carry = self._check_chunk(layer_idx, offset, n)
            if carry or offset % self._row_bytes:
                raise self._invalid(f"layer {layer_idx}: device rows at {offset}, not at a row boundary")
            if res.checksums is not None:
                res.checksums.update(layer_idx, rows.cpu().numpy())
            row_start = offset // self._row_bytes
            target = self._target_rows[row_start : row_start + rows.shape[0]].to(rows.device)
            with torch.inference_mode():  # the engine may have made its caches as inference tensors
                self._receiver.cache_rows[layer_idx].index_copy_(0, target, rows)
            self._advance(layer_idx, offset, n, b"")

    def copy_rows_from(self, layer_idx: int, offset: int, src, src_row_ids: torch.Tensor) -> None:
        """Whole rows of the layer's payload copied straight from ``src`` (the prefill worker's cache,
        mapped read-only: shm's one copy), row ``i`` of the chunk being ``src`` row ``src_row_ids[i]``;
        hashed from the blocks they were copied into. ``offset`` must start a row."""
        res, row_bytes = self._res, self._row_bytes
        n = len(src_row_ids) * row_bytes
        with res.lock:  # cancel() takes this lock: after it, no copy touches the blocks
            carry = self._check_chunk(layer_idx, offset, n)
            if carry or offset % row_bytes or not self._copy_inline:
                raise self._invalid(f"layer {layer_idx}: shared rows at {offset} (row boundaries, CPU caches only)")
            row_start = offset // row_bytes
            target = self._target_rows[row_start : row_start + len(src_row_ids)]
            cache_rows = self._receiver.cache_rows[layer_idx]
            cpu_kv_copy.copy_rows(cache_rows, target, src, src_row_ids)
            if res.checksums is not None:  # over the copied blocks, in payload order: gathered by the
                # C++ row copy (one hash call per chunk; one per scattered row cost ~4 us each in Python)
                res.checksums.update(layer_idx, cpu_kv_copy.pack_rows(b"", cache_rows, target.tolist()))
            self._advance(layer_idx, offset, n, b"")

    def _check_chunk(self, layer_idx: int, offset: int, n: int) -> bytes:
        """Raise unless ``n`` bytes at ``offset`` are the layer's next chunk; returns the partial row
        carried over from the previous chunk. Under the reservation's lock."""
        res = self._res
        self._check_pending()
        if not 0 <= layer_idx < len(self._receiver.kv_caches) or layer_idx in res.layers_done:
            raise self._invalid(f"layer {layer_idx} out of range or already complete")
        if n == 0 or n > self._receiver.max_chunk_bytes:
            raise self._invalid(f"chunk of {n} bytes (limit {self._receiver.max_chunk_bytes})")
        filled, carry = res.progress.get(layer_idx, (0, b""))
        if offset != filled or offset + n > self.layer_nbytes:
            raise self._invalid(f"layer {layer_idx}: chunk at {offset}+{n}, expected offset {filled}")
        return carry

    def _advance(self, layer_idx: int, offset: int, n: int, carry: bytes) -> None:
        res = self._res
        res.progress[layer_idx] = (offset + n, carry)
        res.bytes_received += n
        res.last_activity = time.monotonic()
        if offset + n == self.layer_nbytes:
            res.progress.pop(layer_idx)
            res.layers_done.add(layer_idx)

    def _copy(self, layer_idx: int, target: torch.Tensor, rows: memoryview) -> None:
        res = self._res
        with res.lock:  # cancel() takes this lock: after it, no copy touches the blocks
            if res.state is not TransferState.PENDING:
                return
            cache_rows = self._receiver.cache_rows[layer_idx]
            if cache_rows.device.type == "cpu":
                cpu_kv_copy.scatter_rows(cache_rows, rows, target)
            else:  # host to device: torch's copy
                cpu_kv_copy.scatter_rows_ref(cache_rows, rows, target)

    def _wait_copies(self, keep: int) -> None:
        """Wait until at most ``keep`` copies are queued (bounds the memory they pin); re-raise errors."""
        while len(self._pending) > keep:
            self._pending.popleft().result()

    def finish(self, trailer: KVTrailer) -> None:
        """The sender's trailer: every layer must be complete and match its checksum before the KV
        counts as received (the decode worker commits only then). A mismatch raises CORRUPT."""
        res = self._res
        self._wait_copies(keep=0)  # the acknowledgement means: the KV is in the blocks
        with res.lock:
            self._check_pending()
            missing = sorted(set(range(len(self._receiver.kv_caches))) - res.layers_done)
            if missing:
                raise self._invalid(f"trailer before layers {missing[:8]}{'...' if len(missing) > 8 else ''}")
            if trailer.total_bytes != res.bytes_received:
                raise self._invalid(f"trailer says {trailer.total_bytes} bytes, received {res.bytes_received}")
            if res.checksums is None:  # not verified here (shm): the trailer's checksums go unchecked
                if trailer.checksum_algorithm not in (NO_CHECKSUM, CHECKSUM_ALGORITHM):
                    raise self._invalid(f"trailer checksums are {trailer.checksum_algorithm or 'missing'!r}")
            elif trailer.checksum_algorithm != CHECKSUM_ALGORITHM:
                raise self._invalid(
                    f"trailer checksums are {trailer.checksum_algorithm or 'missing'!r}, expected {CHECKSUM_ALGORITHM}"
                )
            elif bad := mismatched_layers(list(trailer.layer_checksums), res.checksums.digests()):
                raise TransferError(
                    TransferErrorCode.CORRUPT,
                    f"request {res.request_id!r}: checksum mismatch in layer(s) {bad[:8]} "
                    f"({self._pair[1]} from {self._pair[0] or 'an unnamed sender'}): the KV changed in transit",
                )
            res.state = TransferState.DONE
            res.seconds = time.monotonic() - (res.started or res.created)
        self._receiver._end(res, trailer.first_token, None, self._pair)

    def fail(self, error: TransferError) -> None:
        """The transport lost the stream (or the sender aborted): the reservation's transfer failed."""
        res = self._res
        with res.lock:
            if res.state is not TransferState.PENDING:
                return
            res.state = TransferState.FAILED
        self._receiver._end(res, None, error, self._pair)

    def _check_pending(self) -> None:
        if self._res.state is not TransferState.PENDING:
            raise TransferError(
                TransferErrorCode.ABORTED, f"request {self._res.request_id!r} was aborted or its lease expired"
            )

    def _invalid(self, message: str) -> TransferError:
        return TransferError(TransferErrorCode.INVALID, f"request {self._res.request_id!r}: {message}")
