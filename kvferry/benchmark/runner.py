"""Replay a workload at one request rate (a round of a sweep), bounded in time.

Each request is sent at its arrival time (or later, when ``max_concurrency`` requests are already in
flight). At ``max_duration_s`` after the round's start no more requests are sent, and those still in
flight are cancelled and recorded as failed ("unfinished"): a request that has not completed by the
end of the window cannot be credited, and the round always ends. Requests never sent are only counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass

from tqdm import tqdm

from kvferry.benchmark.arrivals import arrival_times
from kvferry.benchmark.client import RequestOptions, RequestRecord, make_client, send_request
from kvferry.benchmark.datasets import DatasetSpec, Sample, make_samples

UNFINISHED = "unfinished at --max-duration-s (cancelled)"


@dataclass
class RoundResult:
    rate: float
    records: list[RequestRecord]  # requests sent, in send order
    duration_s: float  # round start -> last request finished or cancelled
    num_not_sent: int


def round_workload(spec: DatasetSpec, num_prompts: int, rate: float, burstiness: float, seed: int,
                   round_index: int) -> tuple[list[Sample], list[float]]:
    """Round ``round_index``'s prompts and send times: the same on every system given the same seed."""
    samples = make_samples(spec, num_prompts, seed, round_index)
    return samples, arrival_times(rate, num_prompts, burstiness, seed, round_index)


async def run_round(
    options: RequestOptions, rate: float, samples: list[Sample], send_times: list[float],
    max_duration_s: float, max_concurrency: int | None = None, progress: bool = True,
) -> RoundResult:
    if len(samples) != len(send_times):
        raise ValueError("one send time per sample")
    records: list[RequestRecord] = []
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    label = "inf" if math.isinf(rate) else f"{rate:g}"
    bar = tqdm(total=len(samples), desc=f"rate {label} req/s", unit="req", disable=not progress, leave=False)

    async with make_client(options) as client:
        start = time.perf_counter()
        deadline = start + max_duration_s

        async def issue(index: int, sample: Sample, at: float) -> None:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            async with limit:
                if time.perf_counter() >= deadline:
                    return
                record = RequestRecord(index, sample.prompt_words, sample.output_len, time.perf_counter() - start)
                records.append(record)
                await send_request(client, options, sample.prompt, record)
                bar.update(1)

        tasks = [asyncio.create_task(issue(i, s, t)) for i, (s, t) in enumerate(zip(samples, send_times))]
        try:
            _, pending = await asyncio.wait(tasks, timeout=max_duration_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            for task in tasks:  # an interrupted benchmark leaves nothing running
                task.cancel()
            bar.close()
        duration = time.perf_counter() - start
    for record in records:
        if not record.done:
            record.success, record.error = False, UNFINISHED
    return RoundResult(rate, records, duration, len(samples) - len(records))


async def warm_up(options: RequestOptions, sample: Sample, timeout_s: float) -> RequestRecord:
    """One request sent and awaited before measuring (first-use compilation, caches); raises if it fails."""
    result = await run_round(options, math.inf, [sample], [0.0], timeout_s, progress=False)
    record = result.records[0]
    if not record.success:
        raise RuntimeError(f"the warm-up request to {options.url} failed: {record.error}")
    return record
