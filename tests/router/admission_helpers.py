"""Shared by the admission queue's tests: a coroutine run under a bound, and a placer that never finds room."""

import asyncio


def run(coro):
    """A test whose queue never answers fails after 10 s instead of hanging the run."""
    return asyncio.run(asyncio.wait_for(coro, 10))


async def never():
    """A placer that never finds room."""
    return None
