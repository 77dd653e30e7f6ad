"""LLMEngine: one process's engine. Requests in, token outputs out, one ``step()`` at a time.

Request lifecycle inside the engine:
1. ``add_request`` validates the prompt and parameters and queues the request (WAITING).
2. ``step`` schedules a batch (prefill chunks + decodes), runs the model, samples, and for each request
   that produced a token: detokenizes it, checks stop conditions and reports a ``RequestOutput``.
3. A finished request (stop, length, abort, error) returns its blocks at once.

Roles, for disaggregated serving (the same engine runs all three):
- ``both``: prefill and decode here (single process, or the colocated baseline).
- ``prefill``: a request stops after its first token but keeps its blocks (SENDING_KV) until
  ``release`` is called, once the decode side has acknowledged the KV transfer.
- ``decode``: ``reserve`` holds blocks for a prompt before the prefill worker runs it, the transport
  writes the KV into them, ``commit_kv`` starts decoding from the prefill worker's first token.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvferry.common.fingerprint import KVFingerprint
from kvferry.common.timings import PrefillTimings
from kvferry.common.worker import SLORefusal, WorkerRole
from kvferry.engine.block_manager import BlockManager
from kvferry.engine.config import ConfigError, EngineConfig, dense_prompt_weights, num_threads
from kvferry.engine.device import activation_bytes, cuda_kv_budget_bytes
from kvferry.engine.grammar_mask import GrammarCompiler
from kvferry.engine.loader import load_model
from kvferry.engine.model import dense_copy_bytes
from kvferry.engine.model_runner import ModelRunner
from kvferry.engine.request import Request, RequestStatus
from kvferry.engine.sampling import (
    Sampler,
    SamplingParams,
    SamplingState,
    TokenLogprobs,
    check_stop,
    stop_holdback,
)
from kvferry.engine.scheduler import Scheduler, SchedulerOutput
from kvferry.engine.step_time import StepTimeModel
from kvferry.engine.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)

# fn(layer_idx, kv_cache_layer, [(request_id, block_ids), ...]) after a layer's K/V is stored in a step
# where those requests finish their prefill: lets the prefill worker ship KV while later layers run.
KVLayerHook = Callable[[int, torch.Tensor, list[tuple[str, list[int]]]], None]


class RequestError(ValueError):
    """A request that cannot be served as given (the message says why)."""


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | "rejected"
    new_logprobs: list[TokenLogprobs] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    block_ids: list[int] | None = None  # prefill role: blocks holding the KV to ship
    error: str | None = None
    retry_after_s: float | None = None  # "rejected": when to try again (the queue's predicted drain)
    prefill_timings: PrefillTimings | None = None  # on the first token's output, if this engine prefilled


@dataclass
class _Tracked:
    """Per-request state the engine keeps beside the scheduler's Request."""

    sampling: SamplingState
    detokenizer: IncrementalDetokenizer
    emitted_chars: int = 0  # text already reported; the rest may still be cut by a stop string
    pending_token_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprobs] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, role: WorkerRole | str = WorkerRole.COLOCATED):
        """``role``: prefill (a prompt's blocks are held after its first token until ``release``), decode
        (KV arrives in ``reserve``d blocks; prompts may be prefilled here too) or colocated (both phases)."""
        try:
            self.role = WorkerRole(role)
        except ValueError:
            raise ConfigError(f"unknown role {role!r}; choose one of {', '.join(WorkerRole)}") from None
        config = config or EngineConfig()
        self.config = config
        if num_threads():
            torch.set_num_threads(num_threads())
        dtype = config.torch_dtype
        loaded = load_model(config.model, dtype, config.device, config.weights)
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.dtype = dtype
        self.max_model_len = min(self.model_config.max_model_len, config.scheduler.max_model_len)
        num_blocks = config.cache.resolve_num_blocks(self.model_config, dtype, self._device_kv_budget(dtype))
        self.block_manager = BlockManager(
            num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            config.scheduler, self.block_manager, StepTimeModel(), decodes_here=self.role is not WorkerRole.PREFILL
        )
        copy_bytes = dense_copy_bytes(loaded.model, dtype)
        dense = copy_bytes > 0 and dense_prompt_weights(config.prompt_weights, copy_bytes)
        if copy_bytes:
            logger.info("quantized weights: prompt products on %s", f"a dense copy ({copy_bytes / 2**20:.0f} MiB)"
                        if dense else "the weights dequantized on every call (--prompt-weights)")
        self.runner = ModelRunner(
            loaded.model, num_blocks, config.cache.block_size, dtype, config.device, dense_prompt_weights=dense
        )
        self.sampler = Sampler(config.seed, GrammarCompiler(self.tokenizer, self.model_config.vocab_size))
        self._tracked: dict[str, _Tracked] = {}
        self._arrivals = itertools.count()
        self._layer_hook: KVLayerHook | None = None

    @property
    def fingerprint(self) -> KVFingerprint:
        """What a peer's KV blocks and token ids must agree with (KV handshake, registration)."""
        return KVFingerprint.from_model(self.model_config, self.dtype, self.config.cache.block_size, self.max_model_len)

    def _device_kv_budget(self, dtype: torch.dtype) -> int | None:
        """KV cache bytes from ``gpu_memory_utilization`` (weights already loaded); None: not so sized."""
        cache, sched = self.config.cache, self.config.scheduler
        if cache.num_blocks or cache.gpu_memory_utilization is None:
            return None
        activations = activation_bytes(self.model_config, sched.max_num_batched_tokens, sched.max_num_seqs, dtype)
        budget = cuda_kv_budget_bytes(self.config.device, cache.gpu_memory_utilization, activations)
        logger.info("KV cache: %.2f GiB of %s (--gpu-memory-utilization %g)", budget / 2**30, self.config.device,
                    cache.gpu_memory_utilization)
        return budget

    @property
    def kv_caches(self) -> list[torch.Tensor]:
        return self.runner.kv_caches

    # ---- requests ------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        ttft_deadline: float | None = None,
        output_token_ids: list[int] | tuple[int, ...] = (),
    ) -> Request:
        """``ttft_deadline`` (``time.monotonic()``): the first token is due by then, or the request is
        refused while still queued (finish reason "rejected"); None: no target, never refused.
        ``output_token_ids``: a stream resumed here (request migration): the tokens it already produced
        elsewhere count as its output (max_tokens, stop rules, penalties and the seeded random stream go
        on from them) and the next token it yields is output position ``len(output_token_ids)``."""
        request = self._new_request(request_id, prompt, params or SamplingParams(), output_token_ids=output_token_ids)
        request.ttft_deadline = ttft_deadline
        self.scheduler.add(request)
        return request

    def abort_request(self, request_id: str) -> bool:
        """Abort in any state; its blocks return at once. False if the id is unknown or finished."""
        return self._finish(request_id, RequestStatus.FINISHED_ABORTED) is not None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def has_schedulable_requests(self) -> bool:
        """True if ``step`` has work now (not counting requests that only wait for KV or an ack)."""
        return bool(self.scheduler.running or self.scheduler.waiting)

    def get_request(self, request_id: str) -> Request | None:
        return self.scheduler.requests.get(request_id)

    def batch_cap(self, new_context: int = 0) -> int:
        """Sequences the batch may hold now (the profile's TPOT target may keep it under max_num_seqs)."""
        return self.scheduler.batch_cap(new_context)

    def warm_up(self, max_seconds: float = 10.0) -> None:
        """A few synthetic steps (prompts, then decode batches) on an idle engine, so the step-time model
        starts from this machine's speed rather than a guess: they become its prior. Rounds stop
        starting after ``max_seconds`` (a loaded box must not hold a worker's start for minutes)."""
        assert not self.scheduler.has_unfinished(), "warm up an idle engine"
        model = self.scheduler.step_model
        vocab = self.model_config.vocab_size
        # Eight tokens a request: the decode steps at batch 1, 8 and 16 pin the fixed cost of a step and
        # the cost per row, which prompts alone leave confounded.
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        # The first pass only pays first-use costs (kernels, oneDNN primitives per shape): it is forgotten.
        shapes = [[8], [128, 16, 16, 16, 16, 16, 16, 16], [64], [256], [16] * 16]
        rounds = shapes + shapes
        end = time.monotonic() + max_seconds
        # Each round must fit a small context and cache (tests run workers with a few dozen blocks).
        bm = self.block_manager
        room = min(self.max_model_len - params.max_tokens - 1, bm.num_blocks * bm.block_size // 2)
        for i, lengths in enumerate(rounds):
            if i > len(shapes) + 1 and time.monotonic() > end:
                break
            ids = []
            for j, n in enumerate(lengths):
                n = max(1, min(n, room // len(lengths) - params.max_tokens))
                rid = f"warm-up-{i}-{j}"
                # Distinct tokens per request: the prefix cache must not turn a prompt into a hit.
                self.add_request(rid, [(1000 + 7919 * (i * 16 + j) + 31 * k) % vocab for k in range(n)], params)
                ids.append(rid)
            for _ in range(16):
                if not self.has_schedulable_requests():
                    break
                self.step()
            for rid in ids:
                self.release(rid) or self.abort_request(rid)
            if i == len(shapes) - 1:
                model.reset()
        model.settle_prior()
        logger.info("step-time model after warm-up: %s", model.describe())

    # ---- disaggregation ------------------------------------------------------------------------
    def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        sampling_seed: int | None = None,
    ) -> list[int] | None:
        """Decode role: blocks for the prompt's KV, or None when there is no room (backpressure).

        ``sampling_seed`` (the prefill side's ``sampling_seed(request_id)``) continues the prefill
        worker's random stream, so a seeded request samples exactly as it would in one process.
        """
        request = self._new_request(request_id, prompt_token_ids, params, sampling_seed)
        blocks = self.scheduler.reserve(request)
        if blocks is None:
            self._tracked.pop(request_id, None)
        return blocks

    def commit_kv(
        self, request_id: str, first_token_id: int, first_logprobs: TokenLogprobs | None = None
    ) -> RequestOutput:
        """Decode role: the KV is in the reserved blocks; decoding starts after ``first_token_id``.

        Returns the output for the first token (usually already streamed by the prefill worker); if it
        finishes the request (EOS, max_tokens=1) the blocks are freed at once. A token id outside the
        vocabulary (it came over the network) raises RequestError and changes nothing.
        """
        if not 0 <= first_token_id < self.model_config.vocab_size:
            raise RequestError(f"first token id {first_token_id} is not in [0, {self.model_config.vocab_size})")
        request = self.scheduler.commit_kv(request_id, first_token_id)
        tracked = self._tracked[request_id]
        tracked.sampling.append(first_token_id)
        return self._process_token(request, first_token_id, first_logprobs)

    def release(self, request_id: str) -> bool:
        """Prefill role: the decode side has the KV; free the blocks held since the first token."""
        request = self.scheduler.requests.get(request_id)
        if request is None or request.status is not RequestStatus.SENDING_KV:
            return False
        self.scheduler.finish(request_id, RequestStatus.FINISHED_STOPPED)
        self._tracked.pop(request_id, None)
        return True

    def sampling_seed(self, request_id: str) -> int:
        """The seed of a request's random stream, for the peer that continues it."""
        return self._tracked[request_id].sampling.seed

    def set_layer_hook(self, hook: KVLayerHook | None) -> None:
        self._layer_hook = hook

    # ---- the step --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        started = time.monotonic()
        batch = self.scheduler.schedule(started)
        refused = [self._rejected(r.request, r.refusal) for r in batch.rejected]
        if not batch:
            return refused
        sampling_items = [s for s in batch.scheduled if s.samples]
        now = time.monotonic()
        for s in batch.scheduled:
            if s.request.first_scheduled_time is None:
                s.request.first_scheduled_time = now
        try:
            logits = self.runner.execute(batch, self._make_layer_hook(batch))
            result = self.sampler.sample(
                logits, [self._tracked[s.request.request_id].sampling for s in sampling_items]
            )
        except Exception as exc:  # a failed step must not strand its requests: fail them, free blocks
            logger.exception("engine step failed")
            return [self._fail(s.request.request_id, f"engine step failed: {exc}") for s in batch.scheduled]
        sampled = {s.request.request_id: t for s, t in zip(sampling_items, result.token_ids)}
        self.scheduler.update(batch, sampled, time.monotonic())
        outputs = []
        for item, token, logprobs in zip(sampling_items, result.token_ids, result.logprobs):
            self._tracked[item.request.request_id].sampling.append(token)
            outputs.append(self._process_token(item.request, token, logprobs))
        self.scheduler.step_model.observe(batch.shape, time.monotonic() - started)
        return refused + outputs

    # ---- internals -----------------------------------------------------------------------------
    def _new_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        sampling_seed: int | None = None,
        output_token_ids: list[int] | tuple[int, ...] = (),
    ) -> Request:
        if request_id in self.scheduler.requests:
            raise RequestError(f"duplicate request id {request_id!r}")
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise RequestError("the prompt is empty")
        if any(not 0 <= t < self.model_config.vocab_size for t in token_ids):
            raise RequestError(f"prompt token ids must be in [0, {self.model_config.vocab_size})")
        if len(token_ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(token_ids)} tokens; this model's context is {self.max_model_len} "
                "tokens, and at least one must remain for the output"
            )
        outputs = list(output_token_ids)
        if outputs:
            if any(not 0 <= t < self.model_config.vocab_size for t in outputs):
                raise RequestError(f"resumed output token ids must be in [0, {self.model_config.vocab_size})")
            if len(outputs) >= params.max_tokens or len(token_ids) + len(outputs) >= self.max_model_len:
                raise RequestError(
                    f"nothing left to generate: {len(outputs)} output tokens already, max_tokens "
                    f"{params.max_tokens}, context {len(token_ids) + len(outputs)} of {self.max_model_len}"
                )
        request = Request(request_id, token_ids, params, arrival_index=next(self._arrivals),
                          output_token_ids=outputs, num_resumed_tokens=len(outputs))
        self._tracked[request_id] = _Tracked(
            sampling=self.sampler.new_state(params, token_ids, outputs, seed=sampling_seed),
            detokenizer=IncrementalDetokenizer(self.tokenizer, token_ids + outputs),
        )
        return request

    def _make_layer_hook(self, batch: SchedulerOutput) -> Callable[[int], None] | None:
        if self._layer_hook is None or self.role is not WorkerRole.PREFILL:
            return None
        finishing = [
            (s.request.request_id, list(s.request.block_table))
            for s in batch.scheduled
            if s.samples and s.request.num_output_tokens == 0
        ]
        if not finishing:
            return None
        hook, caches = self._layer_hook, self.runner.kv_caches
        return lambda layer: hook(layer, caches[layer], finishing)

    def _process_token(
        self, request: Request, token: int, logprobs: TokenLogprobs | None
    ) -> RequestOutput:
        tracked = self._tracked[request.request_id]
        num_new_chars = len(tracked.detokenizer.add(token))
        text = tracked.detokenizer.text
        tracked.pending_token_ids.append(token)
        if logprobs is not None:
            tracked.pending_logprobs.append(logprobs)
        decision = check_stop(
            request.output_token_ids, token, text, request.params, self.tokenizer.eos_token_ids,
            num_new_chars,
        )
        finished, reason = decision.finished, decision.reason
        if not finished and request.num_tokens >= self.max_model_len:
            finished, reason = True, "length"
        if finished:
            end = len(text) if decision.trim_text_to is None else decision.trim_text_to
        else:
            end = len(text) - stop_holdback(text, request.params)
        end = max(end, tracked.emitted_chars)
        output = RequestOutput(
            request_id=request.request_id,
            new_token_ids=tracked.pending_token_ids,
            new_text=text[tracked.emitted_chars : end],
            finished=finished,
            finish_reason=reason if finished else None,
            new_logprobs=tracked.pending_logprobs if request.params.logprobs is not None else None,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens,
            prefill_timings=(request.prefill_timings
                             if request.num_output_tokens == request.num_resumed_tokens + 1 else None),
        )
        tracked.emitted_chars = end
        tracked.pending_token_ids, tracked.pending_logprobs = [], []
        if finished:
            status = RequestStatus.FINISHED_STOPPED if reason == "stop" else RequestStatus.FINISHED_LENGTH
            self._finish(request.request_id, status)
        elif self.role is WorkerRole.PREFILL:
            self.scheduler.hold_for_sending(request)
            output.block_ids = list(request.block_table)
        return output

    def _rejected(self, request: Request, refusal: SLORefusal) -> RequestOutput:
        """A request the scheduler refused (its TTFT target is lost); it holds nothing any more."""
        self._tracked.pop(request.request_id, None)
        return RequestOutput(
            request.request_id, [], "", True, "rejected", num_prompt_tokens=request.num_prompt_tokens,
            error=refusal.message, retry_after_s=refusal.retry_after_s,
        )

    def _fail(self, request_id: str, message: str) -> RequestOutput:
        request = self._finish(request_id, RequestStatus.FINISHED_ERROR)
        return RequestOutput(
            request_id, [], "", True, "error",
            num_prompt_tokens=request.num_prompt_tokens if request else 0, error=message,
        )

    def _finish(self, request_id: str, status: RequestStatus) -> Request | None:
        self._tracked.pop(request_id, None)
        return self.scheduler.finish(request_id, status)
