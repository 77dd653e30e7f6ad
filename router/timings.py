"""Where one request's time went, phase by phase, as the router reports it (metrics, log, responses).

The router marks what it sees on its own clock (``time.monotonic()``); the worker that prefilled the
prompt reports durations it measured on its clock (never timestamps: two processes' monotonic clocks
are not comparable). Phases, in seconds:

- ``router_queue``: arrival at the router to the start of the Reserve that placed it (waiting for KV
  room, and Reserves that were refused, included);
- ``reserve``: that Reserve call;
- ``prefill_queue``: on the worker that prefilled it, arrival to the first step that computed any of it;
- ``prefill_compute``: from there to its first token (every chunk, and what shared those steps);
- ``kv_transfer``: first KV byte sent to the decode worker's acknowledgement (remote prefill only; it
  overlaps ``prefill_compute``: the KV is pushed layer by layer as the last chunk runs);
- ``first_token``: arrival to the first token at the router (TTFT);
- ``decode``: first token to last token;
- ``e2e``: arrival to the end.

``router_queue + reserve + prefill_queue + prefill_compute <= first_token`` for a remote prefill
(Prefill is sent once Reserve answered); a local prefill starts inside the Reserve call, so there
``router_queue + prefill_queue + prefill_compute <= first_token``. Always
``first_token + decode == e2e``. The rest of ``first_token`` is RPCs, the KV transfer's tail and the
commit on the decode worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvferry.common.timings import PrefillTimings


@dataclass
class RequestTimeline:
    start: float  # arrival, time.monotonic()
    reserve_start: float | None = None
    reserve_end: float | None = None
    first_token_at: float | None = None
    end: float | None = None
    prefill: PrefillTimings | None = None  # as the prefilling worker measured it
    kv_transfer_seconds: float | None = None
    placement: str = ""  # "local (short_prompt)", "remote (default)", ...

    @classmethod
    def now(cls) -> RequestTimeline:
        return cls(time.monotonic())

    def mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    def mark_end(self) -> None:
        if self.end is None:
            self.end = time.monotonic()

    def durations(self) -> dict[str, float]:
        """Phase -> seconds, in ``PHASES`` order; phases that did not happen (or not yet) are absent."""
        out: dict[str, float] = {}
        if self.reserve_start is not None:
            out["router_queue"] = self.reserve_start - self.start
            if self.reserve_end is not None:
                out["reserve"] = self.reserve_end - self.reserve_start
        if self.prefill is not None:
            out["prefill_queue"] = max(0.0, self.prefill.queue_seconds)
            out["prefill_compute"] = max(0.0, self.prefill.compute_seconds)
        if self.kv_transfer_seconds is not None:
            out["kv_transfer"] = self.kv_transfer_seconds
        if self.first_token_at is not None:
            out["first_token"] = self.first_token_at - self.start
            if self.end is not None:
                out["decode"] = self.end - self.first_token_at
        if self.end is not None:
            out["e2e"] = self.end - self.start
        return {phase: round(seconds, 6) for phase, seconds in out.items()}


def format_timings(durations: dict[str, float]) -> str:
    """``router_queue=0.0003,reserve=0.0021,...`` (seconds): the ``x-kvferry-timings`` header, the log."""
    return ",".join(f"{phase}={seconds:.4f}" for phase, seconds in durations.items())
