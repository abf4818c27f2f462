"""The tests' operator thread (tests/support/operator_thread.py) never outlives its test: one
that does not stop at its stop flag fails that test, and is ended, or else cut off from logging,
so that it cannot fail a later test (a CI run where its retry warnings broke a sidecar test's
log assertion)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
import pytest
from support.operator_thread import OperatorThread
from support.polling import poll

log = logging.getLogger("sluice.test.deaf")


def operator_with_a_deaf_task(kmock: Any, lost: list[int]) -> tuple[OperatorThread, list[int]]:
    """An operator whose cleanup cancels a task once and awaits it (as the resync's stop did),
    the task losing its next ``lost[0]`` cancellations (-1: every one) and logging each tick."""
    registry, ticks, url = kopf.OperatorRegistry(), [], str(kmock.url).rstrip("/")

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url)

    async def deaf() -> None:
        while True:
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                if lost[0] == 0:
                    raise
                lost[0] = max(lost[0] - 1, -1)
            ticks.append(1)
            log.warning("still here")

    @kopf.on.startup(registry=registry)
    async def start(memo: kopf.Memo, **_: Any) -> None:
        memo["deaf"] = asyncio.create_task(deaf())

    @kopf.on.cleanup(registry=registry)
    async def stop(memo: kopf.Memo, **_: Any) -> None:
        memo["deaf"].cancel()
        await memo["deaf"]

    operator = OperatorThread(registry=registry, clusterwide=True, standalone=True)
    poll(operator.started, "operator ready")
    return operator, ticks


def test_an_operator_that_does_not_stop_fails_its_test_and_is_ended(kmock: Any) -> None:
    operator, _ = operator_with_a_deaf_task(kmock, [1])
    with pytest.raises(AssertionError, match=r"did not stop within 1 s.*ended by cancelling its tasks again"):
        operator.stop(timeout=1.0, end_s=10.0)
    assert not operator.thread.is_alive()


def test_one_that_cannot_be_ended_logs_nothing_more(kmock: Any, caplog: pytest.LogCaptureFixture) -> None:
    lost = [-1]
    operator, ticks = operator_with_a_deaf_task(kmock, lost)
    with pytest.raises(AssertionError, match="still running: its log records are dropped"):
        operator.stop(timeout=0.5, end_s=0.5)
    caplog.clear()
    seen = len(ticks)
    poll(lambda: len(ticks) > seen + 5, "the deaf task going on")
    assert not [r for r in caplog.records if r.name == log.name]
    log.warning("from the test's thread")  # other threads still log
    assert [r.getMessage() for r in caplog.records if r.name == log.name] == ["from the test's thread"]
    lost[0] = 0  # let it go now, not to spin for the rest of the session
    assert operator.end(10.0)
