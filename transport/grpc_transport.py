"""KV transfer over gRPC (``kvferry.kv_transfer.KVTransfer``): any two machines, no GPU interconnect.

Sender: one channel per peer address, one ``Handshake`` per peer (cached; dropped when a push is refused
as incompatible, so a restarted peer is re-checked), then one ``PushKV`` client stream per request:
header, per-layer chunks as layers finish, trailer with the first token and each layer's checksum.
``send_layer`` queues chunk descriptions (``send_queue.py``: which block rows, no copy) and returns at
once: the engine thread never waits for the network, whatever the peer does. The stream's thread turns
one description at a time into a message,
copying the rows out of a CPU cache straight into it (a GPU cache is gathered to the host first), and
gRPC takes the next only once the previous is on its way: flow control is HTTP/2's, and a transfer
holds at most one encoded chunk plus the HTTP/2 window (``window_bytes``) in flight. Every transfer
has a deadline (``KVTarget.timeout_s``) covering handshake, stream and acknowledgement.

Receiver: ``KVTransferServicer`` feeds a ``KVReceiver``; errors are gRPC statuses (see
kv_transfer.proto) whose messages name the problem.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch

from kvferry.common.fingerprint import KVFingerprint
from kvferry.kernels import cpu_kv_copy
from kvferry.proto import kv_transfer_pb2 as pb
from kvferry.proto.cluster_security import ClusterSecurity
from kvferry.proto.convert import fingerprint_from_proto, fingerprint_to_proto, logprobs_from_proto, logprobs_to_proto
from kvferry.proto.keepalive import server_keepalive
from kvferry.proto import kv_transfer_pb2_grpc as pb_grpc
from kvferry.transport.base import (
    FirstToken, HandshakeResult, KVSender, KVTarget, KVTrailer, KVTransferHeader, TransferError, TransferErrorCode,
    TransportOffer,
)
from kvferry.transport.host import boot_id
from kvferry.transport.receiver import KVReceiver
from kvferry.transport.send_queue import QueuedSendHandle

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024  # a whole layer of a 2k-token SmolLM2 request in one message
DEFAULT_WINDOW_BYTES = 16 * 1024 * 1024  # HTTP/2 flow-control window per stream
MESSAGE_OVERHEAD = 64 * 1024  # header fields around a chunk's bytes


def channel_options(max_message_bytes: int, window_bytes: int = DEFAULT_WINDOW_BYTES) -> list[tuple[str, int]]:
    """Options for channels and servers that carry KV: room for a chunk, a large HTTP/2 window, and
    bulk-sized frames and socket reads. gRPC's defaults (16 KB frames, reads that start at 8 KB) suit
    small RPCs; with these, a stream of 1 MB messages moved at 0.8-0.9 of a raw loopback socket here
    instead of 0.6 (a sink that only counts bytes, same run; see docs/KV_TRANSFER.md)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes + MESSAGE_OVERHEAD),
        ("grpc.max_receive_message_length", max_message_bytes + MESSAGE_OVERHEAD),
        ("grpc.http2.lookahead_bytes", window_bytes),
        ("grpc.http2.max_frame_size", 16 * 1024 * 1024 - 1),  # the largest HTTP/2 allows
        ("grpc.http2.write_buffer_size", window_bytes),
        ("grpc.experimental.tcp_read_chunk_size", 4 * 1024 * 1024),
        ("grpc.experimental.tcp_min_read_chunk_size", 1024 * 1024),
        ("grpc.experimental.tcp_max_read_chunk_size", window_bytes),
    ]


# ---- dataclass <-> proto ---------------------------------------------------------------------------
# KVHeader carries the fields of KVTransferHeader under the same names; the dataclass is the one list
# of them (a field missing from the message fails loudly). The fingerprint's: proto/convert.py.
def _from_proto(cls, msg):
    return cls(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(cls)})


def header_to_proto(header: KVTransferHeader) -> pb.KVHeader:
    return pb.KVHeader(**dataclasses.asdict(header))


def header_from_proto(msg: pb.KVHeader) -> KVTransferHeader:
    return _from_proto(KVTransferHeader, msg)


def trailer_to_proto(trailer: KVTrailer) -> pb.KVTrailer:
    msg = pb.KVTrailer(
        first_token_id=trailer.first_token.token_id,
        total_bytes=trailer.total_bytes,
        layer_checksums=list(trailer.layer_checksums),
        checksum_algorithm=trailer.checksum_algorithm,
    )
    if trailer.first_token.logprobs is not None:
        msg.first_logprobs.CopyFrom(logprobs_to_proto(trailer.first_token.logprobs))
    return msg


def trailer_from_proto(msg: pb.KVTrailer) -> KVTrailer:
    lp = logprobs_from_proto(msg.first_logprobs) if msg.HasField("first_logprobs") else None
    return KVTrailer(
        FirstToken(msg.first_token_id, lp), msg.total_bytes, tuple(msg.layer_checksums), msg.checksum_algorithm
    )


def offer_to_proto(offer: TransportOffer) -> pb.TransportOffer:
    return pb.TransportOffer(**dataclasses.asdict(offer))


def offer_from_proto(msg: pb.TransportOffer) -> TransportOffer:
    return _from_proto(TransportOffer, msg)


_HANDSHAKE_SCALARS = ("compatible", "receiver_id", "receiver_instance_id", "max_chunk_bytes")  # same name both sides


def handshake_to_proto(result: HandshakeResult) -> pb.HandshakeResponse:
    return pb.HandshakeResponse(
        **{name: getattr(result, name) for name in _HANDSHAKE_SCALARS}, mismatches=list(result.mismatches),
        fingerprint=fingerprint_to_proto(result.receiver_fingerprint),
        transports=[offer_to_proto(o) for o in result.transports],
    )


def handshake_from_proto(msg: pb.HandshakeResponse) -> HandshakeResult:
    return HandshakeResult(
        **{name: getattr(msg, name) for name in _HANDSHAKE_SCALARS}, mismatches=tuple(msg.mismatches),
        receiver_fingerprint=fingerprint_from_proto(msg.fingerprint),
        transports=tuple(offer_from_proto(o) for o in msg.transports),
    )


_STATUS_FOR = {
    TransferErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    TransferErrorCode.INCOMPATIBLE: grpc.StatusCode.FAILED_PRECONDITION,
    TransferErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    TransferErrorCode.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    TransferErrorCode.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    TransferErrorCode.ABORTED: grpc.StatusCode.ABORTED,
    TransferErrorCode.CORRUPT: grpc.StatusCode.DATA_LOSS,
}
_CODE_FOR = {status: code for code, status in _STATUS_FOR.items()}
_CODE_FOR[grpc.StatusCode.CANCELLED] = TransferErrorCode.ABORTED


def status_for(code: TransferErrorCode) -> grpc.StatusCode:
    return _STATUS_FOR[code]


def error_from_rpc(e: grpc.RpcError, what: str) -> TransferError:
    code = _CODE_FOR.get(e.code(), TransferErrorCode.UNAVAILABLE)
    return TransferError(code, f"{what}: {e.code().name}: {e.details()}")


# ---- KVData on the wire, without copying the payload through protobuf --------------------------------
# KVChunk{data: KVData{layer_idx, offset, data}} is encoded and decoded by hand (it is standard protobuf
# wire format: grpcurl and other clients interoperate): the sender writes a few header bytes and the
# cache rows into the message in one copy, the receiver gets a memoryview into the message instead of a copy.
# Headers and trailers go through protobuf as usual.
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def encode_data_chunk(layer_idx: int, offset: int, cache_rows: torch.Tensor, row_ids: list[int]) -> bytes:
    """One KVChunk{data} message whose payload is ``cache_rows[row_ids]`` (``[num_rows, row_bytes]`` uint8):
    one copy, straight from the cache, with the GIL released where the C++ copy is built."""
    size = len(row_ids) * cache_rows.shape[1]
    inner = b"\x08" + _varint(layer_idx) + b"\x10" + _varint(offset) + b"\x1a" + _varint(size)
    return cpu_kv_copy.pack_rows(b"\x12" + _varint(len(inner) + size) + inner, cache_rows, row_ids)


@dataclass(frozen=True)
class KVDataView:
    layer_idx: int
    offset: int
    data: memoryview  # into the received message: no copy


def decode_chunk(raw: bytes) -> KVDataView | pb.KVChunk:
    """A KVData chunk as a view into ``raw``; any other message (or an unusual encoding) via protobuf."""
    try:
        if raw[:1] == b"\x12":
            size, pos = _read_varint(raw, 1)
            if pos + size == len(raw):
                layer_idx = offset = 0
                data = memoryview(b"")
                while pos < len(raw):
                    key, pos = _read_varint(raw, pos)
                    field, wire_type = key >> 3, key & 7
                    if wire_type == 0:
                        value, pos = _read_varint(raw, pos)
                        layer_idx = value if field == 1 else layer_idx
                        offset = value if field == 2 else offset
                    elif wire_type == 2:
                        length, pos = _read_varint(raw, pos)
                        if field == 3:
                            data = memoryview(raw)[pos : pos + length]
                        pos += length
                    else:
                        raise ValueError("unexpected wire type")
                if pos == len(raw):
                    return KVDataView(layer_idx, offset, data)
    except ValueError:
        pass
    return pb.KVChunk.FromString(raw)


# ---- receiver side ---------------------------------------------------------------------------------
class KVTransferServicer(pb_grpc.KVTransferServicer):
    def __init__(self, receiver: KVReceiver):
        self.receiver = receiver

    def Handshake(self, request: pb.HandshakeRequest, context: grpc.ServicerContext) -> pb.HandshakeResponse:
        return handshake_to_proto(self.receiver.handshake(fingerprint_from_proto(request.fingerprint)))

    def PushKV(self, request_iterator, context: grpc.ServicerContext) -> pb.PushKVResponse:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "PushKV stream must start with a KVHeader")
        header = header_from_proto(first.header)
        try:
            session = self.receiver.open(header, transport="grpc")
        except TransferError as e:
            context.abort(status_for(e.code), e.message)
        error: TransferError | None = None
        finished = False
        try:
            for msg in request_iterator:
                if isinstance(msg, KVDataView):
                    session.write(msg.layer_idx, msg.offset, msg.data)
                    continue
                kind = msg.WhichOneof("kind")
                if kind == "data":
                    session.write(msg.data.layer_idx, msg.data.offset, msg.data.data)
                elif kind == "trailer":
                    session.finish(trailer_from_proto(msg.trailer))
                    finished = True
                    break
                else:
                    raise TransferError(TransferErrorCode.INVALID, "a second KVHeader in one stream")
            if not finished:
                raise TransferError(TransferErrorCode.ABORTED, "stream ended before the trailer (sender aborted)")
        except TransferError as e:
            error = e
        except Exception as e:  # the stream broke (client cancelled, deadline, connection lost)
            error = TransferError(TransferErrorCode.UNAVAILABLE, f"stream broken: {type(e).__name__}: {e}")
        if error is not None:
            session.fail(error)
            context.abort(status_for(error.code), error.message)
        return pb.PushKVResponse(
            request_id=header.request_id,
            bytes_received=session.bytes_received,
            receive_seconds=session.seconds,
        )


SERVICE_NAME = "kvferry.kv_transfer.KVTransfer"


def add_kv_transfer_service(server: grpc.Server, receiver: KVReceiver) -> None:
    """Like the generated ``add_KVTransferServicer_to_server``, with ``decode_chunk`` for PushKV."""
    servicer = KVTransferServicer(receiver)
    handlers = {
        "Handshake": grpc.unary_unary_rpc_method_handler(
            servicer.Handshake,
            request_deserializer=pb.HandshakeRequest.FromString,
            response_serializer=pb.HandshakeResponse.SerializeToString,
        ),
        "PushKV": grpc.stream_unary_rpc_method_handler(
            servicer.PushKV,
            request_deserializer=decode_chunk,
            response_serializer=pb.PushKVResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def create_server(
    address: str, service_names: list[str], max_workers: int = 32, max_message_bytes: int = 64 << 20,
    security: ClusterSecurity = ClusterSecurity(),
) -> tuple[grpc.Server, object, int]:
    """A gRPC server with grpc.health.v1 health checking and server reflection for ``service_names``
    (plus their own names), bound to ``address`` ("host:port", port 0 = any free one); not started.
    Returns (server, health servicer, bound port). Handlers hold a thread each for a stream's life, so
    ``max_workers`` bounds concurrent streams. ``security``: the cluster token every call but health
    and reflection must carry, and mutual TLS (proto/cluster_security.py)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=[*server_keepalive(), *channel_options(max_message_bytes)],
        maximum_concurrent_rpcs=max_workers,  # beyond it RESOURCE_EXHAUSTED, never a silent queue
        interceptors=security.server_interceptors(),
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    port = security.add_port(server, address)
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    for name in ("", *service_names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer, port


# ---- sender side -----------------------------------------------------------------------------------
def push_kv(sender: GrpcKVSender, handle: QueuedSendHandle) -> None:
    """The gRPC data plane: one PushKV stream fed from ``handle``'s queue; returns once the decode
    worker acknowledged (the KV is in its blocks), raises ``TransferError`` otherwise."""
    address = handle.target.address
    push = sender.channel(address).stream_unary(
        f"/{SERVICE_NAME}/PushKV",
        request_serializer=None,  # the generator yields encoded bytes
        response_deserializer=pb.PushKVResponse.FromString,
    )
    try:
        call = push.future(_requests(sender, handle), timeout=handle.remaining())
        handle.set_interrupt(call.cancel)
        call.result()
    except grpc.RpcError as e:
        error = error_from_rpc(e, f"PushKV {handle.request_id!r} to {address}")
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            error = TransferError(TransferErrorCode.DEADLINE, handle.deadline_message())
        if error.code is TransferErrorCode.INCOMPATIBLE:
            sender.forget_handshake(address)
        raise error from None
    except grpc.FutureCancelledError:  # cancelled by a failure elsewhere: that error is already recorded
        raise TransferError(TransferErrorCode.ABORTED, "cancelled") from None
    finally:
        handle.set_interrupt(None)


def _requests(sender: GrpcKVSender, handle: QueuedSendHandle):
    header = sender.header(handle.target, handle.request_id, handle.num_blocks)
    yield pb.KVChunk(header=header_to_proto(header)).SerializeToString()
    while True:
        try:
            item = handle.next_item()
        except TransferError:
            return  # aborted or out of time: the stream ends without a trailer; the call fails
        if isinstance(item, KVTrailer):
            yield pb.KVChunk(trailer=trailer_to_proto(item)).SerializeToString()
            return
        chunk = encode_data_chunk(item.layer_idx, item.offset, item.rows, item.row_ids)
        handle.checksums.update(item.layer_idx, memoryview(chunk)[len(chunk) - item.nbytes :])
        handle.bytes_sent += item.nbytes
        yield chunk


class GrpcSendHandle(QueuedSendHandle):
    def __init__(self, sender: GrpcKVSender, target: KVTarget, request_id: str, num_blocks: int):
        self._sender = sender
        super().__init__(target, request_id, num_blocks, sender.fingerprint.num_layers, sender.chunk_bytes)

    def _transfer(self) -> None:
        handshake = self._sender.handshake(self.target.address, timeout=self.remaining())
        if not handshake.compatible:
            raise handshake.mismatch_error(self.target.address)
        push_kv(self._sender, self)


class GrpcKVSender(KVSender):
    def __init__(
        self,
        fingerprint: KVFingerprint,
        sender_id: str = "",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        handshake_timeout_s: float = 5.0,
        security: ClusterSecurity = ClusterSecurity(),  # the cluster token and TLS of every channel
        transports: tuple[str, ...] = ("grpc",),
    ):
        """``transports``: what the handshake says this sender accepts (the negotiating sender's list)."""
        super().__init__(fingerprint, sender_id)
        self.security = security
        self.transports = transports
        self.chunk_bytes = chunk_bytes
        self.window_bytes = window_bytes
        self.handshake_timeout_s = handshake_timeout_s
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._handshakes: dict[str, HandshakeResult] = {}

    def channel(self, address: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                ch = self.security.channel(address, options=channel_options(self.chunk_bytes, self.window_bytes))
                self._channels[address] = ch
            return ch

    def handshake(self, address: str, timeout: float | None = None) -> HandshakeResult:
        """The peer's answer, cached per address; raises TransferError if it cannot be reached in time."""
        cached = self._handshakes.get(address)
        if cached is not None:
            return cached
        timeout = self.handshake_timeout_s if timeout is None else min(timeout, self.handshake_timeout_s)
        stub = pb_grpc.KVTransferStub(self.channel(address))
        request = pb.HandshakeRequest(
            fingerprint=fingerprint_to_proto(self.fingerprint), sender_id=self.sender_id,
            transports=list(self.transports), boot_id=boot_id(),
        )
        try:
            resp = stub.Handshake(request, timeout=max(timeout, 0.001))
        except grpc.RpcError as e:
            raise error_from_rpc(e, f"KV handshake with {address}") from None
        result = handshake_from_proto(resp)
        if result.max_chunk_bytes and result.max_chunk_bytes < self.chunk_bytes:
            raise TransferError(
                TransferErrorCode.INCOMPATIBLE,
                f"{address} accepts chunks up to {result.max_chunk_bytes} bytes, sender uses {self.chunk_bytes}",
            )
        if result.compatible:  # an incompatible peer is asked again next time (it may have been fixed)
            with self._lock:
                self._handshakes[address] = result
        return result

    def forget_handshake(self, address: str) -> None:
        with self._lock:
            self._handshakes.pop(address, None)

    def open(self, target: KVTarget, request_id: str, num_blocks: int) -> GrpcSendHandle:
        return GrpcSendHandle(self, target, request_id, num_blocks)

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
            self._handshakes.clear()
        for ch in channels:
            ch.close()
