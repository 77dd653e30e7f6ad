"""The router's bounded wait for KV room."""

import asyncio

import pytest

from kvferry.router.admission import AdmissionConfig, AdmissionQueue, NoCapacityError

from admission_helpers import never, run


def test_places_at_once_when_there_is_room():
    async def main():
        q = AdmissionQueue(AdmissionConfig(max_waiting=1, timeout_s=1))

        async def place():
            return "w1"

        assert await q.admit(place, lambda: "") == "w1"
        assert q.num_waiting == 0

    run(main())


def test_waits_for_room_then_places_in_arrival_order():
    async def main():
        q = AdmissionQueue(AdmissionConfig(max_waiting=4, timeout_s=5, poll_s=1))
        room = [0]
        order = []

        def placer(name):
            async def place():
                if room[0] > 0:
                    room[0] -= 1
                    order.append(name)
                    return name
                return None
            return place

        first = asyncio.create_task(q.admit(placer("a"), lambda: ""))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(q.admit(placer("b"), lambda: ""))
        await asyncio.sleep(0.01)
        assert q.num_waiting == 2
        room[0] = 2
        q.notify()
        assert await first == "a" and await second == "b"
        assert order == ["a", "b"] and q.num_waiting == 0

    run(main())


def test_times_out_with_a_clear_error():
    async def main():
        q = AdmissionQueue(AdmissionConfig(max_waiting=4, timeout_s=0.2, poll_s=0.05))
        with pytest.raises(NoCapacityError, match=r"no decode worker had room within 0.2 s; 2 blocks needed"):
            await q.admit(never, lambda: "2 blocks needed")
        assert q.num_waiting == 0

    run(main())


def test_full_queue_fails_at_once():
    async def main():
        q = AdmissionQueue(AdmissionConfig(max_waiting=1, timeout_s=5, poll_s=0.05))
        waiting = asyncio.create_task(q.admit(never, lambda: ""))
        await asyncio.sleep(0.01)
        with pytest.raises(NoCapacityError, match="queue is full"):
            await q.admit(never, lambda: "")
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert q.num_waiting == 0

    run(main())
