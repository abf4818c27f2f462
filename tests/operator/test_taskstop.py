"""The operator's background tasks stop even when a cancellation is lost on the way: on Python
< 3.12 ``asyncio.wait_for`` (redis-py's writes) drops one that arrives as the write completes,
and the resync swept on while kopf's cleanup waited for it forever (a CI hang)."""

from __future__ import annotations

import asyncio

import pytest
from sluice_operator.taskstop import stop_tasks


def deaf_once(ticks: list[int]) -> asyncio.Task[None]:
    """A loop whose first cancellation is lost, as one landing in redis-py's write."""

    async def loop() -> None:
        lost = False
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost = True
            ticks.append(1)

    return asyncio.create_task(loop())


async def test_a_task_that_lost_its_cancellation_is_cancelled_again_until_it_stops() -> None:
    ticks: list[int] = []
    task = deaf_once(ticks)
    await asyncio.sleep(0.05)
    async with asyncio.timeout(30):  # a failure, not a hang, if it never stops
        await stop_tasks([task], again_s=0.05)
    assert task.cancelled()
    before = len(ticks)
    await asyncio.sleep(0.05)
    assert len(ticks) == before  # nothing runs on


async def test_errors_are_retrieved_not_raised_and_done_tasks_are_fine() -> None:
    async def fails() -> None:
        raise RuntimeError("logged where it happened")

    failed, finished = asyncio.create_task(fails()), asyncio.create_task(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    await stop_tasks([failed, finished, deaf_once([])], again_s=0.05)
    assert failed.done() and finished.done()


async def test_the_stopping_task_s_own_cancellation_propagates() -> None:
    deaf = [True]

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if not deaf[0]:
                    raise

    task = asyncio.create_task(stubborn())
    stopper = asyncio.create_task(stop_tasks([task], again_s=0.05))
    await asyncio.sleep(0.2)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    deaf[0] = False  # now it may go
    await stop_tasks([task])
    assert task.cancelled()
