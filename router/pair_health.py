"""Which (prefill, decode) worker pairs can move KV between them: a circuit breaker per pair.

A prefill worker whose KV cannot reach a decode worker (connection refused, a handshake that fails, a
transfer past its deadline, bytes changed in transit) fails every request placed on that pair, while
each of the two may be fine with other peers. So failures are counted per pair, not per worker:

1. A KV-transfer failure on the pair counts one (``record_failure``, with the transport's reason).
2. ``failure_limit`` failures in a row exclude the pair: no request is placed on it for a cool-down
   (``cooldown_s``, doubled at each exclusion in a row, at most ``max_cooldown_s``).
3. After the cool-down the pair is tried again: one failure excludes it again at once (the doubled
   cool-down); one success (``record_success``: a Prefill answered, so its KV arrived) forgets it all.

Pairs are keyed by worker id: a worker that registers again (restarted, maybe elsewhere) starts clean.
Counts for the metric are kept by worker name, which stays the same across restarts.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from kvferry.transport.base import TransferErrorCode

# The transport's failure codes that say the pair cannot move KV. Others are not the link's doing:
# aborted (either side gave up, the client left), not_found (the reservation went: lease, restart),
# invalid (a malformed transfer: a bug, not a network).
PAIR_FAILURE_CODES = (TransferErrorCode.UNAVAILABLE, TransferErrorCode.INCOMPATIBLE, TransferErrorCode.DEADLINE,
                      TransferErrorCode.CORRUPT)
# What a decode worker says when a push into it failed (decode_worker/worker.py, _transfer_failed).
DECODE_SIDE_PREFIX = "KV transfer failed: "


def transfer_failure_reason(message: str) -> str | None:
    """The pair's failure reason (``unavailable``, ``incompatible``, ``deadline``, ``corrupt``) in a
    failed Prefill's details or a decode worker's error event; None when the message is no KV-transfer
    failure of the link. A ``TransferError`` reads ``"<code>: <message>"`` wherever it is passed on."""
    if message.startswith(DECODE_SIDE_PREFIX):
        message = message[len(DECODE_SIDE_PREFIX):]
    code = message.split(":", 1)[0].strip()
    return code if code in {c.value for c in PAIR_FAILURE_CODES} else None


@dataclass(frozen=True)
class PairHealthConfig:
    failure_limit: int = 2  # KV-transfer failures in a row that take a pair out of placement; 0: never
    cooldown_s: float = 5.0  # the first exclusion; each one in a row doubles it
    max_cooldown_s: float = 60.0

    def __post_init__(self) -> None:
        if self.failure_limit < 0 or not 0 < self.cooldown_s <= self.max_cooldown_s:
            raise ValueError("need pair failure limit >= 0 and 0 < cool-down <= max cool-down")


@dataclass
class PairState:
    prefill_name: str
    decode_name: str
    consecutive_failures: int = 0
    exclusions: int = 0  # exclusions in a row (no success between): the next cool-down doubles
    excluded_until: float = 0.0  # registry clock; in the past: not excluded
    last_reason: str = ""


@dataclass(frozen=True)
class ExcludedPair:
    prefill: str  # worker names
    decode: str
    reason: str
    failures: int  # in a row
    seconds_left: float


@dataclass
class PairHealth:
    config: PairHealthConfig = field(default_factory=PairHealthConfig)
    clock: Callable[[], float] = time.monotonic
    failures_total: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (prefill, decode, reason)
    _pairs: dict[tuple[str, str], PairState] = field(default_factory=dict)  # (prefill id, decode id) -> state

    def record_failure(self, prefill_id: str, prefill_name: str, decode_id: str, decode_name: str,
                       reason: str) -> bool:
        """Count a failure on the pair; True when it takes the pair out of placement now."""
        self.failures_total[prefill_name, decode_name, reason] += 1
        state = self._pairs.setdefault((prefill_id, decode_id), PairState(prefill_name, decode_name))
        state.consecutive_failures += 1
        state.last_reason = reason
        now = self.clock()
        if not self.config.failure_limit or state.excluded_until > now:
            return False  # never excluded, or already (requests placed before it still fail)
        if state.consecutive_failures < self.config.failure_limit and not state.exclusions:
            return False
        cooldown = min(self.config.max_cooldown_s, self.config.cooldown_s * 2 ** state.exclusions)
        state.exclusions += 1
        state.excluded_until = now + cooldown
        return True

    def record_success(self, prefill_id: str, decode_id: str) -> None:
        self._pairs.pop((prefill_id, decode_id), None)

    def excluded(self, prefill_id: str, decode_id: str) -> bool:
        state = self._pairs.get((prefill_id, decode_id))
        return state is not None and state.excluded_until > self.clock()

    def cooldown_s(self, prefill_id: str, decode_id: str) -> float:
        """Seconds the pair stays excluded (0: it is not)."""
        state = self._pairs.get((prefill_id, decode_id))
        return max(0.0, state.excluded_until - self.clock()) if state is not None else 0.0

    def excluded_pairs(self) -> list[ExcludedPair]:
        now = self.clock()
        return [ExcludedPair(s.prefill_name, s.decode_name, s.last_reason, s.consecutive_failures,
                             round(s.excluded_until - now, 1))
                for s in self._pairs.values() if s.excluded_until > now]

    def forget_worker(self, worker_id: str) -> None:
        """A worker left (or was replaced): its pairs go with it."""
        for key in [k for k in self._pairs if worker_id in k]:
            del self._pairs[key]
