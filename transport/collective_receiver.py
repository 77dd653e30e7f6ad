"""The receiving end of the collective data plane (``--kv-transport gloo|nccl``): a control socket per
prefill-decode pair, the KV bytes over the pair's 2-rank group (``collective_group.py``).

The gRPC handshake offers the plane (its control address and a ticket). A pair's lifecycle (one
thread each, at most ``max_pairs``):
1. HELLO with the ticket; the answer (HELLO_OK) names the rendezvous: the port of a ``TCPStore`` opened
   for this pair on the control connection's local address, a secret prefix and the pair's epoch.
   Both ends build the group over it (the prefill worker is rank 0).
2. Transfers, several at once, each with an id (the frame's ``a``): OPEN(id, KVHeader) ->
   ``receiver.open`` (a refusal is ERROR(id); the pair goes on); DATA(id, offset into the transfer's
   payload, nbytes, sequence number) -> a ``recv`` of that many bytes plus the 16-byte stamp, posted
   at once (up to ``depth`` in flight, into staging buffers on the plane's device), checked against
   the stamp and written into the blocks when it completes; FINISH(id, KVTrailer) ->
   ``session.finish`` (checksums verified) -> ACK(id); ABORT(id) -> the session fails.
3. Any failure of the group or the socket (a peer gone, a deadline, an out-of-order message) fails
   every session of the pair and ends it: the socket closes and the group is dropped. The sender
   builds a new pair, under a new epoch, for its next transfer.
A DATA frame of a transfer that was refused or cancelled is still received (the group's messages must
be consumed in order) and dropped: a late byte lands in a staging buffer, never in freed blocks.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import socket
import time
from collections import deque
from dataclasses import dataclass

import torch

from kvferry.proto import kv_transfer_pb2 as pb
from kvferry.transport import framing
from kvferry.transport.base import TransferError, TransferErrorCode, TransportOffer
from kvferry.transport.collective_group import RECEIVER_RANK, STAMP, PairGroup, open_store, read_stamp, staging_device
from kvferry.transport.grpc_transport import header_from_proto, trailer_from_proto
from kvferry.transport.listener import ListeningServer, check_hello, listen_tcp
from kvferry.transport.receiver import KVReceiver, ReceiveSession

logger = logging.getLogger(__name__)


def start_collective_server(
    receiver: KVReceiver, ticket: str, backend: str, host: str = "127.0.0.1", advertise_host: str | None = None,
) -> tuple[CollectiveServer, TransportOffer]:
    listener, address = listen_tcp(host, 0, advertise_host)
    server = CollectiveServer(receiver, listener, backend, ticket)
    return server, TransportOffer(backend, address=address, ticket=ticket)


@dataclass
class _Transfer:
    session: ReceiveSession | None  # None once refused, failed or finished: its DATA is dropped
    layer_nbytes: int
    request_id: str


@dataclass
class _Posted:
    xfer: int
    layer_idx: int
    offset: int
    nbytes: int
    seq: int
    buffer: torch.Tensor  # a staging buffer of at least nbytes + the stamp; the message is its start
    work: object


class CollectiveServer(ListeningServer):
    # Each pair's thread destroys its group on the way out: close() waits for that, so that a process
    # exiting right after close() never destroys a group while the interpreter is finalizing (torch aborts).
    close_wait_s = 5.0
    thread_kind = "pair"

    def __init__(
        self, receiver: KVReceiver, listener: socket.socket, backend: str, ticket: str,
        io_timeout_s: float = 30.0, idle_timeout_s: float = 300.0, rendezvous_timeout_s: float = 30.0,
        max_pairs: int = 64, depth: int = 4,
    ):
        super().__init__(receiver, listener, backend, ticket, max_pairs, "KV pairs", io_timeout_s, idle_timeout_s)
        self.rendezvous_timeout_s = rendezvous_timeout_s
        self.depth = depth  # receives in flight per pair: one message's rendezvous hides behind others
        self.device = staging_device(backend, receiver.kv_caches[0].device)
        self._epochs = itertools.count(1)
        self.epochs_started = 0
        self._start_accepting()

    # ---- one pair ----------------------------------------------------------------------------------
    def _serve(self, conn: socket.socket) -> None:
        transfers: dict[int, _Transfer] = {}
        group: PairGroup | None = None
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            group = self._form_pair(conn)
            self._serve_pair(conn, group, transfers)
        except TransferError as e:
            if group is not None:
                group.fail(e)
                logger.info("KV %s pair epoch %d ended: %s", self.transport, group.epoch, e.message)
            self._fail_all(transfers, e)
            framing.send_error_and_close(conn, e)
        except Exception as e:
            logger.exception("KV %s pair failed", self.transport)
            self._fail_all(transfers, TransferError(TransferErrorCode.UNAVAILABLE, f"{type(e).__name__}: {e}"))
        finally:
            if group is not None:
                group.close()  # here, on this thread, before close() stops waiting for it
            conn.close()

    def _form_pair(self, conn: socket.socket) -> PairGroup:
        deadline = time.monotonic() + self.rendezvous_timeout_s
        check_hello(conn, self.ticket, deadline)
        local_host = conn.getsockname()[0]
        store = open_store(local_host, self.rendezvous_timeout_s)
        epoch = next(self._epochs)
        prefix = f"kvferry-kv/{secrets.token_hex(16)}/{epoch}"  # only this pair's sender learns it
        answer = json.dumps({"store_port": store.port, "prefix": prefix, "epoch": epoch}).encode()
        framing.send_control(conn, framing.HELLO_OK, answer, deadline, "hello")
        group = PairGroup(self.transport, store, prefix, RECEIVER_RANK, epoch, local_host, deadline)
        self.epochs_started += 1
        return group

    def _serve_pair(self, conn: socket.socket, group: PairGroup, transfers: dict[int, _Transfer]) -> None:
        posted: deque[_Posted] = deque()
        free: list[torch.Tensor] = []
        next_seq = 0
        what = f"KV {self.transport} pair epoch {group.epoch}"
        while True:
            if posted and (len(posted) >= self.depth or not framing.readable(conn)):
                free.append(self._complete(conn, group, posted.popleft(), transfers))
                continue
            quiet = not posted and not any(t.session for t in transfers.values())
            wait_s = self.idle_timeout_s if quiet else self.io_timeout_s
            try:
                kind, xfer, offset, nbytes, extra = framing.recv_frame(conn, time.monotonic() + wait_s, what)
            except TransferError:
                if quiet:
                    return  # the sender closed an idle pair (or it sat idle too long): nothing is lost
                raise
            if kind == framing.DATA:
                t = self._known(transfers, xfer)
                if extra != next_seq:
                    raise TransferError(TransferErrorCode.INVALID, f"{what}: DATA #{extra}, expected #{next_seq}")
                next_seq += 1
                layer_idx, layer_offset = divmod(offset, t.layer_nbytes) if t.layer_nbytes else (0, 0)
                if not 0 < nbytes <= self.receiver.max_chunk_bytes or layer_offset + nbytes > t.layer_nbytes:
                    raise TransferError(TransferErrorCode.INVALID, f"{what}: DATA of {nbytes} bytes at {offset}")
                buffer = self._buffer(free, nbytes + STAMP.size)
                work = group.recv(buffer[: nbytes + STAMP.size])
                posted.append(_Posted(xfer, layer_idx, layer_offset, nbytes, extra, buffer, work))
                continue
            payload = framing.recv_payload(conn, nbytes, time.monotonic() + self.io_timeout_s, what)
            if kind == framing.OPEN:
                if xfer in transfers:
                    raise TransferError(TransferErrorCode.INVALID, f"{what}: transfer id {xfer} opened twice")
                transfers[xfer] = self._open(conn, xfer, payload)
                continue
            if kind not in (framing.FINISH, framing.ABORT):
                raise TransferError(TransferErrorCode.INVALID, f"{what}: unexpected frame kind {kind}")
            t = self._known(transfers, xfer)
            while posted:  # the transfer's data first (and whatever was posted before it: in order)
                free.append(self._complete(conn, group, posted.popleft(), transfers))
            del transfers[xfer]
            if t.session is None:
                continue
            if kind == framing.ABORT:
                reason = payload.decode(errors="replace")
                t.session.fail(TransferError(TransferErrorCode.ABORTED, f"sender aborted: {reason}"))
                continue
            try:
                t.session.finish(trailer_from_proto(pb.KVTrailer.FromString(payload)))
            except TransferError as e:
                t.session.fail(e)
                self._send(conn, framing.ERROR, xfer, framing.error_payload(e))
                continue
            ack = pb.PushKVResponse(request_id=t.request_id, bytes_received=t.session.bytes_received,
                                    receive_seconds=t.session.seconds)
            self._send(conn, framing.ACK, xfer, ack.SerializeToString())

    def _open(self, conn: socket.socket, xfer: int, payload: bytes) -> _Transfer:
        header = header_from_proto(pb.KVHeader.FromString(payload))
        try:
            session = self.receiver.open(header, transport=self.transport)
        except TransferError as e:  # refused (no reservation, restarted...): the pair goes on
            self._send(conn, framing.ERROR, xfer, framing.error_payload(e))
            return _Transfer(None, header.layer_nbytes, header.request_id)
        return _Transfer(session, header.layer_nbytes, header.request_id)

    def _complete(self, conn: socket.socket, group: PairGroup, p: _Posted, transfers: dict[int, _Transfer]):
        """Wait for one posted receive, check its stamp, write it into its transfer's blocks (or drop
        it); returns its buffer for reuse."""
        group.wait(p.work, time.monotonic() + self.io_timeout_s, f"KV {self.transport} receive #{p.seq}")
        got = read_stamp(p.buffer[p.nbytes : p.nbytes + STAMP.size])
        if got != (group.epoch, p.seq):
            raise TransferError(
                TransferErrorCode.INVALID,
                f"KV {self.transport} pair out of order: message {got} where (epoch, seq) "
                f"{(group.epoch, p.seq)} was expected",
            )
        t = transfers.get(p.xfer)
        if t is None or t.session is None:
            return p.buffer
        data = p.buffer[: p.nbytes]
        try:
            if data.is_cuda:  # NCCL: the rows stay on the GPU
                t.session.write_rows(p.layer_idx, p.offset, data.view(-1, self.receiver.cache_rows[0].shape[1]))
            else:
                t.session.write(p.layer_idx, p.offset, memoryview(data.numpy()))
                if not t.session.copies_inline:
                    t.session.flush()  # a GPU cache's copy thread must be done with the buffer
        except TransferError as e:  # cancelled (abort, lease) or malformed: this transfer only
            t.session.fail(e)
            t.session = None
            self._send(conn, framing.ERROR, p.xfer, framing.error_payload(e))
        return p.buffer

    def _buffer(self, free: list[torch.Tensor], nbytes: int) -> torch.Tensor:
        buffer = free.pop() if free else None
        if buffer is None or buffer.numel() < nbytes:  # at most depth buffers, each the largest chunk seen
            buffer = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8, device=self.device)
        return buffer

    def _known(self, transfers: dict[int, _Transfer], xfer: int) -> _Transfer:
        t = transfers.get(xfer)
        if t is None:
            raise TransferError(TransferErrorCode.INVALID, f"KV {self.transport} frame for unknown transfer {xfer}")
        return t

    def _send(self, conn: socket.socket, kind: int, xfer: int, payload: bytes) -> None:
        framing.send_control(conn, kind, payload, time.monotonic() + self.io_timeout_s, "KV pair answer", a=xfer)

    @staticmethod
    def _fail_all(transfers: dict[int, _Transfer], error: TransferError) -> None:
        if isinstance(error, framing.PeerClosed):
            error = TransferError(TransferErrorCode.UNAVAILABLE, f"the sender went away mid-transfer ({error.message})")
        for t in transfers.values():
            if t.session is not None:
                t.session.fail(error)
        transfers.clear()
