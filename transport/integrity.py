"""Per-layer checksums of a KV transfer: the sender hashes each layer's payload as it sends it, the
receiver hashes what it received, and ``ReceiveSession.finish`` compares them before the decode worker
may commit the KV. A mismatch fails that request (``TransferErrorCode.CORRUPT``); its blocks are freed
without ever being registered in the prefix cache (that happens only at ``commit_kv``).

xxh3_64 (the ``xxhash`` package): ~35 GB/s on one core here, the GIL released while it runs, and a
streaming state, so a layer's chunks are hashed in order as they pass without a second pass over the
layer. Every transport (in-process, gRPC, tcp, shm, collective) uses this one class.

One exception, by default: shm. Its bytes never leave the host's memory (the receiver's own memfd
slot, written by the sender and read by the receiver), so a checksum there would only hash the same
memory twice; the decode worker asks for none in the slot handshake unless it runs with
``--kv-checksum always``, and such a trailer says ``NO_CHECKSUM``.
"""

from __future__ import annotations

import xxhash

CHECKSUM_ALGORITHM = "xxh3_64"
NO_CHECKSUM = "none"  # a trailer of a transfer the receiver did not ask to verify (shm by default)


class LayerChecksums:
    """One running xxh3_64 per layer over that layer's payload bytes, fed in payload order."""

    def __init__(self, num_layers: int):
        self._states = [xxhash.xxh3_64() for _ in range(num_layers)]

    def update(self, layer_idx: int, data) -> None:
        """``data``: any contiguous buffer (bytes, memoryview, numpy array)."""
        self._states[layer_idx].update(data)

    def digests(self) -> list[int]:
        return [s.intdigest() for s in self._states]


def mismatched_layers(sent: list[int], received: list[int]) -> list[int]:
    """Layer indices whose checksums differ (every layer when the lists differ in length)."""
    if len(sent) != len(received):
        return list(range(max(len(sent), len(received))))
    return [i for i, (a, b) in enumerate(zip(sent, received)) if a != b]
