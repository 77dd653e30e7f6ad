"""A request's phases, as the router reports them (docs: router/timings.py), and the part a worker
measures on its own clock: durations only, never timestamps (two processes' clocks are not comparable)."""

from __future__ import annotations

from dataclasses import dataclass

PHASES = (
    "router_queue", "reserve", "prefill_queue", "prefill_compute", "kv_transfer", "first_token", "decode", "e2e",
)


@dataclass(frozen=True)
class PrefillTimings:
    """How long a prompt waited and computed in the engine that prefilled it (seconds)."""

    queue_seconds: float  # arrival -> first scheduled (a chunk of it ran)
    compute_seconds: float  # first scheduled -> first token sampled (every chunk, and what ran beside)
