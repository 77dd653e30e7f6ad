"""The KV transfer interface: typed handshake data, the poll state, and the sender side's two classes.

A transfer moves one request's KV cache from a prefill worker to a decode worker that reserved blocks
for it, once the handshake found both sides' ``KVFingerprint`` (``kvferry.common.fingerprint``) equal. Per layer the payload is the request's blocks packed as ``[2, num_blocks, block_size,
num_kv_heads, head_dim]`` (K then V, blocks in block-table order) — what
``kvferry.kernels.kv_transfer.gather_kv_blocks`` produces and ``scatter_kv_blocks`` consumes. A trailer
carries the first token, which the prefill worker sampled; the decode side acknowledges once the KV is
in its blocks.

Sender side (this module): ``KVSender.open(target, request_id, num_blocks) -> KVSendHandle``, then
``send_layer(layer_idx, kv_cache_layer, block_ids)`` per layer as layers finish, ``finish(first_token)``, and ``poll()``/``wait()`` until
DONE or FAILED. Receiver side: ``kvferry.transport.receiver.KVReceiver``, shared by every transport.
Implementations: ``inprocess`` (also the test transport), ``grpc_transport``, ``tcp_transport``,
``shm_transport``; ``negotiation`` picks one per peer at the handshake.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass

import torch

from kvferry.common.fingerprint import KVFingerprint
from kvferry.common.sampling import TokenLogprobs


class TransferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class TransferErrorCode(enum.Enum):
    UNAVAILABLE = "unavailable"  # peer unreachable or gone mid-transfer
    INCOMPATIBLE = "incompatible"  # fingerprint mismatch, or the peer restarted (instance id)
    NOT_FOUND = "not_found"  # no reservation on the receiver (lease expired, aborted, restarted)
    INVALID = "invalid"  # malformed transfer (sizes, layers, duplicate chunks)
    DEADLINE = "deadline"  # did not complete within its deadline
    ABORTED = "aborted"  # aborted by either side
    CORRUPT = "corrupt"  # a layer's checksum differs: the bytes changed in transit


class TransferError(Exception):
    def __init__(self, code: TransferErrorCode, message: str):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TransportOffer:
    """A data plane the receiver accepts KV over (see ``transport/negotiation.py``)."""

    name: str  # "shm", "tcp", "gloo", "nccl", "grpc"
    address: str = ""  # tcp: host:port of the data socket; shm: the Unix socket's abstract name
    boot_id: str = ""  # the receiver host's boot id; shm needs the sender's to be the same
    ticket: str = ""  # secret of the receiver instance; data-plane connections open with it


@dataclass(frozen=True)
class HandshakeResult:
    compatible: bool
    mismatches: tuple[str, ...]
    receiver_fingerprint: KVFingerprint
    receiver_id: str
    receiver_instance_id: str
    max_chunk_bytes: int
    transports: tuple[TransportOffer, ...] = ()

    def mismatch_error(self, address: str) -> TransferError:
        """Names every differing field. KV is never converted between dtypes or block sizes: a pair
        that differs in them is refused here, before any block moves."""
        fields = {m.split(":", 1)[0] for m in self.mismatches}
        hint = (" (give the prefill and decode workers the same --dtype and --block-size: KV is not converted)"
                if fields & {"dtype", "block_size"} else "")
        return TransferError(
            TransferErrorCode.INCOMPATIBLE, f"KV fingerprint mismatch with {address}: " + "; ".join(self.mismatches) + hint
        )


@dataclass(frozen=True)
class KVTransferHeader:
    request_id: str
    num_layers: int
    num_blocks: int
    layer_nbytes: int
    fingerprint_digest: str
    receiver_instance_id: str = ""  # empty: not checked
    sender_id: str = ""


@dataclass(frozen=True)
class FirstToken:
    token_id: int
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class KVTrailer:
    """What ends a transfer: the first token, the byte count and each layer's checksum (integrity.py)."""

    first_token: FirstToken
    total_bytes: int
    layer_checksums: tuple[int, ...]
    checksum_algorithm: str


@dataclass(frozen=True)
class KVTarget:
    """Where a request's KV goes: the decode worker's KV address and the reservation's instance id."""

    address: str
    receiver_instance_id: str = ""
    timeout_s: float = 30.0  # the whole transfer's deadline, from open()


class KVSendHandle(abc.ABC):
    """One request's outgoing transfer. ``send_layer`` and ``finish`` never raise for a failed transfer:
    they become no-ops and ``poll()`` says FAILED, with the reason in ``error``."""

    request_id: str
    error: TransferError | None = None
    bytes_sent: int = 0
    seconds: float = 0.0  # open to acknowledgement

    @abc.abstractmethod
    def send_layer(self, layer_idx: int, kv_cache_layer: torch.Tensor, block_ids: list[int]) -> None:
        """Send layer ``layer_idx`` of the request: its ``block_ids`` in ``kv_cache_layer``
        ([2, num_blocks, block_size, num_kv_heads, head_dim]). Those blocks must not change until the
        transfer ends (the prefill worker holds them until then); a CPU cache is read in place while
        sending, a GPU cache is gathered to host memory here."""

    @abc.abstractmethod
    def finish(self, first_token: FirstToken) -> None:
        """Every layer has been sent; send the trailer. The receiver acknowledges after it."""

    @abc.abstractmethod
    def abort(self, reason: str) -> None: ...

    @abc.abstractmethod
    def poll(self) -> TransferState: ...

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> TransferState:
        """Block until DONE/FAILED or ``timeout``; returns the state then."""


class KVSender(abc.ABC):
    def __init__(self, fingerprint: KVFingerprint, sender_id: str = ""):
        self.fingerprint = fingerprint
        self.sender_id = sender_id

    @abc.abstractmethod
    def open(self, target: KVTarget, request_id: str, num_blocks: int) -> KVSendHandle:
        """Start a transfer; never blocks on the network (the handshake happens in the background)."""

    def header(self, target: KVTarget, request_id: str, num_blocks: int) -> KVTransferHeader:
        """What a transfer opens with; the receiver checks it against its fingerprint and reservation."""
        fp = self.fingerprint
        return KVTransferHeader(
            request_id=request_id,
            num_layers=fp.num_layers,
            num_blocks=num_blocks,
            layer_nbytes=fp.layer_nbytes(num_blocks),
            fingerprint_digest=fp.digest,
            receiver_instance_id=target.receiver_instance_id,
            sender_id=self.sender_id,
        )

    def send(
        self,
        target: KVTarget,
        request_id: str,
        kv_caches: list[torch.Tensor],
        block_ids: list[int],
        first_token: FirstToken,
    ) -> KVSendHandle:
        """Whole-request convenience: every layer's blocks, then the trailer."""
        handle = self.open(target, request_id, len(block_ids))
        for layer_idx, kv_cache_layer in enumerate(kv_caches):
            handle.send_layer(layer_idx, kv_cache_layer, block_ids)
        handle.finish(first_token)
        return handle

    def close(self) -> None:
        """Release connections; open handles fail."""


def gather_blocks(kv_cache_layer: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """[2, n, block_size, num_kv_heads, head_dim] copy of the blocks: Triton on CUDA, torch elsewhere."""
    from kvferry.kernels import kv_transfer
    from kvferry.kernels._triton import HAS_TRITON

    ids = torch.tensor(block_ids, dtype=torch.int64, device=kv_cache_layer.device)
    if kv_cache_layer.is_cuda and HAS_TRITON:
        return kv_transfer.gather_kv_blocks(kv_cache_layer, ids)
    return kv_transfer.gather_kv_blocks_ref(kv_cache_layer, ids)

