"""What a worker is and what it answers: its role, its stats (the router's view of its capacity), and
the two refusals (``NoRoom``: try elsewhere; ``SLORefusal``: its TTFT target cannot be met)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class WorkerRole(enum.StrEnum):
    PREFILL = "prefill"  # runs prompts to their first token, ships the KV
    DECODE = "decode"  # reserves blocks, receives KV, decodes (and prefills what the router says)
    COLOCATED = "colocated"  # one engine, both phases: gets whole requests


class NoRoom(Exception):
    """A worker cannot take the request now (no KV room, batch or queue full, draining); the message says
    why. Not an error: try another worker, or later."""


@dataclass(frozen=True)
class SLORefusal:
    """A request refused because its TTFT target cannot be met: the same words in every process."""

    message: str
    retry_after_s: float  # when the queue that refused it is predicted to have drained
    reason: str = "slo"


@dataclass(frozen=True)
class WorkerStats:
    """A worker's load as of now. Counters (``*_total``) are cumulative since the worker started. Its
    heartbeat carries the capacity fields of it (proto ``WorkerCapacity``); ``GetStats`` all of it."""

    role: str = ""  # a WorkerRole
    instance_id: str = ""
    block_size: int = 0
    total_kv_blocks: int = 0
    free_kv_blocks: int = 0
    used_kv_blocks: int = 0
    running_requests: int = 0
    waiting_requests: int = 0  # decode: reserved, KV not arrived; prefill: queued prompts
    queued_prefill_tokens: int = 0
    max_running_requests: int = 0
    kv_bytes_sent_total: int = 0
    kv_bytes_received_total: int = 0
    kv_transfer_seconds_total: float = 0.0
    kv_transfers_total: int = 0
    kv_transfer_failures_total: int = 0
    leases_expired_total: int = 0
    requests_rejected_total: int = 0  # refused for their TTFT target (early rejection)
    engine_busy_ms: int = 0  # time the engine loop has spent in its current turn; 0 while idle
