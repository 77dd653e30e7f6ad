"""The router's queue and TTFT deadlines: a waiter is refused once its deadline passes (not before),
with a retry-after from the queue's drain rate; one that gets room in time is placed; no deadline, no
refusal."""

import asyncio
import time

import pytest

from kvferry.router.admission import AdmissionConfig, AdmissionQueue, TTFTExpired

from admission_helpers import never, run


def test_a_waiter_is_refused_when_its_deadline_passes_and_not_before():
    async def main():
        q = AdmissionQueue(AdmissionConfig(max_waiting=4, timeout_s=5, poll_s=0.05))
        start = time.monotonic()
        with pytest.raises(TTFTExpired, match="time-to-first-token target passed") as info:
            await q.admit(never, lambda: "no room", ttft_deadline=start + 0.3)
        waited = time.monotonic() - start
        assert 0.3 <= waited < 1.0
        assert info.value.retry_after_s == 5  # nothing placed lately: the queue timeout
        assert q.rejections["router_queue"] == 1 and q.num_waiting == 0

    run(main())


def test_a_waiter_that_gets_room_in_time_is_placed_and_drain_rate_sets_retry_after():
    async def main():
        q = AdmissionQueue(AdmissionConfig(max_waiting=8, timeout_s=5, poll_s=0.02))
        room = [0]

        async def place():
            if room[0] > 0:
                room[0] -= 1
                return "w"
            return None

        async def give_room(n, every_s):
            for _ in range(n):
                await asyncio.sleep(every_s)
                room[0] += 1
                q.notify()

        feeder = asyncio.create_task(give_room(4, 0.1))
        now = time.monotonic()
        placed = await asyncio.gather(*(q.admit(place, lambda: "", ttft_deadline=now + 2) for _ in range(4)))
        assert placed == ["w"] * 4 and not q.rejections
        await feeder
        # ~10 placements a second lately: 3 waiters ahead drain in ~0.3 s.
        assert q.drain_seconds(3) == pytest.approx(0.3, rel=0.5)

        with pytest.raises(TTFTExpired) as info:
            await q.admit(never, lambda: "", ttft_deadline=time.monotonic() + 0.05)
        assert info.value.retry_after_s < 1

    run(main())


def test_without_a_deadline_a_waiter_keeps_waiting():
    async def main():
        q = AdmissionQueue(AdmissionConfig(max_waiting=4, timeout_s=5, poll_s=0.02))
        calls = [0]

        async def later():
            calls[0] += 1
            return "w" if calls[0] > 20 else None

        assert await q.admit(later, lambda: "") == "w"
        assert not q.rejections

    run(main())
