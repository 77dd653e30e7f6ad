"""Shared by the transport tests: tiny KV caches and fingerprints, a receiver behind a real gRPC server
with its data planes started, and a sender for each transport."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import torch

from kvferry.engine.config import ModelConfig
from kvferry.transport.base import KVFingerprint, KVTarget
from kvferry.transport.grpc_transport import add_kv_transfer_service, channel_options
from kvferry.transport.negotiation import NegotiatedKVSender, start_receiver_transports
from kvferry.transport.receiver import KVReceiver

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 3, 2, 8, 4, 16
NETWORK_TRANSPORTS = ("tcp", "shm", "gloo", "grpc")


def model_config(**overrides) -> ModelConfig:
    fields = dict(
        architecture="LlamaForCausalLM", vocab_size=100, hidden_size=32, intermediate_size=64,
        num_layers=NUM_LAYERS, num_heads=4, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=True, name="tiny",
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def kv_caches(dtype=torch.bfloat16, fill: float | None = None, seed: int = 0, num_blocks: int = NUM_BLOCKS):
    g = torch.Generator().manual_seed(seed)
    shape = (2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    if fill is not None:
        return [torch.full(shape, fill, dtype=dtype) for _ in range(NUM_LAYERS)]
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(NUM_LAYERS)]


def bit_pattern_caches(seed: int = 5, num_blocks: int = NUM_BLOCKS) -> list[torch.Tensor]:
    """Random 16-bit patterns as bf16: NaN payloads, infinities, -0 and subnormals among them."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    caches = [torch.randint(-(2**15), 2**15, shape, generator=g, dtype=torch.int16).view(torch.bfloat16)
              for _ in range(NUM_LAYERS)]
    nans = torch.tensor([0x7FC1, 0xFF81 - 0x10000, 0x7FF8, 0x7F81], dtype=torch.int16)  # quiet/signalling NaNs
    caches[0].view(torch.int16)[0, :, 0, 0, :4] = nans
    return caches


def fingerprint(dtype=torch.bfloat16, **overrides) -> KVFingerprint:
    return KVFingerprint.from_model(model_config(**overrides), dtype, BLOCK_SIZE)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16))


class Ends:
    """Collects the receiver's on_transfer_end calls."""

    def __init__(self):
        self.events = []
        self.done = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, request_id, state, first_token, error):
        with self._lock:
            self.events.append((request_id, state, first_token, error))
        self.done.set()

    def of(self, request_id):
        return [e for e in self.events if e[0] == request_id]


class ReceiverServer:
    """A KVReceiver on tiny caches behind a real gRPC server on loopback, its data planes started."""

    def __init__(self, kv_transport: str = "auto", fp: KVFingerprint | None = None, caches=None, kv_checksum="auto"):
        self.ends = Ends()
        self.receiver = KVReceiver(caches or kv_caches(fill=0.0), fp or fingerprint(), receiver_id="decode-0",
                                   on_transfer_end=self.ends)
        self.offers = start_receiver_transports(self.receiver, kv_transport, kv_checksum=kv_checksum)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=channel_options(64 << 20))
        add_kv_transfer_service(self.server, self.receiver)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"

    def offer(self, name: str):
        return next(o for o in self.offers if o.name == name)

    def target(self, timeout_s: float) -> KVTarget:
        """What a sender pushes to, to reach this receiver within ``timeout_s``."""
        return KVTarget(self.address, self.receiver.instance_id, timeout_s=timeout_s)

    def close(self) -> None:
        self.server.stop(grace=None)
        self.receiver.close()

    def __enter__(self) -> ReceiverServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sender(kv_transport: str, fp: KVFingerprint | None = None, **kwargs) -> NegotiatedKVSender:
    return NegotiatedKVSender(fp or fingerprint(), sender_id="prefill-0", kv_transport=kv_transport, **kwargs)
