"""The prefill worker: runs prompts to their first token and ships their KV caches to decode workers.

Request lifecycle:
1. ``prefill``: the router hands over a prompt, its sampling parameters and the decode worker that
   reserved blocks for it (``KVTarget``). The request joins the engine's queue (``add_request``).
2. The engine batches prompts with chunked prefill under its token budget; a long prompt takes several
   steps, each computing one chunk's KV into this worker's blocks.
3. In the step that runs a prompt's last chunk, the engine's layer hook fires after each layer: the
   worker opens the transfer on the first layer and queues each layer's blocks as soon as they are
   final, so the KV crosses the wire while the later layers compute.
4. ``step()`` returns the first token, sampled here. The worker sends it as the transfer's trailer.
5. When the decode worker acknowledges (transfer DONE), ``engine.release`` frees the blocks and the
   caller gets the first token. If the transfer fails (peer dead, fingerprint mismatch, reservation
   gone, deadline) or the request is aborted, the transfer is cancelled, the blocks are freed and the
   caller gets the error.

Threads: every engine call happens on the loop thread (an ``EngineLoop`` running ``_turn``); callers
hand it commands. The sender reads a
CPU cache's blocks in place while sending; that is safe because the blocks stay held (SENDING_KV) until
the transfer ends, except when the request ends first (abort, or a first token that finishes it) — and
then the decode side never reads that KV.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from kvferry.common.sampling import SamplingParams, TokenLogprobs
from kvferry.common.timings import PrefillTimings
from kvferry.common.worker import NoRoom, SLORefusal, WorkerRole, WorkerStats
from kvferry.engine.engine import LLMEngine, RequestOutput
from kvferry.engine.engine_loop import EngineLoop
from kvferry.transport.base import (
    FirstToken,
    KVSender,
    KVSendHandle,
    KVTarget,
    TransferError,
    TransferErrorCode,
    TransferState,
)
from kvferry.worker_common.stats import engine_stats

logger = logging.getLogger(__name__)


class PrefillAborted(Exception):
    """The request was aborted before its KV was acknowledged."""


class SLORejected(Exception):
    """Refused while queued: its TTFT target could not be met here (``refusal`` says when to retry)."""

    def __init__(self, refusal: SLORefusal):
        super().__init__(refusal.message)
        self.refusal = refusal


@dataclass(frozen=True)
class PrefillWorkerConfig:
    max_queued_requests: int = 256  # prompts accepted and not yet acknowledged; beyond: NoRoom
    command_timeout_s: float = 10.0
    idle_wait_s: float = 0.05  # loop wait when nothing runs
    poll_s: float = 0.001  # loop wait while only transfers are in flight

    def __post_init__(self) -> None:
        if self.max_queued_requests <= 0 or min(self.command_timeout_s, self.idle_wait_s, self.poll_s) <= 0:
            raise ValueError("prefill worker limits must be positive")


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    first_token_id: int
    first_logprobs: TokenLogprobs | None
    num_prompt_tokens: int
    kv_bytes: int
    prefill_seconds: float  # accepted -> first token
    transfer_seconds: float  # transfer opened -> acknowledged
    timings: PrefillTimings | None = None  # where prefill_seconds went (queue, compute)
    num_cached_tokens: int = 0  # prompt tokens this worker's prefix cache served


@dataclass
class _Job:
    request_id: str
    num_prompt_tokens: int
    target: KVTarget
    num_reserved_blocks: int | None
    future: Future
    accepted: float
    handle: KVSendHandle | None = None
    first: FirstToken | None = None
    first_at: float = 0.0
    timings: PrefillTimings | None = None
    num_cached_tokens: int = 0


class PrefillWorker:
    def __init__(
        self,
        engine: LLMEngine,
        sender: KVSender,
        config: PrefillWorkerConfig | None = None,
        worker_id: str = "prefill",
    ):
        assert engine.role is WorkerRole.PREFILL, "the prefill worker needs LLMEngine(config, role='prefill')"
        self.engine = engine
        self.sender = sender
        self.config = config or PrefillWorkerConfig()
        self.worker_id = worker_id
        self.fingerprint = engine.fingerprint
        assert sender.fingerprint.digest == self.fingerprint.digest, "the sender must carry this engine's fingerprint"
        self._jobs: dict[str, _Job] = {}  # loop thread only (reads elsewhere)
        self._draining = False
        self._loop = EngineLoop(self._turn, self._on_loop_error, f"{worker_id}-loop", self.config.command_timeout_s)
        self.kv_bytes_sent_total = 0
        self.kv_transfers_total = 0
        self.kv_transfer_failures_total = 0
        self.kv_transfer_seconds_total = 0.0
        engine.set_layer_hook(self._on_layer)

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop.start()

    def drain_wait(self, timeout_s: float) -> bool:
        """Refuse new prompts, then wait up to ``timeout_s`` for the queued ones; True if all finished."""
        self._draining = True
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if not self._jobs:
                return True
            time.sleep(0.05)
        return False

    def stop(self, timeout_s: float = 5.0) -> None:
        """Abort everything still here (blocks freed, callers get PrefillAborted), end the loop, and
        close the sender (the worker owns it)."""
        self._loop.stop(timeout_s, last=self._abort_all)
        self.sender.close()

    # ---- API (any thread) ------------------------------------------------------------------------
    def prefill(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        target: KVTarget,
        num_reserved_blocks: int | None = None,
        ttft_deadline: float | None = None,
    ) -> Future:
        """Future of a PrefillResult; it fails with TransferError, PrefillAborted or SLORejected (its
        first token could not come by ``ttft_deadline``, a ``time.monotonic()``). Raises NoRoom,
        ValueError (bad request) at once."""
        if not request_id:
            raise ValueError("request_id is empty")
        if not target.address:
            raise ValueError("no KV address for the decode worker")
        bs = self.engine.config.cache.block_size
        if num_reserved_blocks is not None and num_reserved_blocks != -(-len(prompt_token_ids) // bs):
            raise ValueError(
                f"the decode reservation has {num_reserved_blocks} blocks; a prompt of "
                f"{len(prompt_token_ids)} tokens needs {-(-len(prompt_token_ids) // bs)} of {bs} tokens"
            )
        future: Future = Future()
        job = _Job(request_id, len(prompt_token_ids), target, num_reserved_blocks, future, time.monotonic())
        self._loop.call(lambda: self._add(job, list(prompt_token_ids), params, ttft_deadline))
        return future

    def abort(self, request_id: str) -> bool:
        return bool(self._loop.call(lambda: self._abort(request_id, "aborted by request")))

    def stats(self) -> WorkerStats:
        jobs = list(self._jobs.values())
        queued = [j for j in jobs if j.first is None]
        return engine_stats(
            self.engine,
            self._loop,
            WorkerRole.PREFILL,
            self.worker_id,
            running_requests=len(jobs) - len(queued),
            waiting_requests=len(queued),
            queued_prefill_tokens=sum(j.num_prompt_tokens for j in queued),
            kv_bytes_sent_total=self.kv_bytes_sent_total,
            kv_transfer_seconds_total=self.kv_transfer_seconds_total,
            kv_transfers_total=self.kv_transfers_total,
            kv_transfer_failures_total=self.kv_transfer_failures_total,
        )

    # ---- the loop (its thread) -------------------------------------------------------------------
    def _turn(self) -> float:
        """After the queued commands: step, send first tokens, poll transfers. Returns the loop's wait."""
        outputs = self.engine.step() if self.engine.has_schedulable_requests() else []
        for output in outputs:
            self._on_first_token(output)
        self._poll_transfers()
        if self.engine.has_schedulable_requests():
            return 0.0
        sending = any(j.first is not None for j in self._jobs.values())
        return self.config.poll_s if sending else self.config.idle_wait_s

    def _on_loop_error(self) -> None:
        # a bug here must not strand callers or blocks: fail them all, keep serving
        logger.exception("prefill loop iteration failed; aborting its requests")
        self._abort_all(error="internal error in the prefill loop")

    # ---- commands and engine events (loop thread) -------------------------------------------------
    def _add(self, job: _Job, prompt: list[int], params: SamplingParams, ttft_deadline: float | None) -> None:
        if self._draining:
            raise NoRoom("the prefill worker is draining (shutting down)")
        if job.request_id in self._jobs:
            raise ValueError(f"duplicate request id {job.request_id!r}")
        if len(self._jobs) >= self.config.max_queued_requests:
            raise NoRoom(f"{len(self._jobs)} prompts already queued on this prefill worker")
        self.engine.add_request(job.request_id, prompt, params, ttft_deadline)  # ValueError: bad input
        self._jobs[job.request_id] = job

    def _on_layer(self, layer_idx: int, kv_cache_layer: torch.Tensor, finishing: list[tuple[str, list[int]]]) -> None:
        """Engine hook, after layer ``layer_idx`` stored its K/V in a step where these prompts finish."""
        for request_id, block_ids in finishing:
            job = self._jobs.get(request_id)
            if job is None:
                continue
            if job.handle is None:
                job.handle = self.sender.open(job.target, request_id, len(block_ids))
            job.handle.send_layer(layer_idx, kv_cache_layer, block_ids)

    def _on_first_token(self, output: RequestOutput) -> None:
        job = self._jobs.get(output.request_id)
        if job is None:
            return
        if output.finish_reason == "rejected":
            self._jobs.pop(job.request_id, None)
            job.future.set_exception(SLORejected(SLORefusal(output.error or "rejected", output.retry_after_s or 1.0)))
            return
        if output.error or not output.new_token_ids:
            self._fail(job, TransferError(TransferErrorCode.ABORTED, output.error or "prefill produced no token"))
            return
        if job.handle is None:  # the layer hook did not run for it: send every layer now
            if output.block_ids is None:
                self._fail(job, TransferError(TransferErrorCode.ABORTED, "internal: KV blocks gone before sending"))
                return
            job.handle = self.sender.open(job.target, job.request_id, len(output.block_ids))
            for layer_idx, kv_cache_layer in enumerate(self.engine.kv_caches):
                job.handle.send_layer(layer_idx, kv_cache_layer, output.block_ids)
        token = output.new_token_ids[0]
        logprobs = output.new_logprobs[0] if output.new_logprobs else None
        job.first = FirstToken(token, logprobs)
        job.first_at = time.monotonic()
        job.timings = output.prefill_timings
        job.num_cached_tokens = output.num_cached_tokens
        job.handle.finish(job.first)

    def _poll_transfers(self) -> None:
        for job in list(self._jobs.values()):
            if job.handle is None or job.first is None:
                continue
            state = job.handle.poll()
            if state is TransferState.PENDING:
                continue
            self._jobs.pop(job.request_id, None)
            if state is TransferState.DONE:
                self.engine.release(job.request_id)  # False if the first token already ended it
                handle = job.handle
                self.kv_bytes_sent_total += handle.bytes_sent
                self.kv_transfers_total += 1
                self.kv_transfer_seconds_total += handle.seconds
                job.future.set_result(
                    PrefillResult(
                        job.request_id, job.first.token_id, job.first.logprobs, job.num_prompt_tokens,
                        handle.bytes_sent, job.first_at - job.accepted, handle.seconds, job.timings,
                        job.num_cached_tokens,
                    )
                )
            else:
                self._fail(job, job.handle.error)

    def _fail(self, job: _Job, error: BaseException | None) -> None:
        self._jobs.pop(job.request_id, None)
        if job.handle is not None:
            job.handle.abort(str(error))
            self.kv_transfer_failures_total += 1
        self.engine.abort_request(job.request_id)
        if not job.future.done():
            job.future.set_exception(error or TransferError(TransferErrorCode.ABORTED, "failed"))

    def _abort(self, request_id: str, reason: str) -> bool:
        job = self._jobs.get(request_id)
        if job is None:
            return self.engine.abort_request(request_id)
        self._fail(job, PrefillAborted(f"request {request_id!r} {reason}"))
        return True

    def _abort_all(self, error: str = "the prefill worker is shutting down") -> None:
        for request_id in list(self._jobs):
            self._abort(request_id, error)
