"""The sending end of the socket data planes: pooled connections and the transfer loop over them.

A connection carries one transfer at a time; after an acknowledged transfer it goes back to its
peer's pool for the next one (connecting and the hello cost a round trip or two; shm also maps its
slots once per connection). Any failure closes the connection instead. A pooled connection the
receiver closed meanwhile (restart, idle timeout) reads as EOF and is dropped before reuse.

The loop (``stream_transfer``): OPEN(header), then per queued chunk ``send_chunk`` (tcp: the rows
with ``sendmsg``; shm: the rows copied into a free slot, then a frame naming it), FINISH(trailer), and
the ACK. Between chunks it looks, without blocking, for an ERROR the receiver sent early (reservation
gone, lease expired) so a refused transfer stops at once instead of at its deadline.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from kvferry.transport import framing
from kvferry.transport.base import KVTrailer, TransferError, TransferErrorCode, TransportOffer
from kvferry.transport.grpc_transport import header_to_proto, trailer_to_proto
from kvferry.transport.integrity import LayerChecksums
from kvferry.transport.send_queue import Chunk, QueuedSendHandle


class Connection:
    """A data-plane socket; subclasses add per-connection state (shm: the mapped slots)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def flush(self, deadline: float) -> None:
        """Send the frames ``send_chunk`` held back (shm batches its slot frames); called before the
        transfer waits for the engine's next layer and before the trailer."""

    def close(self) -> None:
        self.sock.close()


class ConnectionPool:
    def __init__(self, connect: Callable[[TransportOffer, float], Connection], max_idle_per_peer: int = 8):
        self._connect = connect
        self.max_idle_per_peer = max_idle_per_peer
        self._lock = threading.Lock()
        self._idle: dict[str, list[Connection]] = {}
        self._closed = False

    def take(self, offer: TransportOffer, deadline: float) -> Connection:
        while True:
            with self._lock:
                idle = self._idle.get(offer.address)
                conn = idle.pop() if idle else None
            if conn is None:
                return self._connect(offer, deadline)
            if framing.readable(conn.sock):  # EOF (or a stray frame): the receiver closed it
                conn.close()
                continue
            return conn

    @contextmanager
    def borrow(self, offer: TransportOffer, deadline: float) -> Iterator[Connection]:
        """A connection for one transfer: given back when the block ends cleanly, else closed (the
        peer may be mid-frame, or gone)."""
        conn = self.take(offer, deadline)
        try:
            yield conn
        except BaseException:
            conn.close()
            raise
        self.give_back(offer, conn)

    def give_back(self, offer: TransportOffer, conn: Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(offer.address, [])
            if not self._closed and len(idle) < self.max_idle_per_peer:
                idle.append(conn)
                return
        conn.close()

    def forget(self, address: str) -> None:
        with self._lock:
            conns = self._idle.pop(address, [])
        for conn in conns:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [c for cs in self._idle.values() for c in cs]
            self._idle.clear()
        for conn in conns:
            conn.close()


def hello(sock: socket.socket, ticket: str, deadline: float, what: str, chunk_bytes: int = 0):
    """Send HELLO with the ticket; returns the receiver's HELLO_OK frame (raises its ERROR)."""
    payload = ticket.encode()
    framing.send_buffers(sock, [framing.pack(framing.HELLO, 0, 0, len(payload), chunk_bytes), payload], deadline, what)
    frame = framing.recv_frame(sock, deadline, what)
    if frame[0] == framing.ERROR:
        raise framing.error_from_payload(framing.recv_payload(sock, frame[3], deadline, what), what)
    if frame[0] != framing.HELLO_OK:
        raise TransferError(TransferErrorCode.INVALID, f"{what}: expected HELLO_OK, got frame kind {frame[0]}")
    return frame


def stream_transfer(
    conn: Connection,
    handle: QueuedSendHandle,
    header,
    send_chunk: Callable[[Connection, Chunk, float, LayerChecksums | None], None],
    on_frame: Callable[[Connection, tuple], None] | None = None,
) -> None:
    """Run one transfer over ``conn``; returns on the ACK, raises ``TransferError`` otherwise.
    ``send_chunk(conn, chunk, deadline, checksums)`` writes one chunk and feeds its bytes to the
    layer's checksum (None: the receiver asked for none, shm); ``on_frame`` takes receiver frames
    other than ACK/ERROR (shm: SLOT_FREE)."""
    sock = conn.sock
    what = f"KV {handle.request_id!r} to {handle.target.address}"

    def deadline() -> float:
        return time.monotonic() + handle.remaining()

    try:
        framing.send_control(sock, framing.OPEN, header_to_proto(header).SerializeToString(), deadline(), what)
        while True:
            if not handle.ready():  # about to wait for the engine: what is written goes now
                conn.flush(deadline())
            item = handle.next_item()
            if isinstance(item, KVTrailer):
                conn.flush(deadline())
                framing.send_control(sock, framing.FINISH, trailer_to_proto(item).SerializeToString(), deadline(), what)
                while True:
                    frame = framing.recv_frame(sock, deadline(), what)
                    if frame[0] == framing.ACK:
                        framing.recv_payload(sock, frame[3], deadline(), what)
                        return
                    _other_frame(conn, frame, deadline(), what, on_frame)
            while framing.readable(sock):  # the receiver spoke first: an early refusal, or a freed slot
                _other_frame(conn, framing.recv_frame(sock, deadline(), what), deadline(), what, on_frame)
            send_chunk(conn, item, deadline(), handle.checksums)
            handle.bytes_sent += item.nbytes
    except TransferError as e:
        if e.code is TransferErrorCode.UNAVAILABLE:  # a reset or EOF: the receiver may have said why
            raise _reason_sent(sock, what) or _deadline_or(handle, e) from None
        raise _deadline_or(handle, e) from None


def _other_frame(conn: Connection, frame: tuple, deadline: float, what: str, on_frame) -> None:
    if frame[0] == framing.ERROR:
        raise framing.error_from_payload(framing.recv_payload(conn.sock, frame[3], deadline, what), what)
    if on_frame is None:
        raise TransferError(TransferErrorCode.INVALID, f"{what}: unexpected frame kind {frame[0]}")
    on_frame(conn, frame)


def _reason_sent(sock: socket.socket, what: str) -> TransferError | None:
    """After a failed write: the receiver's ERROR frame, if it sent one before closing."""
    try:
        frame = framing.recv_frame(sock, time.monotonic() + 0.2, what)
        if frame[0] == framing.ERROR:
            return framing.error_from_payload(framing.recv_payload(sock, frame[3], time.monotonic() + 0.2, what), what)
    except (TransferError, OSError):
        pass
    return None


def _deadline_or(handle: QueuedSendHandle, error: TransferError) -> TransferError:
    if error.code is TransferErrorCode.DEADLINE or handle.remaining() <= 0:
        return TransferError(TransferErrorCode.DEADLINE, handle.deadline_message())
    return error
