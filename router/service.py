"""The router's generation service: one validated request in, a stream of ``ChoiceDelta``s out.

Fans a request out into its choices (prompts x n), runs each through the workers (``Dispatcher``),
turns token ids into text (``ChoiceState``), merges the choices into one stream, and records metrics.
Each choice's last delta carries its phase timings (``RequestTimeline``), also observed as histograms
and logged at INFO, one line per choice.
Both front ends (OpenAI HTTP, gRPC Generate) call ``generate``; closing its iterator early (client
gone) cancels every choice, which aborts it on its workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import AsyncIterator

from kvferry.common.timings import PHASES
from kvferry.router.admission import AdmissionQueue, NoCapacityError
from kvferry.proto.cluster_security import ClusterSecurity
from kvferry.router.attempt import TransferStats
from kvferry.router.dispatch import DispatchConfig, Dispatcher
from kvferry.router.placement import DisaggregationPolicy
from kvferry.router.metrics import RouterMetrics
from kvferry.router.output import ChoiceState
from kvferry.router.registry import WorkerRegistry
from kvferry.router.request import (
    APIError, ChoiceDelta, GenerationRequest, ServedModel, deadline_exceeded, overloaded,
    unavailable,
)
from kvferry.router.timings import RequestTimeline, format_timings

logger = logging.getLogger(__name__)


class RouterService:
    def __init__(
        self, model: ServedModel, registry: WorkerRegistry, admission: AdmissionQueue,
        dispatch: DispatchConfig = DispatchConfig(), policy: DisaggregationPolicy = DisaggregationPolicy(),
        security: ClusterSecurity = ClusterSecurity(), request_timeout_s: float = 0.0,
    ) -> None:
        """``registry`` should wake ``admission`` on a change (``WorkerRegistry(on_change=admission.notify)``):
        queued requests then try again as soon as capacity may have grown."""
        self._model = model
        self.request_timeout_s = request_timeout_s  # a request not done by then is aborted (504); 0 = none
        self.registry = registry
        self.admission = admission
        self.dispatcher = dispatcher = Dispatcher(
            registry, admission, dispatch, on_transfer=self._on_transfer, policy=policy, security=security
        )
        self.num_running = 0
        self.shutting_down = False  # set on SIGTERM: new requests are refused, running ones finish
        self.metrics = RouterMetrics(registry, admission, lambda: self.num_running, dispatcher.prefill_decisions,
                                     dispatcher.migrations)
        for phase in PHASES:  # every phase's series exists from the start, at zero
            self.metrics.phase_seconds.labels(model.name, phase)

    @property
    def model(self) -> ServedModel:
        """The served model, its context cut to the smallest any registered worker accepts."""
        worker_len = self.registry.max_model_len
        if worker_len and worker_len < self._model.max_model_len:
            return replace(self._model, max_model_len=worker_len)
        return self._model

    def _on_transfer(self, stats: TransferStats) -> None:
        if stats.kv_bytes:
            self.metrics.kv_transfer_bytes.inc(stats.kv_bytes)
            self.metrics.kv_transfer_seconds.observe(stats.transfer_seconds)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[ChoiceDelta]:
        """Deltas of every choice, interleaved as they come; each choice ends with a finish_reason."""
        if self.shutting_down:
            raise unavailable("the router is shutting down", code="shutting_down")
        arrival = time.perf_counter()
        queue: asyncio.Queue[ChoiceDelta | BaseException] = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._run_choice(request, i, arrival, queue)) for i in range(request.num_choices)
        ]
        for p in request.prompts:
            self.metrics.prompt_tokens.inc(len(p))
        self.num_running += 1
        remaining = request.num_choices
        deadline = arrival + self.request_timeout_s if self.request_timeout_s else None
        try:
            while remaining:
                if deadline is None:
                    item = await queue.get()
                else:
                    try:
                        item = await asyncio.wait_for(queue.get(), max(deadline - time.perf_counter(), 0.0))
                    except TimeoutError:  # the finally below cancels every choice: aborted on its workers
                        raise deadline_exceeded(self.request_timeout_s) from None
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    remaining -= 1
                yield item
            self.metrics.e2e.observe(time.perf_counter() - arrival)
        finally:
            self.num_running -= 1
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_choice(
        self, request: GenerationRequest, index: int, arrival: float, queue: asyncio.Queue
    ) -> None:
        params = request.choice_params(index)
        prompt = request.choice_prompt(index)
        state = ChoiceState(index, self._model.tokenizer, prompt, params)
        request_id = request.request_id if request.num_choices == 1 else f"{request.request_id}-{index}"
        last_token_at: float | None = None
        timeline = RequestTimeline.now()
        events = self.dispatcher.run(request_id, prompt, params, timeline)
        try:
            async for event in events:
                if event.token_ids:
                    timeline.mark_first_token()
                    now = time.perf_counter()
                    if last_token_at is None:
                        self.metrics.ttft.observe(now - arrival)
                    else:
                        gap = (now - last_token_at) / len(event.token_ids)
                        for _ in event.token_ids:
                            self.metrics.itl.observe(gap)
                    last_token_at = now
                delta = state.add(event.token_ids, event.logprobs)
                self.metrics.generation_tokens.inc(len(delta.token_ids))
                if not state.finished and event.finish_reason is not None:
                    # The worker ended it (context length, abort, error): flush held-back text.
                    tail = state.finish(event.finish_reason, event.error)
                    delta.text += tail.text
                    delta.finish_reason, delta.error = tail.finish_reason, tail.error
                if delta.finish_reason is not None:
                    delta.timings = self._finish_timeline(request_id, timeline, delta.finish_reason)
                    delta.num_cached_tokens = event.num_cached_tokens
                queue.put_nowait(delta)
                if state.finished:
                    break  # a stop string the router found: closing `events` aborts on the workers
        except NoCapacityError as exc:
            queue.put_nowait(overloaded(str(exc), exc.retry_after_s) if exc.overloaded
                             else unavailable(str(exc), retry_after_s=exc.retry_after_s))
        except APIError as exc:
            queue.put_nowait(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not hang the client: report it as this choice's error
            queue.put_nowait(APIError(f"internal error: {exc!r}", code="internal_error", status=500, type="server_error"))
        finally:
            await events.aclose()
            if timeline.end is None:  # refused, failed to place, or the client went away
                self._finish_timeline(request_id, timeline, "unfinished")

    def _finish_timeline(self, request_id: str, timeline: RequestTimeline, finish_reason: str) -> dict[str, float]:
        timeline.mark_end()
        durations = timeline.durations()
        if finish_reason in ("stop", "length"):  # errors and aborts would skew the phases
            for phase, seconds in durations.items():
                self.metrics.phase_seconds.labels(self._model.name, phase).observe(seconds)
        logger.info("request %s %s, prefill %s: %s", request_id, finish_reason, timeline.placement or "not placed",
                    format_timings(durations))
        return durations
