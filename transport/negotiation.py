"""Which data plane carries a worker pair's KV: the ``--kv-transport`` setting, the handshake's offers,
and the sender that routes each transfer accordingly.

The decode worker offers its data planes (``start_receiver_transports``): ``auto`` offers every one it
can run (shm, tcp, gloo, grpc, and nccl where its KV cache is on a GPU and NCCL is available), a forced
name only that one. The prefill worker's ``NegotiatedKVSender`` handshakes once per peer over gRPC
(cached; dropped when a transfer finds the peer gone or changed), then takes the first transport in its
own order that the receiver offers and that works here:

    auto:   shm (same boot id) -> nccl (both caches on GPUs) -> tcp -> gloo -> grpc
    forced X: X, or the transfer fails naming why not

tcp comes before gloo because, for host memory, Gloo's pair rides on the same kind of TCP socket with
more in the way (a copy into a staging buffer, and a rendezvous per message: docs/KV_TRANSFER.md).

Each candidate is tried for real before it is chosen (a connection is opened and pooled), so a path
that cannot work here (another network namespace, a firewalled port) is skipped with its reason. The
choice is logged per peer (a warning when auto fell back past a transport the receiver offered) and
exported (``metrics.py``): never a silent fallback to a slow path. A forced transport that cannot run
in this process at all (``nccl`` without CUDA) is a ``ConfigError`` at start.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass

from kvferry.common.errors import ConfigError
from kvferry.common.fingerprint import KVFingerprint
from kvferry.transport.base import (
    HandshakeResult,
    KVSender,
    KVTarget,
    TransferError,
    TransferErrorCode,
    TransportOffer,
)
from kvferry.transport.collective_group import BACKENDS, backend_unavailable
from kvferry.transport.grpc_transport import DEFAULT_CHUNK_BYTES, GrpcKVSender, push_kv
from kvferry.transport.host import boot_id
from kvferry.transport.metrics import PairStats
from kvferry.transport.receiver import KVReceiver
from kvferry.transport.send_queue import QueuedSendHandle

logger = logging.getLogger(__name__)

KV_TRANSPORT_CHOICES = ("auto", "shm", "tcp", "gloo", "nccl", "grpc")
# Which transfers the decode worker verifies: auto, every plane but shm (whose bytes never leave this
# host's memory: integrity.py); always, shm too.
KV_CHECKSUM_CHOICES = ("auto", "always")
AUTO_ORDER = ("shm", "nccl", "tcp", "gloo", "grpc")  # auto's order of preference
# How long a plane may take to answer its probe when another plane could still carry the transfer. The
# handshake has just crossed gRPC, so the peer is up: a data plane silent this long is blocked (a
# firewall dropping its port's packets), and waiting the whole deadline on it would leave none for the
# fallback. The last candidate gets what is left of the deadline.
PROBE_TIMEOUT_S = 5.0


def transports_for(kv_transport: str, kv_device: str | None = None) -> tuple[str, ...]:
    """The transports one side accepts, in order; ConfigError for a name that cannot work here at
    all. ``kv_device`` ("cpu", "cuda", "cuda:1"), once known: NCCL needs the KV cache on a GPU."""
    if kv_transport not in KV_TRANSPORT_CHOICES:
        raise ConfigError(f"--kv-transport {kv_transport!r}: choose one of {', '.join(KV_TRANSPORT_CHOICES)}")
    unavailable = {name: why for name in BACKENDS if (why := backend_unavailable(name)) is not None}
    if kv_device is not None and not kv_device.startswith("cuda"):
        unavailable.setdefault("nccl", f"NCCL moves GPU memory and this worker's KV cache is on {kv_device} (use gloo)")
    if kv_transport == "auto":
        return tuple(name for name in AUTO_ORDER if name not in unavailable)
    if kv_transport in unavailable:
        raise ConfigError(f"--kv-transport {kv_transport}: {unavailable[kv_transport]}")
    return (kv_transport,)


# ---- receiver side -------------------------------------------------------------------------------
def start_receiver_transports(
    receiver: KVReceiver, kv_transport: str = "auto", host: str = "127.0.0.1", advertise_host: str | None = None,
    kv_checksum: str = "auto",
) -> tuple[TransportOffer, ...]:
    """Start the data planes ``kv_transport`` allows and make the receiver offer them (and close them
    when it closes). gRPC needs nothing started: PushKV is on the worker's server. ``kv_checksum``:
    one of ``KV_CHECKSUM_CHOICES``."""
    if kv_checksum not in KV_CHECKSUM_CHOICES:
        raise ConfigError(f"--kv-checksum {kv_checksum!r}: choose one of {', '.join(KV_CHECKSUM_CHOICES)}")
    from kvferry.transport.collective_receiver import start_collective_server
    from kvferry.transport.shm_transport import start_shm_server
    from kvferry.transport.tcp_transport import start_tcp_server

    ticket = secrets.token_hex(16)  # only senders that passed the gRPC handshake learn it
    offers, planes = [], []
    for name in transports_for(kv_transport, str(receiver.kv_caches[0].device)):
        if name == "grpc":
            offers.append(TransportOffer("grpc"))
            continue
        start = {"tcp": lambda: start_tcp_server(receiver, ticket, host, advertise_host),
                 "shm": lambda: start_shm_server(receiver, ticket, verify_checksums=kv_checksum == "always"),
                 "gloo": lambda: start_collective_server(receiver, ticket, "gloo", host, advertise_host),
                 "nccl": lambda: start_collective_server(receiver, ticket, "nccl", host, advertise_host)}[name]
        plane, offer = start()
        planes.append(plane)
        offers.append(offer)
    receiver.set_offers(offers, planes)
    logger.info("KV receiver %s accepts KV over %s", receiver.receiver_id, ", ".join(o.name for o in offers))
    return tuple(offers)


# ---- sender side ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    transport: str
    offer: TransportOffer
    handshake: HandshakeResult


class GrpcPlane:
    name = "grpc"

    def __init__(self, grpc_sender: GrpcKVSender):
        self.grpc_sender = grpc_sender

    def probe(self, offer: TransportOffer, deadline: float) -> None:
        """The handshake just went over this channel."""

    def transfer(self, handle: QueuedSendHandle, offer: TransportOffer, header) -> None:
        push_kv(self.grpc_sender, handle)

    def forget(self, address: str) -> None: ...

    def close(self) -> None: ...


class NegotiatedSendHandle(QueuedSendHandle):
    def __init__(self, sender: NegotiatedKVSender, target: KVTarget, request_id: str, num_blocks: int):
        self._sender = sender
        self.transport = ""  # once routed
        super().__init__(target, request_id, num_blocks, sender.fingerprint.num_layers, sender.chunk_bytes)

    def _transfer(self) -> None:
        sender, address = self._sender, self.target.address
        route = sender.route(address, self.remaining())
        self.transport = route.transport
        plane = sender.planes[route.transport]
        try:
            plane.transfer(self, route.offer, sender.header(self.target, self.request_id, self.num_blocks))
        except TransferError as e:
            sender.stats.record_failure(route.handshake.receiver_id or address, route.transport)
            if e.code in (TransferErrorCode.UNAVAILABLE, TransferErrorCode.INCOMPATIBLE):
                sender.forget(address)  # the peer died or changed: handshake again next time
            raise
        sender.transfer_done(route, self.bytes_sent, time.monotonic() - self._opened)


class NegotiatedKVSender(KVSender):
    """The prefill worker's sender: gRPC for the handshake, the negotiated data plane for the bytes."""

    def __init__(
        self,
        fingerprint: KVFingerprint,
        sender_id: str = "",
        kv_transport: str = "auto",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        handshake_timeout_s: float = 5.0,
        security=None,  # proto.cluster_security.ClusterSecurity for the gRPC channels; None: insecure
        stats: PairStats | None = None,
        kv_device: str = "cpu",  # where the prefill worker's KV cache lives (nccl needs a GPU)
    ):
        super().__init__(fingerprint, sender_id)
        self.kv_transport = kv_transport
        self.transports = transports_for(kv_transport, kv_device)
        self.chunk_bytes = chunk_bytes
        self.stats = stats or PairStats()
        extra = {} if security is None else {"security": security}
        self.grpc = GrpcKVSender(
            fingerprint, sender_id, chunk_bytes, handshake_timeout_s=handshake_timeout_s,
            transports=self.transports, **extra,
        )
        from kvferry.transport.collective_sender import CollectiveSenderPlane
        from kvferry.transport.shm_transport import ShmSenderPlane
        from kvferry.transport.tcp_transport import TcpSenderPlane

        planes = {"grpc": lambda: GrpcPlane(self.grpc), "tcp": TcpSenderPlane, "shm": lambda: ShmSenderPlane(chunk_bytes),
                  "gloo": lambda: CollectiveSenderPlane("gloo"), "nccl": lambda: CollectiveSenderPlane("nccl")}
        self.planes = {name: planes[name]() for name in self.transports}
        self._lock = threading.Lock()
        self._routes: dict[str, Route] = {}
        self._route_locks: dict[str, threading.Lock] = {}
        self._logged: set[tuple[str, str]] = set()
        self._throughput_logged: dict[tuple[str, str], float] = {}

    def open(self, target: KVTarget, request_id: str, num_blocks: int) -> NegotiatedSendHandle:
        return NegotiatedSendHandle(self, target, request_id, num_blocks)

    def route(self, address: str, timeout: float) -> Route:
        """The peer's transport: cached, or handshake and choose now (one negotiation per peer at a time)."""
        route = self._routes.get(address)
        if route is not None:
            return route
        with self._lock:
            lock = self._route_locks.setdefault(address, threading.Lock())
        if not lock.acquire(timeout=max(timeout, 0.001)):
            raise TransferError(TransferErrorCode.DEADLINE, f"KV handshake with {address} still running")
        try:
            route = self._routes.get(address)
            if route is None:
                route = self._negotiate(address, time.monotonic() + timeout)
                self._routes[address] = route
            return route
        finally:
            lock.release()

    def _negotiate(self, address: str, deadline: float) -> Route:
        handshake = self.grpc.handshake(address, timeout=max(deadline - time.monotonic(), 0.001))
        if not handshake.compatible:
            raise handshake.mismatch_error(address)
        offers = {o.name: o for o in handshake.transports}
        skipped: list[str] = []
        expected_skips = 0  # skips that say nothing is wrong (shm between two hosts)
        unreachable: TransferError | None = None  # the last offered plane that could not be reached
        for i, name in enumerate(self.transports):
            offer = offers.get(name)
            if offer is None:
                skipped.append(f"{name}: not offered (the receiver accepts {', '.join(offers) or 'nothing'})")
                continue
            if name == "shm" and offer.boot_id != boot_id():
                skipped.append("shm: another host (boot ids differ)")
                expected_skips += 1
                continue
            fallback = any(n in offers for n in self.transports[i + 1 :])
            try:
                self.planes[name].probe(offer, min(deadline, time.monotonic() + PROBE_TIMEOUT_S) if fallback else deadline)
            except TransferError as e:
                skipped.append(f"{name}: {e.message}")
                unreachable = e
                continue
            peer = handshake.receiver_id or address
            self.stats.set_route(peer, name)
            note = f" ({'; '.join(skipped)})" if skipped else ""
            log = logger.warning if len(skipped) > expected_skips else logger.info
            log("KV to %s (%s) goes over %s, --kv-transport %s%s", peer, address, name, self.kv_transport, note)
            return Route(name, offer, handshake)
        # Only unreachable planes: the peer is down or out of time (try again later); otherwise the
        # pair cannot work as configured.
        code = unreachable.code if unreachable is not None and len(skipped) == 1 else TransferErrorCode.INCOMPATIBLE
        error = TransferError(
            code, f"no KV transport to {address} works with --kv-transport {self.kv_transport}: " + "; ".join(skipped)
        )
        key = (address, error.message)
        if key not in self._logged:  # once per peer and reason, not once per request
            self._logged.add(key)
            logger.error("%s", error.message)
        raise error

    def transfer_done(self, route: Route, nbytes: int, seconds: float) -> None:
        peer = route.handshake.receiver_id or "unnamed"
        self.stats.record(peer, route.transport, nbytes, seconds)
        key = (peer, route.transport)
        now = time.monotonic()
        if now - self._throughput_logged.get(key, -1e9) >= 60.0:  # the first transfer, then once a minute
            self._throughput_logged[key] = now
            logger.info(
                "KV to %s over %s: %.1f MB in %.1f ms (%.2f GB/s)",
                peer, route.transport, nbytes / 1e6, seconds * 1e3, nbytes / max(seconds, 1e-9) / 1e9,
            )

    def forget(self, address: str) -> None:
        """Drop the peer's route, handshake and pooled connections (it died or restarted)."""
        route = self._routes.pop(address, None)
        self.grpc.forget_handshake(address)
        if route is not None:
            self.planes[route.transport].forget(route.offer.address)

    def close(self) -> None:
        self._routes.clear()
        for plane in self.planes.values():
            plane.close()
        self.grpc.close()
