"""The suite's caplog (tests/conftest.py) leaves out asyncio's reports of sessions an earlier test
dropped unclosed: the garbage collector makes them whenever it runs, in whichever test."""

from __future__ import annotations

import gc
import logging

import aiohttp
import pytest


async def test_an_earlier_test_drops_a_session_unclosed() -> None:
    cycle: list[object] = [aiohttp.ClientSession()]
    cycle.append(cycle)  # only the garbage collector finds it, in a later test


async def test_a_later_test_captures_only_its_own_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    gc.collect()
    logging.getLogger("sluice.x").warning("mine")
    assert [r.getMessage() for r in caplog.records] == ["mine"], [r.getMessage() for r in caplog.records]
