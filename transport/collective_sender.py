"""The sending end of the collective data plane: one pair per decode peer (a control socket and a
2-rank group, ``collective_group.py``), shared by every transfer to that peer.

Forming a pair: connect to the address the gRPC handshake offered, HELLO with its ticket, and build
the group over the ``TCPStore`` the answer names (this end is rank 0); the negotiation's probe does it
once, and the pair is kept until it breaks. A transfer on the pair (its own thread, several at once):
OPEN(id, KVHeader); per chunk, under the pair's lock so that control frames and group operations keep
one order, the rows are copied into a staging buffer (host memory for Gloo, the GPU for NCCL) with the
stamp after them, the layer's checksum is fed from it, a DATA frame (id, offset, nbytes, sequence
number) goes on the socket and the buffer into ``send``; up to ``depth`` sends are in flight, the
oldest waited for (with the transfer's deadline) when a buffer is needed. Then FINISH(id, KVTrailer)
and the ACK, which the pair's reader thread hands to the waiting transfer, as it does an early
ERROR(id) (the receiver refused or cancelled that transfer: it stops at its next chunk). A transfer
that fails while the pair lives sends ABORT(id), so the receiver frees its blocks at once.

A failure of the group or the socket (peer gone, a deadline in a group operation, a pair-level
ERROR) breaks the pair: every transfer on it fails, the socket is shut so the receiver drops its side,
and the group is released once no operation waits on it. The next transfer forms a new pair, which
the receiver numbers as a new epoch (logged as a warning: a pair that keeps breaking is visible).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import select
import socket
import threading
import time
from collections import deque

import torch

from kvferry.transport import framing
from kvferry.transport.base import KVTrailer, TransferError, TransferErrorCode, TransportOffer
from kvferry.transport.collective_group import SENDER_RANK, STAMP, PairGroup, connect_store, stamp
from kvferry.transport.grpc_transport import header_to_proto, trailer_to_proto
from kvferry.transport.send_queue import Chunk, QueuedSendHandle

logger = logging.getLogger(__name__)


class _Outgoing:
    """One transfer on a pair: what the reader thread tells it (ACK, or an ERROR for it)."""

    def __init__(self, xfer_id: int, layer_nbytes: int):
        self.id = xfer_id
        self.layer_nbytes = layer_nbytes
        self.settled = threading.Event()
        self.error: TransferError | None = None
        self.acked = False
        self.opened = False  # the receiver knows the id: a failure must tell it (ABORT)
        self.finish_sent = False

    def settle(self, error: TransferError | None) -> None:
        if not self.settled.is_set():
            self.error, self.acked = error, error is None
            self.settled.set()


class SenderPair:
    def __init__(self, sock: socket.socket, group: PairGroup, address: str, depth: int):
        self.sock = sock  # frames are written under self._lock; the reader thread reads through a dup
        self._reader_sock = socket.socket(fileno=os.dup(sock.fileno()))  # its own timeouts
        self.group: PairGroup | None = group
        self.epoch = group.epoch
        self.backend = group.backend
        self.address = address
        self.depth = depth
        self.error: TransferError | None = None
        self.ended_quietly = False  # closed here, or by the receiver while idle: nothing was lost
        self._lock = threading.Lock()  # control frames and group operations, in sequence order
        self._xfers: dict[int, _Outgoing] = {}
        self._ids = itertools.count(1)  # 0 is the pair itself in ERROR frames
        self._seq = 0
        self._in_flight: deque[tuple[object, torch.Tensor]] = deque()  # (send work, its buffer)
        self._free: list[torch.Tensor] = []
        self._reader = threading.Thread(target=self._read_loop, name=f"kv-{self.backend}-pair-reader", daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, offer: TransportOffer, backend: str, deadline: float, depth: int) -> SenderPair:
        what = f"{backend} KV pair with {offer.address}"
        sock = framing.dial(offer.address, deadline, what)
        try:
            framing.send_control(sock, framing.HELLO, offer.ticket.encode(), deadline, what)
            kind, _, _, nbytes, _ = framing.recv_frame(sock, deadline, what)
            payload = framing.recv_payload(sock, nbytes, deadline, what)
            if kind == framing.ERROR:
                raise framing.error_from_payload(payload, what)
            if kind != framing.HELLO_OK:
                raise TransferError(TransferErrorCode.INVALID, f"{what}: expected HELLO_OK, got frame kind {kind}")
            rendezvous = json.loads(payload)
            store = connect_store(sock.getpeername()[0], rendezvous["store_port"], deadline)
            group = PairGroup(backend, store, rendezvous["prefix"], SENDER_RANK, rendezvous["epoch"],
                              sock.getsockname()[0], deadline)
        except BaseException:
            sock.close()
            raise
        return cls(sock, group, offer.address, depth)

    @property
    def alive(self) -> bool:
        return self.error is None

    # ---- one transfer (its handle's thread) -------------------------------------------------------
    def transfer(self, handle: QueuedSendHandle, header) -> None:
        out = _Outgoing(next(self._ids), header.layer_nbytes)
        self._xfers[out.id] = out
        handle.set_interrupt(out.settled.set)  # an abort elsewhere wakes the acknowledgement wait
        try:
            self._control(framing.OPEN, out, header_to_proto(header).SerializeToString(), handle)
            out.opened = True
            while True:
                item = handle.next_item()
                if out.error is not None:  # the receiver refused or cancelled it: stop now
                    raise out.error
                if isinstance(item, KVTrailer):
                    self._control(framing.FINISH, out, trailer_to_proto(item).SerializeToString(), handle)
                    out.finish_sent = True
                    break
                self._send_chunk(out, item, handle)
            out.settled.wait(handle.remaining())
            if handle.error is not None:
                raise handle.error
            if out.error is not None:
                raise out.error
            if not out.acked:  # the receiver stopped answering: the pair cannot be trusted to be in step
                raise self._break(TransferError(TransferErrorCode.DEADLINE, handle.deadline_message()))
        except TransferError as e:
            if self.alive and out.opened and not out.finish_sent:  # the receiver holds it open
                try:
                    self._control(framing.ABORT, out, e.message.encode()[:4096], None)
                except TransferError as abort_error:  # busy or broken: end the pair, so the receiver frees it
                    self._break(abort_error)
            if e.code is TransferErrorCode.DEADLINE or handle.remaining() <= 0:
                raise TransferError(TransferErrorCode.DEADLINE, handle.deadline_message()) from None
            raise
        finally:
            handle.set_interrupt(None)
            self._xfers.pop(out.id, None)

    def _send_chunk(self, out: _Outgoing, chunk: Chunk, handle: QueuedSendHandle) -> None:
        deadline = time.monotonic() + handle.remaining()
        if not self._lock.acquire(timeout=max(handle.remaining(), 0.001)):
            raise TransferError(TransferErrorCode.DEADLINE, f"KV pair with {self.address} busy past the deadline")
        try:
            self._check()
            nbytes = chunk.nbytes
            rows = chunk.device_rows if self.backend == "nccl" else chunk.rows
            if self.backend == "nccl" and not rows.is_cuda:
                raise TransferError(TransferErrorCode.INCOMPATIBLE, "nccl needs the prefill worker's KV cache on a GPU")
            buffer = self._take_buffer(nbytes + STAMP.size, rows.device, deadline)
            packed = buffer[:nbytes].view(len(chunk.row_ids), -1)
            ids = chunk.row_index.to(rows.device)
            with torch.inference_mode():  # the engine's cache may be an inference tensor
                if packed.shape[1] % 8 == 0:  # 8-byte elements: a row copy at memcpy speed
                    torch.index_select(rows.view(torch.float64), 0, ids, out=packed.view(torch.float64))
                else:
                    torch.index_select(rows, 0, ids, out=packed)
                buffer[nbytes : nbytes + STAMP.size].copy_(stamp(self.epoch, self._seq))
            handle.checksums.update(chunk.layer_idx, packed.cpu().numpy())  # NCCL: hashed on the host
            offset = chunk.layer_idx * out.layer_nbytes + chunk.offset  # into the transfer's payload
            frame = framing.pack(framing.DATA, out.id, offset, nbytes, self._seq)
            try:
                framing.send_buffers(self.sock, [frame], deadline, f"KV pair with {self.address}")
            except TransferError as e:
                raise self._break(e) from None
            self._in_flight.append((self.group.send(buffer[: nbytes + STAMP.size]), buffer))
            self._seq += 1
        except TransferError as e:
            if e.code is not TransferErrorCode.INCOMPATIBLE and self.group is not None and self.group.broken:
                self._break(self.group.broken)
            raise
        finally:
            if self.error is not None:
                self._release_group()  # under the lock: no operation waits on it any more
            self._lock.release()
        handle.bytes_sent += nbytes

    def _take_buffer(self, nbytes: int, device: torch.device, deadline: float) -> torch.Tensor:
        """A staging buffer of at least ``nbytes``: a free one, a new one (at most ``depth``), or the
        oldest in flight once its send completed (waited for until ``deadline``)."""
        while len(self._in_flight) >= self.depth:
            work, buffer = self._in_flight.popleft()
            self.group.wait(work, deadline, f"KV {self.backend} send to {self.address}")
            self._free.append(buffer)
        buffer = self._free.pop() if self._free else None
        if buffer is None or buffer.numel() < nbytes or buffer.device != device:
            buffer = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8, device=device)
        return buffer

    def _control(self, kind: int, out: _Outgoing, payload: bytes, handle: QueuedSendHandle | None) -> None:
        timeout = handle.remaining() if handle is not None else 1.0
        if not self._lock.acquire(timeout=max(timeout, 0.001)):
            raise TransferError(TransferErrorCode.DEADLINE, f"KV pair with {self.address} busy past the deadline")
        try:
            self._check()
            framing.send_control(self.sock, kind, payload, time.monotonic() + max(timeout, 0.001),
                                 f"KV pair with {self.address}", a=out.id)
        except TransferError as e:
            raise self._break(e) from None  # a frame cut short: the socket is out of step
        finally:
            if self.error is not None:
                self._release_group()
            self._lock.release()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    # ---- the pair's reader thread -----------------------------------------------------------------
    def _read_loop(self) -> None:
        what = f"KV pair with {self.address}"
        sock = self._reader_sock
        try:
            while True:
                select.select([sock], [], [])  # idle pairs wait here; a shutdown makes it readable
                kind, xfer, _, nbytes, _ = framing.recv_frame(sock, time.monotonic() + 30.0, what)
                payload = framing.recv_payload(sock, nbytes, time.monotonic() + 30.0, what)
                out = self._xfers.get(xfer)
                if kind == framing.ERROR:
                    error = framing.error_from_payload(payload, what)
                    if xfer == 0:  # about the pair itself
                        raise error
                    if out is not None:
                        out.settle(error)
                elif kind == framing.ACK:
                    if out is not None:
                        out.settle(None)
                else:
                    raise TransferError(TransferErrorCode.INVALID, f"{what}: unexpected frame kind {kind}")
        except TransferError as e:
            idle = isinstance(e, framing.PeerClosed) and not self._xfers  # e.g. its idle timeout: no loss
            if isinstance(e, framing.PeerClosed):
                e = TransferError(TransferErrorCode.UNAVAILABLE, f"{what}: the decode worker closed the pair")
            self._break(e, quiet=idle)
        except (OSError, ValueError) as e:  # the socket was closed under us
            self._break(TransferError(TransferErrorCode.UNAVAILABLE, f"{what}: {e}"))
        finally:
            sock.close()

    # ---- breaking ---------------------------------------------------------------------------------
    def _break(self, error: TransferError, quiet: bool = False) -> TransferError:
        """The pair is unusable: fail its transfers, shut the socket (the receiver drops its side, which
        ends any operation still waiting here) and release the group when nobody waits on it."""
        if self.error is None:
            self.error = error
            self.ended_quietly = quiet
            if self.group is not None:
                self.group.fail(error)
            if not quiet:
                logger.warning("KV %s pair with %s (epoch %d) broke: %s", self.backend, self.address, self.epoch,
                               error.message)
        for out in list(self._xfers.values()):
            out.settle(self.error)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._lock.acquire(blocking=False):
            try:
                self._release_group()
            finally:
                self._lock.release()
        return self.error

    def _release_group(self) -> None:
        """Drop the group and its operations (under the lock): Gloo closes its connections when the last
        reference goes, which ends the peer's waits at once instead of at their deadlines."""
        group, self.group = self.group, None
        self._in_flight.clear()  # operations first: the group goes after them
        self._free.clear()
        if group is not None:
            group.close()

    def close(self, reason: str = "closed") -> None:
        """Break the pair and destroy its group now (an operation still waiting gets up to 2 s): a
        process that exits right after must not destroy a group while the interpreter is finalizing
        (torch aborts)."""
        self._break(TransferError(TransferErrorCode.ABORTED, f"KV pair with {self.address} {reason}"), quiet=True)
        if self._lock.acquire(timeout=2.0):
            try:
                self._release_group()
            finally:
                self._lock.release()
        self._reader.join(timeout=2.0)
        self.sock.close()


class CollectiveSenderPlane:
    """The prefill worker's side of one backend: a ``SenderPair`` per decode peer, formed on demand."""

    def __init__(self, backend: str, depth: int = 4):
        self.name = backend
        self.depth = depth
        self._lock = threading.Lock()
        self._pairs: dict[str, SenderPair] = {}
        self._forming: dict[str, threading.Lock] = {}
        self._previous: dict[str, SenderPair] = {}  # the last pair formed with each address (for the log)

    def pair(self, offer: TransportOffer, deadline: float) -> SenderPair:
        address = offer.address
        with self._lock:
            pair = self._pairs.get(address)
            forming = self._forming.setdefault(address, threading.Lock())
        if pair is not None and pair.alive:
            return pair
        if not forming.acquire(timeout=max(deadline - time.monotonic(), 0.001)):
            raise TransferError(TransferErrorCode.DEADLINE, f"{self.name} KV pair with {address} still forming")
        try:
            pair = self._pairs.get(address)
            if pair is not None and pair.alive:
                return pair
            pair = SenderPair.connect(offer, self.name, deadline, self.depth)
            with self._lock:
                self._pairs[address] = pair
                previous = self._previous.get(address)
                self._previous[address] = pair
            if previous is None:
                logger.info("KV %s pair with %s formed (epoch %d)", self.name, address, pair.epoch)
            else:  # a pair that keeps breaking shows up as warnings; one closed while idle does not
                log = logger.info if previous.ended_quietly else logger.warning
                log("KV %s pair with %s rebuilt as epoch %d (epoch %d ended: %s)", self.name, address, pair.epoch,
                    previous.epoch, previous.error.message if previous.error else "closed")
            return pair
        finally:
            forming.release()

    def probe(self, offer: TransportOffer, deadline: float) -> None:
        """Form the pair (kept for the transfers that follow)."""
        self.pair(offer, deadline)

    def transfer(self, handle: QueuedSendHandle, offer: TransportOffer, header) -> None:
        self.pair(offer, time.monotonic() + handle.remaining()).transfer(handle, header)

    def forget(self, address: str) -> None:
        with self._lock:
            pair = self._pairs.pop(address, None)
        if pair is not None:
            pair.close("forgotten (the peer died or changed)")

    def close(self) -> None:
        with self._lock:
            pairs, self._pairs = list(self._pairs.values()), {}
        for pair in pairs:
            pair.close()
