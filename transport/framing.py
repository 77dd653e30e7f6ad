"""Length-prefixed frames of the socket data planes (tcp, and shm's Unix-socket control channel).

Every frame is a fixed 32-byte header ``<B3xIQQQ``: kind, ``a`` (a layer index or a slot), ``offset``,
``nbytes`` (of the payload that follows, or of the shared-memory slot it refers to), ``extra``. Header
and trailer reuse the protobuf messages of kv_transfer.proto (``KVHeader``, ``KVTrailer``,
``PushKVResponse``), so one conversion serves every data plane. A connection opens with HELLO (the
receiver's ticket from the handshake), then carries transfers one after another:

    sender -> receiver: OPEN(KVHeader) DATA(layer, offset, nbytes)+payload ... FINISH(KVTrailer)
    receiver -> sender: ACK(PushKVResponse)  or, at any point, ERROR(code, message) and the end

An ERROR ends the connection: the receiver stops reading the transfer, drains what is in flight for a
moment (so the sender reads the reason instead of a reset) and closes. Every blocking call takes a
deadline (``time.monotonic()``); past it the call raises ``TransferError(DEADLINE)``.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import time

from kvferry.transport.base import TransferError, TransferErrorCode

HEADER = struct.Struct("<B3xIQQQ")
HEADER_SEQ = struct.Struct("<q")  # a READY frame's payload opens with the transfer's guard value
HELLO, OPEN, DATA, FINISH, ACK, ERROR, ABORT, HELLO_OK, SLOT_DATA, SLOT_FREE, CACHE, READY = range(1, 13)
MAX_CONTROL_BYTES = 1 << 20  # a header, trailer or error message; larger is a protocol error
IOV_MAX = 512  # buffers per sendmsg call (Linux allows 1024)


class PeerClosed(TransferError):
    def __init__(self, what: str):
        super().__init__(TransferErrorCode.UNAVAILABLE, f"{what}: connection closed by the peer")


def pack(kind: int, a: int = 0, offset: int = 0, nbytes: int = 0, extra: int = 0) -> bytes:
    return HEADER.pack(kind, a, offset, nbytes, extra)


def _timeout(deadline: float, what: str) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TransferError(TransferErrorCode.DEADLINE, f"{what}: deadline passed")
    return remaining


def recv_into(sock: socket.socket, view: memoryview, deadline: float, what: str) -> None:
    """Fill ``view`` from the socket (many ``recv_into`` calls into it, no intermediate buffer)."""
    got, n = 0, len(view)
    while got < n:
        sock.settimeout(_timeout(deadline, what))
        try:
            k = sock.recv_into(view[got:])
        except TimeoutError:
            raise TransferError(TransferErrorCode.DEADLINE, f"{what}: no bytes before the deadline") from None
        except OSError as e:
            raise TransferError(TransferErrorCode.UNAVAILABLE, f"{what}: {e}") from None
        if k == 0:
            raise PeerClosed(what)
        got += k


def recv_frame(sock: socket.socket, deadline: float, what: str) -> tuple[int, int, int, int, int]:
    buf = bytearray(HEADER.size)
    recv_into(sock, memoryview(buf), deadline, what)
    return HEADER.unpack(buf)


def recv_payload(sock: socket.socket, nbytes: int, deadline: float, what: str) -> bytes:
    if nbytes > MAX_CONTROL_BYTES:
        raise TransferError(TransferErrorCode.INVALID, f"{what}: control frame of {nbytes} bytes")
    buf = bytearray(nbytes)
    recv_into(sock, memoryview(buf), deadline, what)
    return bytes(buf)


def send_buffers(sock: socket.socket, buffers: list, deadline: float, what: str) -> None:
    """Write every buffer, in order, with ``sendmsg`` (scatter-gather: the rows go from the cache
    straight into the socket, no joined copy); partial writes are resumed."""
    views = [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]
    while views:
        sock.settimeout(_timeout(deadline, what))
        try:
            sent = sock.sendmsg(views[:IOV_MAX])
        except TimeoutError:
            raise TransferError(TransferErrorCode.DEADLINE, f"{what}: peer not reading before the deadline") from None
        except OSError as e:
            raise TransferError(TransferErrorCode.UNAVAILABLE, f"{what}: {e}") from None
        while sent and views:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


def send_control(sock: socket.socket, kind: int, payload: bytes, deadline: float, what: str, a: int = 0) -> None:
    send_buffers(sock, [pack(kind, a, 0, len(payload)), payload], deadline, what)


def error_payload(error: TransferError) -> bytes:
    return json.dumps({"code": error.code.value, "message": error.message}).encode()


def error_from_payload(payload: bytes, what: str) -> TransferError:
    try:
        fields = json.loads(payload)
        return TransferError(TransferErrorCode(fields["code"]), f"{what}: {fields['message']}")
    except (ValueError, KeyError, TypeError):
        return TransferError(TransferErrorCode.INVALID, f"{what}: unreadable error frame")


def readable(sock: socket.socket) -> bool:
    """True when the peer sent something (an ERROR, or EOF): checked between chunks, never blocks."""
    ready, _, _ = select.select([sock], [], [], 0)
    return bool(ready)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6 host]:port``."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def dial(address: str, deadline: float, what: str) -> socket.socket:
    """A TCP connection to ``address`` with Nagle off (frames are small and answered at once)."""
    try:
        sock = socket.create_connection(split_address(address), timeout=_timeout(deadline, what))
    except OSError as e:
        raise TransferError(TransferErrorCode.UNAVAILABLE, f"{what}: {e}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def shutdown(sock: socket.socket) -> None:
    """Unblock every thread in a call on ``sock`` (they see EOF or an error); quiet if already closed."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def send_error_and_close(sock: socket.socket, error: TransferError, drain_s: float = 1.0) -> None:
    """Tell the sender why, then close without a reset: read and drop what it still sends, briefly."""
    deadline = time.monotonic() + drain_s
    try:
        send_control(sock, ERROR, error_payload(error), deadline, "error frame")
        sock.shutdown(socket.SHUT_WR)
        scratch = bytearray(1 << 16)
        while time.monotonic() < deadline:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            if sock.recv_into(scratch) == 0:
                break
    except (OSError, TransferError):
        pass
    finally:
        sock.close()
