"""The shm data plane: prefill and decode workers on one host (same boot id) move KV through shared
memory; the socket carries only 32-byte frames.

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

from kvferry.transport import framing
from kvferry.transport.base import TransferError, TransferErrorCode, TransportOffer
from kvferry.transport.host import boot_id
from kvferry.transport.integrity import LayerChecksums
from kvferry.transport.receiver import KVReceiver
from kvferry.transport.send_queue import Chunk, QueuedSendHandle
from kvferry.transport.stream_client import Connection, ConnectionPool, stream_transfer
from kvferry.transport.stream_server import ConnectionPayload, StreamDataServer

NAME = "shm"
MEMFD_NAME = "kvferry-kv-slots"  # shown in /proc/<pid>/maps as /memfd:kvferry-kv-slots
PAGE = mmap.PAGESIZE
NO_CHECKSUMS = 1  # HELLO_OK flag (the frame's offset): the receiver verifies no checksums (integrity.py)


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
    """The receiver's side of one connection's slots."""

    def __init__(self, receiver: KVReceiver, num_slots: int, verify_checksums: bool):
        self.receiver = receiver
        self.num_slots = num_slots
        self.verify_checksums = verify_checksums
        self._freed: list[bytes] = []  # SLOT_FREE frames held back while more SLOT_DATA is waiting
        self.slot_bytes = 0
        self._mm: mmap.mmap | None = None

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

    def close(self) -> None:
        _unmap(self._mm)
        self._mm = None


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
    def __init__(self, sock: socket.socket, mm: mmap.mmap, num_slots: int, slot_bytes: int, checksums: bool):
        super().__init__(sock)
        self._mm = mm
        self.checksums = checksums  # whether the receiver verifies them
        self.slot_bytes = slot_bytes
        self.slots = torch.frombuffer(mm, dtype=torch.uint8).view(num_slots, slot_bytes)
        self.free = collections.deque(range(num_slots))
        self.batch = batch_size(num_slots)
        self.pending: list[bytes] = []  # SLOT_DATA frames of filled slots not sent yet

    def flush(self, deadline: float) -> None:
        if self.pending:
            frames, self.pending = self.pending, []
            framing.send_buffers(self.sock, frames, deadline, "shm slot")

    def close(self) -> None:
        super().close()
        self.slots = None  # drops the tensor's export of the mapping, so it can be unmapped
        _unmap(self._mm)
        self._mm = None


class ShmSenderPlane:
    name = NAME

    def __init__(self, chunk_bytes: int, max_idle_per_peer: int = 8):
        self.chunk_bytes = chunk_bytes
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
            hello = [framing.pack(framing.HELLO, 0, 0, len(ticket), self.chunk_bytes), ticket]
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
        return ShmConnection(sock, mm, num_slots, nbytes, checksums=not flags & NO_CHECKSUMS)

    def probe(self, offer: TransportOffer, deadline: float) -> None:
        self.pool.give_back(offer, self.pool.take(offer, deadline))

    def transfer(self, handle: QueuedSendHandle, offer: TransportOffer, header) -> None:
        conn = self.pool.take(offer, time.monotonic() + handle.remaining())
        handle.set_interrupt(lambda: _shutdown(conn.sock))
        if not conn.checksums:
            handle.skip_checksums()
        ok = False
        try:
            stream_transfer(conn, handle, header, _send_chunk, on_frame=_slot_freed)
            ok = True
        finally:
            handle.set_interrupt(None)
            if ok:
                self.pool.give_back(offer, conn)
            else:
                conn.close()

    def forget(self, address: str) -> None:
        self.pool.forget(address)

    def close(self) -> None:
        self.pool.close()


def _slot_freed(conn: ShmConnection, frame: tuple) -> None:
    if frame[0] != framing.SLOT_FREE:
        raise TransferError(TransferErrorCode.INVALID, f"unexpected frame kind {frame[0]} on a shm connection")
    conn.free.append(frame[1])


def _send_chunk(conn: ShmConnection, chunk: Chunk, deadline: float, checksums: LayerChecksums | None) -> None:
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


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
