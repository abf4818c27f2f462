""":mod:`sluice_core.configstore` (async) from synchronous test code: ``store_call(url,
configstore.read, ns)`` opens a client in an event loop of its own, awaits the call and closes
the client. Async tests open one client instead (``async with configstore.connect(url)``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Concatenate, ParamSpec, TypeVar

from sluice_core import configstore

P = ParamSpec("P")
T = TypeVar("T")


def store_call(url: str, op: Callable[Concatenate[configstore.Client, P], Awaitable[T]],
               *args: P.args, **kwargs: P.kwargs) -> T:
    async def call() -> T:
        async with configstore.connect(url) as client:
            return await op(client, *args, **kwargs)

    return asyncio.run(call())
