"""The tcp data plane: KV bytes over a plain socket, for two boxes without NCCL (and the fallback on
one box where shared memory cannot be had). gRPC stays the control plane: the handshake hands out the
data socket's address and a ticket; the reservation is the decode worker's ``Reserve``.

Sender: per chunk, a 32-byte frame header and the chunk's rows go out in one ``sendmsg`` straight from
the cache (one iovec per run of adjacent rows: no copy in Python; a GPU cache is gathered to the host
first), and the layer's checksum is fed from the same views. Receiver: ``recv_into`` one staging buffer
per connection, then ``session.write`` scatters whole rows into the reserved blocks (streaming
stores). The frames and the loop are ``framing.py``, ``stream_client.py`` and ``stream_server.py``.
"""

from __future__ import annotations

import time

from kvferry.transport import framing
from kvferry.transport.base import TransportOffer
from kvferry.transport.integrity import LayerChecksums
from kvferry.transport.listener import listen_tcp
from kvferry.transport.receiver import KVReceiver
from kvferry.transport.send_queue import Chunk, QueuedSendHandle
from kvferry.transport.stream_client import Connection, ConnectionPool, hello, stream_transfer
from kvferry.transport.stream_server import SocketPayload, StreamDataServer

NAME = "tcp"


def start_tcp_server(
    receiver: KVReceiver, ticket: str, host: str = "127.0.0.1", advertise_host: str | None = None, port: int = 0
) -> tuple[StreamDataServer, TransportOffer]:
    """Listen for KV data connections on ``host:port`` (0: any free port)."""
    listener, address = listen_tcp(host, port, advertise_host)
    server = StreamDataServer(receiver, listener, NAME, ticket, lambda: SocketPayload(receiver.max_chunk_bytes))
    return server, TransportOffer(NAME, address=address, ticket=ticket)


class TcpSenderPlane:
    name = NAME

    def __init__(self, max_idle_per_peer: int = 8):
        self.pool = ConnectionPool(self._connect, max_idle_per_peer)

    def _connect(self, offer: TransportOffer, deadline: float) -> Connection:
        what = f"tcp KV connection to {offer.address}"
        sock = framing.dial(offer.address, deadline, what)
        try:
            hello(sock, offer.ticket, deadline, what)
        except BaseException:
            sock.close()
            raise
        return Connection(sock)

    def probe(self, offer: TransportOffer, deadline: float) -> None:
        """Connect once (the connection is pooled for the first transfer)."""
        self.pool.give_back(offer, self.pool.take(offer, deadline))

    def transfer(self, handle: QueuedSendHandle, offer: TransportOffer, header) -> None:
        with self.pool.borrow(offer, time.monotonic() + handle.remaining()) as conn:
            handle.set_interrupt(lambda: framing.shutdown(conn.sock))
            try:
                stream_transfer(conn, handle, header, _send_chunk)
            finally:
                handle.set_interrupt(None)

    def forget(self, address: str) -> None:
        self.pool.forget(address)

    def close(self) -> None:
        self.pool.close()


def _send_chunk(conn: Connection, chunk: Chunk, deadline: float, checksums: LayerChecksums) -> None:
    views = chunk.views()
    for view in views:
        checksums.update(chunk.layer_idx, view)
    framing.send_buffers(
        conn.sock, [framing.pack(framing.DATA, chunk.layer_idx, chunk.offset, chunk.nbytes), *views], deadline,
        f"KV chunk of layer {chunk.layer_idx}",
    )

