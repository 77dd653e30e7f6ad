"""The accepting side of the socket data planes (tcp, shm, gloo/nccl control): a listening socket, the
connections it holds open (at most ``limit``; one more is refused with an ERROR frame, not queued), the
HELLO ticket check, a close that unblocks every connection's thread at once, and ``ListeningServer``,
the server both planes' receivers are (a thread per connection)."""

from __future__ import annotations

import hmac
import socket
import threading
import time
from collections.abc import Callable

from kvferry.transport import framing
from kvferry.transport.base import TransferError, TransferErrorCode


def listen_tcp(host: str, port: int = 0, advertise_host: str | None = None) -> tuple[socket.socket, str]:
    """A listening TCP socket on ``host:port`` (0: any free port) and the address to advertise for it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(64)
    bound = listener.getsockname()[1]
    shown = advertise_host or host
    return listener, f"[{shown}]:{bound}" if ":" in shown else f"{shown}:{bound}"


def check_hello(conn: socket.socket, ticket: str, deadline: float) -> tuple[int, int, int, int, int]:
    """Read the connection's HELLO frame; raise unless it carries ``ticket``."""
    hello = framing.recv_frame(conn, deadline, "hello")
    kind, nbytes = hello[0], hello[3]
    offered = framing.recv_payload(conn, nbytes, deadline, "hello")
    if kind != framing.HELLO or not hmac.compare_digest(offered, ticket.encode()):
        raise TransferError(
            TransferErrorCode.INCOMPATIBLE,
            "data-plane connection without this receiver's ticket (handshake with it over gRPC first)",
        )
    return hello


class Listener:
    def __init__(self, sock: socket.socket, limit: int, what: str):
        self.sock = sock  # bound and listening
        self.limit = limit
        self.what = what  # names what is full in the refusal: "KV connections", "KV pairs"
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        self.total = 0  # accepted since start
        self.closed = False

    def accept_loop(self, serve: Callable[[socket.socket], None]) -> None:
        """Until closed: ``serve`` each admitted connection (it must return at once: start a thread)."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with self.lock:
                if self.closed:
                    conn.close()
                    return
                full = len(self.connections) >= self.limit
                if not full:
                    self.connections.add(conn)
                    self.total += 1
            if full:
                error = TransferError(TransferErrorCode.UNAVAILABLE, f"{self.limit} {self.what} open")
                threading.Thread(target=framing.send_error_and_close, args=(conn, error), daemon=True).start()
                continue
            serve(conn)

    def discard(self, conn: socket.socket) -> None:
        with self.lock:
            self.connections.discard(conn)

    def close(self) -> None:
        """Stop accepting and shut every connection down: each one's thread fails its sessions and exits."""
        with self.lock:
            self.closed = True
            connections = list(self.connections)
        framing.shutdown(self.sock)
        self.sock.close()
        for conn in connections:
            framing.shutdown(conn)



class ListeningServer:
    """A data plane's receiving server: a ``Listener`` whose accept thread gives each admitted connection
    a thread of its own running ``_serve(conn)``, which the plane defines. The plane sets its own fields,
    then calls ``_start_accepting`` (a connection may arrive at once). ``close`` stops accepting, shuts
    every connection down and waits up to ``close_wait_s`` for the connections' threads to end."""

    close_wait_s = 0.0
    thread_kind = "conn"  # names the connection threads: kv-<transport>-<kind>

    def __init__(
        self, receiver, sock: socket.socket, transport: str, ticket: str, limit: int, what: str,
        io_timeout_s: float, idle_timeout_s: float,
    ):
        self.receiver = receiver  # a KVReceiver
        self.transport = transport
        self.ticket = ticket
        self.io_timeout_s = io_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._listener = Listener(sock, limit, what)
        self._threads: set[threading.Thread] = set()  # under the listener's lock
        self._accept_thread = threading.Thread(
            target=self._listener.accept_loop, args=(self._start,), name=f"kv-{transport}-accept", daemon=True
        )

    def _start_accepting(self) -> None:
        self._accept_thread.start()

    @property
    def connections_total(self) -> int:
        return self._listener.total  # admitted since start

    @property
    def num_connections(self) -> int:
        return len(self._listener.connections)

    def close(self) -> None:
        self._listener.close()
        self._accept_thread.join(timeout=2.0)
        end = time.monotonic() + self.close_wait_s
        with self._listener.lock:
            threads = list(self._threads)
        for thread in threads if self.close_wait_s > 0 else ():
            thread.join(timeout=max(end - time.monotonic(), 0.01))

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _start(self, conn: socket.socket) -> None:
        thread = threading.Thread(
            target=self._run, args=(conn,), name=f"kv-{self.transport}-{self.thread_kind}", daemon=True
        )
        with self._listener.lock:
            self._threads.add(thread)
        thread.start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        finally:
            with self._listener.lock:
                self._listener.connections.discard(conn)
                self._threads.discard(threading.current_thread())
