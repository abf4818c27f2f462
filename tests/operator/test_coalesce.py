"""A burst of reconcile requests for one namespace (every key Secret listed at start-up) costs two
runs, and each request is answered by a run that started after it was made."""

from __future__ import annotations

import asyncio

import pytest
from sluice_operator.coalesce import Coalescer


async def test_a_burst_costs_two_runs_and_none_misses_a_change() -> None:
    coalescer: Coalescer[int] = Coalescer()
    state = {"data": 0, "runs": 0}
    release = asyncio.Event()

    async def work() -> int:
        state["runs"] += 1
        seen = state["data"]  # what the run reads when it starts
        await release.wait()
        return seen

    async def request() -> tuple[int, int]:
        state["data"] += 1  # a change, then a request to publish it
        return state["data"], await coalescer.run("ns", work)

    first = asyncio.create_task(request())
    await asyncio.sleep(0)  # the first run starts and waits for `release`
    burst = [asyncio.create_task(request()) for _ in range(50)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(first, *burst)
    assert state["runs"] == 2
    assert all(seen >= changed for changed, seen in results), results


async def test_an_error_reaches_every_request_of_the_run_and_the_next_run_is_fresh() -> None:
    coalescer: Coalescer[int] = Coalescer()
    gate = asyncio.Event()
    calls = 0

    async def failing() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        if calls == 2:
            raise RuntimeError("Redis away")
        return calls

    running = asyncio.create_task(coalescer.run("ns", failing))
    await asyncio.sleep(0)
    sharers = [asyncio.create_task(coalescer.run("ns", failing)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    assert await running == 1
    for task in sharers:
        with pytest.raises(RuntimeError, match="Redis away"):
            await task
    assert await coalescer.run("ns", failing) == 3
    assert await coalescer.run("other", failing) == 4
