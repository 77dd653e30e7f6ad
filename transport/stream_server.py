"""The receiving end of the socket data planes: accept connections, serve their transfers into a
``KVReceiver``. The tcp plane reads each DATA frame's payload off the socket; the shm plane's frames
name a slot of shared memory the sender already filled (``shm_transport.py``); everything else
(hello and ticket, header, trailer, acknowledgement, errors, deadlines) is this one loop.

A connection's lifecycle (one thread each, at most ``max_connections``):
1. HELLO with the ticket the receiver handed out in its (authenticated) gRPC handshake; a wrong one
   is refused. ``on_hello`` answers HELLO_OK (shm: with the slots' memfd attached).
2. Transfers, one after another (senders pool connections): OPEN -> ``receiver.open`` (refusals go
   back as ERROR), DATA / SLOT_DATA -> ``session.write`` (whole rows go straight into their blocks),
   FINISH -> ``session.finish`` (checksums verified) -> ACK.
3. Any failure fails the session (the decode worker frees its blocks) and ends the connection. A
   sender gone mid-transfer is seen at once (EOF), a stalled one after ``io_timeout_s``.
Received bytes land in a staging buffer or a slot first, never straight in the blocks: a receiver's
``cancel`` must be able to stop every write at once, which a ``recv_into`` that blocks on a slow
sender could not.
"""

from __future__ import annotations

import logging
import socket
import time

from kvferry.proto import kv_transfer_pb2 as pb
from kvferry.transport import framing
from kvferry.transport.base import TransferError, TransferErrorCode
from kvferry.transport.grpc_transport import header_from_proto, trailer_from_proto
from kvferry.transport.listener import ListeningServer, check_hello
from kvferry.transport.receiver import KVReceiver

logger = logging.getLogger(__name__)


class ConnectionPayload:
    """Where a connection's chunk bytes come from; one per connection."""

    verify_checksums = True  # False: the bytes never left this host's memory (shm, integrity.py)

    def on_hello(self, conn: socket.socket, hello: tuple[int, int, int, int, int], deadline: float) -> None:
        framing.send_control(conn, framing.HELLO_OK, b"", deadline, "hello")

    def data(self, conn: socket.socket, frame: tuple[int, int, int, int, int], deadline: float) -> memoryview:
        raise TransferError(TransferErrorCode.INVALID, f"unexpected frame kind {frame[0]}")

    def handle(self, conn: socket.socket, frame: tuple[int, int, int, int, int], session, deadline: float) -> bool:
        """Frames of the plane's own (shm: a shared cache, blocks ready in it); True when consumed."""
        return False

    def before_finish(self, conn: socket.socket, session) -> None:
        """Raise when the KV read so far cannot be trusted (shm's one copy: the sender revoked it)."""

    def done_with(self, conn: socket.socket, frame: tuple[int, int, int, int, int], deadline: float) -> None:
        """The chunk is in the blocks; its buffer may be reused."""

    def flush(self, conn: socket.socket, deadline: float) -> None:
        """Send what ``done_with`` held back (shm batches its SLOT_FREE frames); before the ACK."""

    def close(self) -> None: ...


class SocketPayload(ConnectionPayload):
    """tcp: DATA frames carry their payload; it is read into one staging buffer, reused."""

    def __init__(self, max_chunk_bytes: int):
        self.max_chunk_bytes = max_chunk_bytes
        self._staging = bytearray(0)

    def data(self, conn, frame, deadline) -> memoryview:
        kind, _, _, nbytes, _ = frame
        if kind != framing.DATA:
            return super().data(conn, frame, deadline)
        if nbytes == 0 or nbytes > self.max_chunk_bytes:
            raise TransferError(TransferErrorCode.INVALID, f"chunk of {nbytes} bytes (limit {self.max_chunk_bytes})")
        if len(self._staging) < nbytes:
            self._staging = bytearray(nbytes)
        view = memoryview(self._staging)[:nbytes]
        framing.recv_into(conn, view, deadline, "KV chunk")
        return view


class StreamDataServer(ListeningServer):
    def __init__(
        self,
        receiver: KVReceiver,
        listener: socket.socket,  # bound and listening
        transport: str,
        ticket: str,
        make_payload,  # () -> ConnectionPayload
        io_timeout_s: float = 30.0,
        idle_timeout_s: float = 300.0,
        max_connections: int = 64,  # pooled senders keep the connections few
    ):
        super().__init__(
            receiver, listener, transport, ticket, max_connections, "KV connections", io_timeout_s, idle_timeout_s
        )
        self._make_payload = make_payload
        self._start_accepting()

    def _serve(self, conn: socket.socket) -> None:
        payload = None
        try:
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = check_hello(conn, self.ticket, self._deadline())
            payload = self._make_payload()
            payload.on_hello(conn, hello, self._deadline())
            while self._serve_transfer(conn, payload):
                pass
        except TransferError as e:
            framing.send_error_and_close(conn, e)
        except Exception:
            logger.exception("KV %s connection failed", self.transport)
        finally:
            conn.close()
            if payload is not None:
                payload.close()

    def _serve_transfer(self, conn: socket.socket, payload: ConnectionPayload) -> bool:
        """One transfer; False when the connection ended (cleanly, between transfers)."""
        try:
            kind, _, _, nbytes, _ = framing.recv_frame(conn, time.monotonic() + self.idle_timeout_s, "idle")
        except TransferError:
            return False  # the sender closed its pooled connection, or it sat idle too long
        if kind != framing.OPEN:
            raise TransferError(TransferErrorCode.INVALID, f"expected a transfer's OPEN frame, got kind {kind}")
        header = header_from_proto(pb.KVHeader.FromString(framing.recv_payload(conn, nbytes, self._deadline(), "open")))
        # A refusal goes back as ERROR.
        session = self.receiver.open(header, transport=self.transport, verify_checksums=payload.verify_checksums)
        try:
            while True:
                frame = framing.recv_frame(conn, self._deadline(), f"KV of {header.request_id!r}")
                kind, a, offset, nbytes, _ = frame
                if kind == framing.FINISH:
                    trailer = pb.KVTrailer.FromString(framing.recv_payload(conn, nbytes, self._deadline(), "finish"))
                    payload.before_finish(conn, session)
                    session.finish(trailer_from_proto(trailer))
                    payload.flush(conn, self._deadline())
                    ack = pb.PushKVResponse(
                        request_id=header.request_id, bytes_received=session.bytes_received,
                        receive_seconds=session.seconds,
                    )
                    framing.send_control(conn, framing.ACK, ack.SerializeToString(), self._deadline(), "ack")
                    return True
                if kind == framing.ABORT:
                    reason = framing.recv_payload(conn, nbytes, self._deadline(), "abort").decode(errors="replace")
                    raise TransferError(TransferErrorCode.ABORTED, f"sender aborted: {reason}")
                if payload.handle(conn, frame, session, self._deadline()):
                    continue
                data = payload.data(conn, frame, self._deadline())
                session.write(a, offset, data)
                if not session.copies_inline:
                    session.flush()  # the copy thread must be done with the buffer before it is reused
                payload.done_with(conn, frame, self._deadline())
        except TransferError as e:
            session.fail(_sender_side(e))
            raise
        except Exception as e:
            session.fail(TransferError(TransferErrorCode.UNAVAILABLE, f"{type(e).__name__}: {e}"))
            raise

    def _deadline(self) -> float:
        return time.monotonic() + self.io_timeout_s


def _sender_side(error: TransferError) -> TransferError:
    if isinstance(error, framing.PeerClosed):
        return TransferError(TransferErrorCode.UNAVAILABLE, f"the sender went away mid-transfer ({error.message})")
    return error
