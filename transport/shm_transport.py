"""The shm data plane: prefill and decode workers on one host (same boot id) move KV through shared
memory; the socket carries only frames.

One copy, where it can: a prefill worker's CPU cache lives in a memfd (``engine/kv_memory.py``). The
sender passes that memfd (a read-only descriptor) and a guard page once per connection (a CACHE frame
and SCM_RIGHTS), then names each chunk's rows in its own cache (READY: layer, offset, the rows' ids)
instead of copying them; the receiver copies those rows from its read-only mapping straight into the
reserved blocks (``copy_rows``: one gather-scatter) and acknowledges the transfer as before. The
sender holds the blocks until that acknowledgement, as on every plane; a transfer that fails first
revokes the guard before the blocks can be freed, and the receiver checks the guard after its last
copy (``shm_cache.py``). Both ends say in HELLO / HELLO_OK whether they take this path (flag
ONE_COPY); a cache that is not in a memfd (a GPU cache, or any other) and a receiver that declines go
through the slots below, chunk by chunk.

The slots:
Each data connection (an abstract-namespace Unix socket, named after the receiver instance) gets its
own slots: on HELLO the receiver creates a memfd of ``num_slots`` slots, each at least the sender's
chunk size, maps it and passes the descriptor with SCM_RIGHTS; the sender maps it too. Per chunk the
sender copies the rows from its cache straight into a free slot (``index_select`` into the slot: one
copy, GIL released), feeds the layer's checksum from the slot, and sends SLOT_DATA naming it; the
receiver scatters the slot's rows into the reserved blocks (``session.write``) and answers SLOT_FREE.
With two slots the sender fills one while the receiver drains the other.

Why slots and not the decode worker's KV cache itself: the receiver must be able to stop every write
into a reservation the moment it cancels it (abort, lease expiry), and it cannot stop another process
that is, say, SIGSTOPped in the middle of a copy into blocks that are then handed to another request.
Slots belong to one connection, so a late write lands in a slot nobody reads.

Cleanup under kill -9 of either side: a memfd has no name (nothing in /dev/shm to leak) and lives
while a descriptor or a mapping does, so the kernel frees it when the last of the two processes holding
it exits or unmaps; the abstract socket name vanishes with its process. The peer sees EOF, fails its
transfer and unmaps. ``multiprocessing.shared_memory`` is not used: in Python 3.11 every process that
attaches a segment registers it with its resource tracker, which unlinks it when that process exits
(``track=False`` only arrived in 3.13), so the attaching side would destroy the owner's segment.
"""

from __future__ import annotations

import collections
import mmap
import os
import socket
import time

import torch

from kvferry.kernels.cpu_kv_copy import pack_rows
from kvferry.transport import framing
from kvferry.transport.base import TransferError, TransferErrorCode, TransportOffer
from kvferry.transport.host import boot_id
from kvferry.transport.integrity import LayerChecksums
from kvferry.transport.receiver import KVReceiver
from kvferry.transport.send_queue import Chunk, QueuedSendHandle
from kvferry.transport.shm_cache import Guard, GuardView, SharedCache, find_shared_cache
from kvferry.transport.stream_client import Connection, ConnectionPool, stream_transfer
from kvferry.transport.stream_server import ConnectionPayload, StreamDataServer

NAME = "shm"
MEMFD_NAME = "kvferry-kv-slots"  # shown in /proc/<pid>/maps as /memfd:kvferry-kv-slots
PAGE = mmap.PAGESIZE
NO_CHECKSUMS = 1  # HELLO_OK flag (the frame's offset): the receiver verifies no checksums (integrity.py)
ONE_COPY = 2  # HELLO (its ``a``) and HELLO_OK flag: the sender can share its cache, the receiver copies from it
MAX_READY_BATCH = 64  # READY frames sent in one write when the engine keeps queueing


def start_shm_server(
    receiver: KVReceiver, ticket: str, num_slots: int = 4, verify_checksums: bool = False
) -> tuple[StreamDataServer, TransportOffer]:
    """``verify_checksums``: hash every chunk on both ends anyway (``--kv-checksum always``)."""
    name = f"kvferry-kv-{receiver.instance_id}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)  # abstract namespace: no file to leak, gone with the process
    listener.listen(64)
    server = StreamDataServer(
        receiver, listener, NAME, ticket, lambda: ShmSlots(receiver, num_slots, verify_checksums)
    )
    return server, TransportOffer(NAME, address=name, boot_id=boot_id(), ticket=ticket)


class ShmSlots(ConnectionPayload):
    """The receiver's side of one connection: its slots, and the sender's cache once shared (one copy)."""

    def __init__(self, receiver: KVReceiver, num_slots: int, verify_checksums: bool):
        self.receiver = receiver
        self.num_slots = num_slots
        self.verify_checksums = verify_checksums
        self._freed: list[bytes] = []  # SLOT_FREE frames held back while more SLOT_DATA is waiting
        self.slot_bytes = 0
        self._mm: mmap.mmap | None = None
        self.one_copy = False  # agreed at HELLO
        self._cache: mmap.mmap | None = None  # the sender's cache, read-only (PROT_READ)
        self._guard: GuardView | None = None
        self._seq: int | None = None  # the one-copy transfer in progress (its guard value)

    def on_hello(self, conn, hello, deadline) -> None:
        requested = hello[4]  # the sender's chunk size
        row_bytes = self.receiver.cache_rows[0].shape[1]
        if requested > self.receiver.max_chunk_bytes:
            raise TransferError(
                TransferErrorCode.INCOMPATIBLE,
                f"chunks of {requested} bytes; this receiver accepts up to {self.receiver.max_chunk_bytes}",
            )
        self.slot_bytes = -(-max(requested, row_bytes, PAGE) // PAGE) * PAGE
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, self.num_slots * self.slot_bytes)
            self._mm = mmap.mmap(fd, self.num_slots * self.slot_bytes)
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            flags = 0 if self.verify_checksums else NO_CHECKSUMS
            self.one_copy = bool(hello[1] & ONE_COPY) and self.receiver.cache_rows[0].device.type == "cpu"
            flags |= ONE_COPY if self.one_copy else 0
            socket.send_fds(conn, [framing.pack(framing.HELLO_OK, self.num_slots, flags, self.slot_bytes)], [fd])
        finally:
            os.close(fd)  # the mapping (and the sender's copy of the descriptor) keep the memory

    def data(self, conn, frame, deadline) -> memoryview:
        kind, _, _, nbytes, slot = frame
        if kind != framing.SLOT_DATA:
            return super().data(conn, frame, deadline)
        if slot >= self.num_slots or not 0 < nbytes <= self.slot_bytes:
            raise TransferError(TransferErrorCode.INVALID, f"slot {slot} with {nbytes} bytes is out of range")
        start = slot * self.slot_bytes
        return memoryview(self._mm)[start : start + nbytes]

    def handle(self, conn, frame, session, deadline) -> bool:
        if frame[0] == framing.CACHE:
            self._map_cache(conn, frame, deadline)
        elif frame[0] == framing.READY:
            self._copy_ready(conn, frame, session, deadline)
        else:
            return False
        return True

    def _map_cache(self, conn, frame, deadline) -> None:
        if not self.one_copy:
            raise TransferError(TransferErrorCode.INVALID, "a shared cache on a connection without one copy")
        size = frame[3]
        conn.settimeout(max(deadline - time.monotonic(), 0.001))
        _, fds, _, _ = socket.recv_fds(conn, 1, 2)
        try:
            if len(fds) != 2 or os.fstat(fds[0]).st_size < size or size == 0:
                raise TransferError(TransferErrorCode.INVALID, "a shared cache frame without its memfds")
            self.close_cache()
            self._cache = mmap.mmap(fds[0], size, access=mmap.ACCESS_READ)  # PROT_READ: never written here
            self._guard = GuardView(fds[1])
        finally:
            for fd in fds:
                os.close(fd)

    def _copy_ready(self, conn, frame, session, deadline) -> None:
        _, layer_idx, offset, nbytes, base = frame
        row_bytes = self.receiver.cache_rows[0].shape[1]
        if self._cache is None or nbytes == 0 or nbytes % row_bytes or nbytes > self.receiver.max_chunk_bytes:
            raise TransferError(TransferErrorCode.INVALID, f"rows ready ({nbytes} bytes) without a shared cache")
        num_rows = nbytes // row_bytes
        ids = framing.recv_payload(conn, 8 * (num_rows + 1), deadline, "ready rows")
        seq, *_ = framing.HEADER_SEQ.unpack_from(ids)
        if self._seq is not None and seq != self._seq:
            raise TransferError(TransferErrorCode.INVALID, f"rows of transfer {seq} within transfer {self._seq}")
        self._seq = seq
        src_ids = torch.frombuffer(bytearray(ids[8:]), dtype=torch.int64)
        available = (len(self._cache) - base) // row_bytes if base < len(self._cache) else 0
        if not 0 <= int(src_ids.min()) <= int(src_ids.max()) < available:
            raise TransferError(TransferErrorCode.INVALID, f"shared rows out of the sender's cache ({available} rows)")
        with memoryview(self._cache) as view, view[base:] as src:
            session.copy_rows_from(layer_idx, offset, src, src_ids)

    def before_finish(self, conn, session) -> None:
        seq, self._seq = self._seq, None
        if seq is not None and self._guard.valid() != seq:
            raise TransferError(
                TransferErrorCode.ABORTED, "the sender gave the transfer up while its blocks were being copied"
            )

    def done_with(self, conn, frame, deadline) -> None:
        # While the sender's next frames are waiting, its slots are not what it waits for: answer them
        # together (one wake-up of the sender instead of one per chunk).
        self._freed.append(framing.pack(framing.SLOT_FREE, frame[4]))
        if len(self._freed) >= batch_size(self.num_slots) or not framing.readable(conn):
            self.flush(conn, deadline)

    def flush(self, conn, deadline) -> None:
        if self._freed:
            frames, self._freed = self._freed, []
            framing.send_buffers(conn, frames, deadline, "slot free")

    def close_cache(self) -> None:
        _unmap(self._cache)
        self._cache = None
        if self._guard is not None:
            self._guard.close()
            self._guard = None

    def close(self) -> None:
        _unmap(self._mm)
        self._mm = None
        self.close_cache()


def batch_size(num_slots: int) -> int:
    """Slot frames sent together: half the slots, so one side fills (or drains) while the other drains
    (or fills) the rest; fewer wake-ups, each a switch between the two processes on a busy box."""
    return max(1, num_slots // 2)


def _unmap(mm: mmap.mmap | None) -> None:
    if mm is None:
        return
    try:
        mm.close()
    except BufferError:  # a view is still alive (an exception's frame): unmapped when it is collected
        pass


class ShmConnection(Connection):
    def __init__(
        self, sock: socket.socket, mm: mmap.mmap, num_slots: int, slot_bytes: int, checksums: bool, one_copy: bool
    ):
        super().__init__(sock)
        self._mm = mm
        self.checksums = checksums  # whether the receiver verifies them
        self.slot_bytes = slot_bytes
        self.slots = torch.frombuffer(mm, dtype=torch.uint8).view(num_slots, slot_bytes)
        self.free = collections.deque(range(num_slots))
        self.batch = batch_size(num_slots)
        self.pending: list[bytes] = []  # SLOT_DATA / READY frames not sent yet
        self.chunks = {"one_copy": 0, "slots": 0}  # the plane's counts (shared)
        self.one_copy = one_copy  # the receiver copies from our cache
        self.guard = Guard() if one_copy else None
        self.shared: SharedCache | None = None  # the cache the receiver has mapped
        self.seq = 0  # of the transfer in progress (the guard's value while it may be trusted)
        self.bases: dict[int, int | None] = {}  # this transfer's layer rows (address) -> offset in the memfd

    def flush(self, deadline: float) -> None:
        if self.pending:
            frames, self.pending = self.pending, []
            framing.send_buffers(self.sock, frames, deadline, "shm slot")

    def close(self) -> None:
        super().close()
        self.slots = None  # drops the tensor's export of the mapping, so it can be unmapped
        _unmap(self._mm)
        self._mm = None
        if self.guard is not None:
            self.guard.set(0)
            self.guard.close()
            self.guard = None
        if self.shared is not None:
            self.shared.close()
            self.shared = None

    def begin(self, handle: QueuedSendHandle) -> None:
        """A transfer starts: a new guard value, revoked the moment it fails."""
        if self.guard is None:
            return
        self.seq += 1
        self.bases = {}
        self.guard.set(self.seq)
        guard = self.guard
        handle.set_before_fail(lambda: guard.set(0))

    def end(self, handle: QueuedSendHandle) -> None:
        handle.set_before_fail(None)
        if self.guard is not None:
            self.guard.set(0)

    def base_of(self, rows: torch.Tensor, deadline: float) -> int | None:
        """Offset of the layer's rows in the memfd the receiver maps (shared once per connection and
        cache), or None: not in a memfd, these chunks go through the slots."""
        key = rows.data_ptr()
        if key not in self.bases:
            if not self.bases:  # once per transfer: which memfd holds the cache now, and where
                self._refresh(rows, deadline)
            self.bases[key] = None if self.shared is None else self.shared.offset_of(rows)
        return self.bases[key]

    def _refresh(self, rows: torch.Tensor, deadline: float) -> None:
        # A cache freed since the last transfer must not be read through an address that now holds
        # something else: keep only what /proc/self/maps says now.
        found = find_shared_cache(rows)
        if found is not None and self.shared is not None and _inode(found) == _inode(self.shared):
            self.shared.close()  # the same memfd (the receiver has it); its address may have moved
            self.shared = found
        elif found is not None:
            self._share(found, deadline)
        elif self.shared is not None:
            self.shared.close()
            self.shared = None

    def _share(self, found: SharedCache, deadline: float) -> None:
        self.flush(deadline)
        framing.send_buffers(self.sock, [framing.pack(framing.CACHE, 0, 0, found.size)], deadline, "shm cache")
        self.sock.settimeout(framing._timeout(deadline, "shm cache"))
        try:
            socket.send_fds(self.sock, [b"F"], [found.fd, self.guard.fd])
        except OSError as e:
            found.close()
            raise TransferError(TransferErrorCode.UNAVAILABLE, f"shm cache: {e}") from None
        if self.shared is not None:
            self.shared.close()
        self.shared = found


class ShmSenderPlane:
    name = NAME

    def __init__(self, chunk_bytes: int, max_idle_per_peer: int = 8, one_copy: bool = True):
        """``one_copy=False``: always the slots (tests, and the benchmark's comparison)."""
        self.chunk_bytes = chunk_bytes
        self.one_copy = one_copy
        self.chunks = {"one_copy": 0, "slots": 0}  # chunks sent each way (tests, the benchmark)
        self.pool = ConnectionPool(self._connect, max_idle_per_peer)

    def _connect(self, offer: TransportOffer, deadline: float) -> ShmConnection:
        what = f"shm KV connection to {offer.address}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fds: list[int] = []
        try:
            sock.settimeout(framing._timeout(deadline, what))
            try:
                sock.connect("\0" + offer.address)
            except OSError as e:  # another network namespace, or the receiver is gone
                raise TransferError(TransferErrorCode.UNAVAILABLE, f"{what}: {e}") from None
            ticket = offer.ticket.encode()
            hello = [framing.pack(framing.HELLO, ONE_COPY if self.one_copy else 0, 0, len(ticket), self.chunk_bytes), ticket]
            framing.send_buffers(sock, hello, deadline, what)
            sock.settimeout(framing._timeout(deadline, what))
            msg, fds, _, _ = socket.recv_fds(sock, framing.HEADER.size, 1)
            buf = bytearray(framing.HEADER.size)
            buf[: len(msg)] = msg
            if len(msg) == 0:
                raise framing.PeerClosed(what)
            if len(msg) < len(buf):
                framing.recv_into(sock, memoryview(buf)[len(msg) :], deadline, what)
            kind, num_slots, flags, nbytes, _ = framing.HEADER.unpack(buf)
            if kind == framing.ERROR:
                raise framing.error_from_payload(framing.recv_payload(sock, nbytes, deadline, what), what)
            if kind != framing.HELLO_OK or len(fds) != 1:
                raise TransferError(TransferErrorCode.INVALID, f"{what}: no slots in the receiver's answer")
            mm = mmap.mmap(fds[0], num_slots * nbytes)
        except BaseException:
            sock.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)  # mapped (or failed): the descriptor is not needed any more
        conn = ShmConnection(
            sock, mm, num_slots, nbytes, checksums=not flags & NO_CHECKSUMS, one_copy=bool(flags & ONE_COPY)
        )
        conn.chunks = self.chunks
        return conn

    def probe(self, offer: TransportOffer, deadline: float) -> None:
        self.pool.give_back(offer, self.pool.take(offer, deadline))

    def transfer(self, handle: QueuedSendHandle, offer: TransportOffer, header) -> None:
        with self.pool.borrow(offer, time.monotonic() + handle.remaining()) as conn:
            handle.set_interrupt(lambda: framing.shutdown(conn.sock))
            if not conn.checksums:
                handle.skip_checksums()
            try:
                conn.begin(handle)
                stream_transfer(conn, handle, header, _send_chunk, on_frame=_slot_freed)
            finally:
                conn.end(handle)
                handle.set_interrupt(None)

    def forget(self, address: str) -> None:
        self.pool.forget(address)

    def close(self) -> None:
        self.pool.close()


def _slot_freed(conn: ShmConnection, frame: tuple) -> None:
    if frame[0] != framing.SLOT_FREE:
        raise TransferError(TransferErrorCode.INVALID, f"unexpected frame kind {frame[0]} on a shm connection")
    conn.free.append(frame[1])


def _inode(shared: SharedCache) -> int:
    return os.fstat(shared.fd).st_ino


def _send_chunk(conn: ShmConnection, chunk: Chunk, deadline: float, checksums: LayerChecksums | None) -> None:
    if conn.one_copy and _announce(conn, chunk, deadline, checksums):
        conn.chunks["one_copy"] += 1
        return
    conn.chunks["slots"] += 1
    if chunk.nbytes > conn.slot_bytes:
        raise TransferError(TransferErrorCode.INVALID, f"chunk of {chunk.nbytes} bytes > slot of {conn.slot_bytes}")
    while not conn.free:  # every slot in flight: wait for the receiver to drain one
        conn.flush(deadline)  # it frees only slots it was told about
        frame = framing.recv_frame(conn.sock, deadline, "shm slot")
        if frame[0] == framing.ERROR:
            raise framing.error_from_payload(framing.recv_payload(conn.sock, frame[3], deadline, "shm"), "shm")
        _slot_freed(conn, frame)
    slot = conn.free.popleft()
    rows, row_bytes = chunk.rows, chunk.rows.shape[1]
    out = conn.slots[slot, : chunk.nbytes].view(len(chunk.row_ids), row_bytes)
    with torch.inference_mode():  # the engine's cache may be an inference tensor
        if row_bytes % 8 == 0:  # 8-byte elements: a row copy at memcpy speed
            torch.index_select(rows.view(torch.float64), 0, chunk.row_index, out=out.view(torch.float64))
        else:
            torch.index_select(rows, 0, chunk.row_index, out=out)
    if checksums is not None:
        checksums.update(chunk.layer_idx, out.numpy())
    conn.pending.append(framing.pack(framing.SLOT_DATA, chunk.layer_idx, chunk.offset, chunk.nbytes, slot))
    if len(conn.pending) >= conn.batch:
        conn.flush(deadline)


def _announce(conn: ShmConnection, chunk: Chunk, deadline: float, checksums: LayerChecksums | None) -> bool:
    """One copy: name the chunk's rows in our cache (READY) instead of copying them; False when the
    cache is not shared (the chunk goes through a slot)."""
    rows = chunk.device_rows
    if rows.device.type != "cpu":
        return False
    base = conn.base_of(rows, deadline)
    if base is None:
        return False
    if checksums is not None:  # over the source blocks, in payload order
        views = chunk.views()
        if len(views) > 16:  # scattered blocks: one gathered hash call beats one per run (~4 us each)
            views = [pack_rows(b"", chunk.rows, chunk.row_ids)]
        for view in views:
            checksums.update(chunk.layer_idx, view)
    ids = framing.HEADER_SEQ.pack(conn.seq) + chunk.row_index.numpy().tobytes()
    conn.pending += [framing.pack(framing.READY, chunk.layer_idx, chunk.offset, chunk.nbytes, base), ids]
    if len(conn.pending) >= 2 * MAX_READY_BATCH:
        conn.flush(deadline)
    return True
