"""Conditional disaggregation: does a prompt go to a prefill worker, or does the decode worker that holds
its KV blocks prefill it itself (``Reserve(prefill_locally=true)``)?

A prefill worker pays for itself when the prompt is long: it computes the KV without stalling the decode
worker's streams. For a short prompt the hop costs more than it saves (Reserve, Prefill, a KV push, a
commit), and a prompt mostly in the decode worker's prefix cache needs little compute there anyway. So,
in ``auto`` mode, for a decode worker already picked (``WorkerRegistry.pick_decode``):

1. no live prefill worker: local (``no_prefill_worker``), so a cluster keeps serving while its prefill
   worker restarts;
2. uncached tokens (prompt minus the estimated prefix-cache hit) at most ``local_prefill_max_tokens``:
   local (``short_prompt``, or ``cached`` when the cache made it short);
3. estimated hit at least ``local_prefill_cached_fraction`` of the prompt: local (``cached``);
4. the decode worker nearly idle (requests over its batch limit at most ``idle_decode_load``) while the
   least-queued prefill worker has at least ``prefill_busy_tokens`` queued, more than the decode worker
   would have with this prompt: local (``prefill_busy``);
5. otherwise remote (``default``).

The prefix-cache hit is the router's estimate (``registry.RecentBlocks``: the block hashes of prompts
recently sent to that worker), not the worker's answer: the decision has to be made before Reserve,
which is where the worker would find out. A colocated worker always prefills (``colocated``); ``never``
and ``always`` modes skip the rules.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from kvferry.router.registry import Worker

MODES = ("auto", "never", "always")

# Every (decision, reason) the router can count; the metric shows them all from the start.
DECISIONS = (
    ("local", "colocated"),
    ("local", "always"),
    ("local", "no_prefill_worker"),
    ("local", "prefill_unreachable"),  # prefill workers there are, but none whose KV reaches this one
    ("local", "short_prompt"),
    ("local", "cached"),
    ("local", "prefill_busy"),
    ("remote", "never"),
    ("remote", "default"),
)


@dataclass(frozen=True)
class DisaggregationPolicy:
    mode: str = "auto"  # auto | never (always a prefill worker) | always (always the decode worker)
    local_prefill_max_tokens: int = 64  # uncached prompt tokens a decode worker prefills itself
    local_prefill_cached_fraction: float = 0.9  # estimated prefix-cache hit that makes it local
    prefill_busy_tokens: int = 2048  # queued on the least-busy prefill worker: "busy"
    idle_decode_load: float = 0.125  # requests over batch limit at most this: an "idle" decode worker

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"local prefill mode must be one of {MODES}, got {self.mode!r}")
        if self.local_prefill_max_tokens < 0 or self.prefill_busy_tokens < 0:
            raise ValueError("local prefill token thresholds must be >= 0")
        if not 0.0 < self.local_prefill_cached_fraction <= 1.0 or not 0.0 <= self.idle_decode_load <= 1.0:
            raise ValueError("local_prefill_cached_fraction must be in (0, 1] and idle_decode_load in [0, 1]")


@dataclass(frozen=True)
class PrefillDecision:
    local: bool
    reason: str
    num_cached_tokens: int = 0  # the router's estimate of the decode worker's prefix-cache hit

    @property
    def label(self) -> str:
        return "local" if self.local else "remote"


def decide(
    policy: DisaggregationPolicy,
    decode: Worker,
    prefill: list[Worker],
    num_prompt_tokens: int,
    num_cached_tokens: int,
) -> PrefillDecision:
    """Where ``decode`` (a decode worker, not a colocated one) gets the prompt's KV from.
    ``prefill``: the live prefill workers."""
    if policy.mode == "always":
        return PrefillDecision(True, "always", num_cached_tokens)
    if policy.mode == "never":
        return PrefillDecision(False, "never", num_cached_tokens)
    if not prefill:
        return PrefillDecision(True, "no_prefill_worker", num_cached_tokens)
    uncached = num_prompt_tokens - num_cached_tokens
    if uncached <= policy.local_prefill_max_tokens:
        return PrefillDecision(True, "cached" if num_cached_tokens else "short_prompt", num_cached_tokens)
    if num_cached_tokens >= policy.local_prefill_cached_fraction * num_prompt_tokens:
        return PrefillDecision(True, "cached", num_cached_tokens)
    least_queued = min(w.queued_prefill_tokens_estimate for w in prefill)
    load = max(decode.capacity.running_requests + decode.capacity.waiting_requests, decode.num_inflight)
    if (
        least_queued >= policy.prefill_busy_tokens
        and load <= policy.idle_decode_load * decode.max_running
        and decode.queued_prefill_tokens_estimate + uncached < least_queued
    ):
        return PrefillDecision(True, "prefill_busy", num_cached_tokens)
    return PrefillDecision(False, "default", num_cached_tokens)


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """The router's flags for this policy (``kvferry router``; ``kvferry serve`` passes them on)."""
    p = DisaggregationPolicy()
    parser.add_argument("--local-prefill", choices=MODES, default=None,
                        help="where prompts are prefilled: auto (by the rules of docs/ROUTER.md), never "
                             f"(always a prefill worker), always (the decode worker itself); default {p.mode}")
    parser.add_argument("--local-prefill-max-tokens", type=int, default=None,
                        help="auto: a decode worker prefills prompts of at most this many uncached tokens "
                             "itself (default: the --profile's; 0: only by the other rules)")
    parser.add_argument("--local-prefill-cached-fraction", type=float, default=None,
                        help="auto: ... and prompts at least this much in its prefix cache, as the router "
                             f"estimates it (default {p.local_prefill_cached_fraction})")


def placement_from_args(
    args: argparse.Namespace, base: DisaggregationPolicy = DisaggregationPolicy()
) -> DisaggregationPolicy:
    """``base`` (the defaults, or what a serving profile sets), with what the flags set; ValueError
    names a bad value."""
    given = {
        "mode": args.local_prefill,
        "local_prefill_max_tokens": args.local_prefill_max_tokens,
        "local_prefill_cached_fraction": args.local_prefill_cached_fraction,
    }
    return replace(base, **{k: v for k, v in given.items() if v is not None})
