"""The data planes' listener: a connection past the limit is refused with an ERROR frame (not queued),
a wrong ticket is refused, and close() unblocks a connection's thread."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from kvferry.transport import framing
from kvferry.transport.base import TransferError, TransferErrorCode
from kvferry.transport.listener import Listener, check_hello, listen_tcp


def test_a_connection_past_the_limit_is_refused_and_close_unblocks_the_held_one():
    sock, address = listen_tcp("127.0.0.1")
    listener = Listener(sock, limit=1, what="KV connections")
    served: list[socket.socket] = []
    accept = threading.Thread(target=listener.accept_loop, args=(served.append,), daemon=True)
    accept.start()
    host, port = address.rsplit(":", 1)
    first = socket.create_connection((host, int(port)))
    while not served:
        time.sleep(0.01)
    second = socket.create_connection((host, int(port)))
    kind, _, _, nbytes, _ = framing.recv_frame(second, time.monotonic() + 5, "refusal")
    error = framing.error_from_payload(framing.recv_payload(second, nbytes, time.monotonic() + 5, "refusal"), "x")
    assert kind == framing.ERROR and error.code == TransferErrorCode.UNAVAILABLE
    assert "1 KV connections open" in error.message and listener.total == 1
    listener.close()
    accept.join(timeout=2)
    assert not accept.is_alive()
    assert served[0].recv(1) == b""  # shut down by close(): its thread would see EOF
    first.close(), second.close(), served[0].close()


def test_a_hello_without_the_ticket_is_refused():
    a, b = socket.socketpair()
    framing.send_control(a, framing.HELLO, b"wrong", time.monotonic() + 5, "hello")
    with pytest.raises(TransferError) as e:
        check_hello(b, "right", time.monotonic() + 5)
    assert e.value.code == TransferErrorCode.INCOMPATIBLE
    framing.send_control(a, framing.HELLO, b"right", time.monotonic() + 5, "hello")
    assert check_hello(b, "right", time.monotonic() + 5)[0] == framing.HELLO
    a.close(), b.close()
