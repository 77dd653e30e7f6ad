"""Serving profiles: the latency targets a worker's scheduler and the router plan for. Torch-free.

A profile names a time-to-first-token target (TTFT) and a time-per-output-token target (TPOT) and the
policy knobs that follow from them; ``--ttft-slo-ms`` / ``--tpot-slo-ms`` override a profile's targets.
What the targets drive (engine/scheduler.py, with the step-time model of engine/step_time.py):

- TPOT: the target is a mean over a stream's tokens. A decode-only step is planned to take at most
  ``step_headroom`` x the target (this caps the batch); the prefill tokens riding along a step (the
  chunk) may also spend what the streams banked by running faster than that, up to
  ``max_stall_factor`` x the target in one step. 0: no target, batches as wide as memory allows.
- TTFT: a queued request is refused (``SLORefusal``: HTTP 429 / gRPC RESOURCE_EXHAUSTED with a
  retry-after) once its first token cannot come in time any more, instead of being served late; on a
  dedicated prefill worker the step is kept short enough (``prefill_step_fraction`` of the target)
  that a short prompt arriving behind a long one is not held for the whole long prompt. 0: no
  target, nothing is refused, requests queue.

The profiles (figures: 2 threads, SmolLM2-135M; see docs/SCHEDULING.md):

- ``latency``: TTFT 3 s, TPOT 100 ms: chat that must feel live on a small box. Shortest prompt first
  within the TTFT bound; refuses what would be late.
- ``balanced`` (the default): TPOT 300 ms (faster than people read), no TTFT target: streams stay
  smooth, and a burst queues instead of being refused.
- ``throughput``: no targets: the widest batches and 4096-token steps, oldest prompt first (batch jobs,
  offline evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

PREFILL_ORDERS = ("fcfs", "shortest")


class ProfileError(ValueError):
    """A profile name or target that cannot be used (the message says why)."""


@dataclass(frozen=True)
class SLOProfile:
    name: str
    ttft_slo_ms: float = 0.0  # time-to-first-token target; 0: none (nothing refused, requests queue)
    tpot_slo_ms: float = 0.0  # time-per-output-token target; 0: none (batch as wide as memory allows)
    max_num_seqs: int = 64  # the batch's hard cap (memory, KV room); the TPOT target may cap lower
    max_num_batched_tokens: int = 2048  # tokens one step may carry: the chunk on a prefill worker
    prefill_order: str = "fcfs"  # "shortest": shortest prompt first unless that makes one miss TTFT
    # (needs a TTFT target to bound the wait of long prompts; without one the order stays FCFS)
    step_headroom: float = 0.8  # plan decode steps to this fraction of the TPOT target (jitter, steal)
    # A step carrying decode rows may spend the time its streams banked by running faster than their
    # TPOT target (a mean over the stream), up to this many times the target in one step.
    max_stall_factor: float = 8.0
    prefill_step_fraction: float = 0.25  # prefill worker: a step at most this fraction of the TTFT target
    min_chunk_tokens: int = 16  # prefill progress of a step even when the TPOT target leaves no room
    reject_margin: float = 0.75  # refuse only if a queue this much faster than predicted still misses
    # Conditional disaggregation (router): prompts of up to this many uncached tokens are prefilled on
    # the decode worker itself, riding along its decode steps; 0 = never.
    local_prefill_max_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ProfileError("a profile needs a name")
        if self.ttft_slo_ms < 0 or self.tpot_slo_ms < 0:
            raise ProfileError(f"SLO targets must be >= 0 ms (0 = none), got ttft {self.ttft_slo_ms}, "
                               f"tpot {self.tpot_slo_ms}")
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0 or self.min_chunk_tokens <= 0:
            raise ProfileError("max_num_seqs, max_num_batched_tokens and min_chunk_tokens must be positive")
        if self.prefill_order not in PREFILL_ORDERS:
            raise ProfileError(f"prefill_order must be one of {PREFILL_ORDERS}, got {self.prefill_order!r}")
        if self.max_stall_factor < self.step_headroom:
            raise ProfileError(f"max_stall_factor must be >= step_headroom, got {self.max_stall_factor}")
        for name in ("step_headroom", "prefill_step_fraction", "reject_margin"):
            if not 0 < getattr(self, name) <= 1:
                raise ProfileError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.local_prefill_max_tokens < 0:
            raise ProfileError("local_prefill_max_tokens must be >= 0 (0 = never)")

    @property
    def ttft_s(self) -> float | None:
        return self.ttft_slo_ms / 1000.0 if self.ttft_slo_ms else None

    @property
    def tpot_s(self) -> float | None:
        return self.tpot_slo_ms / 1000.0 if self.tpot_slo_ms else None

    @property
    def decode_step_target_s(self) -> float | None:
        """What a step carrying decode rows is planned to take; None without a TPOT target."""
        return self.tpot_slo_ms * self.step_headroom / 1000.0 if self.tpot_slo_ms else None

    @property
    def prefill_step_target_s(self) -> float | None:
        """What a prefill-only step is planned to take; None without a TTFT target."""
        return self.ttft_slo_ms * self.prefill_step_fraction / 1000.0 if self.ttft_slo_ms else None

    def ttft_deadline(self, now: float, budget_ms: int = 0) -> float | None:
        """When a request that reached this process at ``now`` must have its first token: ``now`` plus
        the router's remaining budget when it sent one, else plus this profile's TTFT target; None:
        no target (never refused)."""
        if budget_ms > 0:
            return now + budget_ms / 1000.0
        return now + self.ttft_slo_ms / 1000.0 if self.ttft_slo_ms else None

    def with_targets(self, ttft_slo_ms: float | None = None, tpot_slo_ms: float | None = None) -> SLOProfile:
        """This profile with explicit targets (None keeps the profile's)."""
        changes = {}
        if ttft_slo_ms is not None:
            changes["ttft_slo_ms"] = ttft_slo_ms
        if tpot_slo_ms is not None:
            changes["tpot_slo_ms"] = tpot_slo_ms
        return replace(self, **changes) if changes else self


PROFILES: dict[str, SLOProfile] = {
    "latency": SLOProfile(
        "latency", ttft_slo_ms=3000, tpot_slo_ms=100, max_num_seqs=64, max_num_batched_tokens=2048,
        prefill_order="shortest", local_prefill_max_tokens=64,
    ),
    "balanced": SLOProfile(
        "balanced", ttft_slo_ms=0, tpot_slo_ms=300, max_num_seqs=128, max_num_batched_tokens=2048,
        prefill_order="fcfs", local_prefill_max_tokens=128,
    ),
    "throughput": SLOProfile(
        "throughput", ttft_slo_ms=0, tpot_slo_ms=0, max_num_seqs=256, max_num_batched_tokens=4096,
        prefill_order="fcfs", local_prefill_max_tokens=0,
    ),
}
DEFAULT_PROFILE = "balanced"
# No targets, first come first served: the engine's behaviour when nobody chose a profile (LLM, tests).
UNTARGETED = SLOProfile("untargeted")


def resolve_profile(
    name: str | None = None, ttft_slo_ms: float | None = None, tpot_slo_ms: float | None = None
) -> SLOProfile:
    """The named profile (default ``DEFAULT_PROFILE``) with explicit targets applied."""
    name = name or DEFAULT_PROFILE
    if name not in PROFILES:
        raise ProfileError(f"unknown profile {name!r}; choose one of: " + ", ".join(PROFILES))
    return PROFILES[name].with_targets(ttft_slo_ms, tpot_slo_ms)


def add_profile_arguments(parser) -> None:
    """``--profile``, ``--ttft-slo-ms``, ``--tpot-slo-ms``: on serve, router and every worker."""
    parser.add_argument("--profile", default=DEFAULT_PROFILE, choices=tuple(PROFILES),
                        help=f"latency targets to plan for (default {DEFAULT_PROFILE}; docs/SCHEDULING.md)")
    parser.add_argument("--ttft-slo-ms", type=float, default=None,
                        help="time-to-first-token target in ms, overriding the profile's (0: none)")
    parser.add_argument("--tpot-slo-ms", type=float, default=None,
                        help="time-per-output-token target in ms, overriding the profile's (0: none)")


def profile_from_args(args) -> SLOProfile:
    return resolve_profile(args.profile, args.ttft_slo_ms, args.tpot_slo_ms)


def profile_argv(args) -> list[str]:
    """The profile flags again, for a launcher that passes them on to its children."""
    argv = ["--profile", args.profile]
    if args.ttft_slo_ms is not None:
        argv += ["--ttft-slo-ms", f"{args.ttft_slo_ms:g}"]
    if args.tpot_slo_ms is not None:
        argv += ["--tpot-slo-ms", f"{args.tpot_slo_ms:g}"]
    return argv
