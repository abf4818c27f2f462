"""A key revoked in Redis under load: two real sidecar processes of one namespace, each serving a
steady stream of requests for the key being revoked and for other keys; the revoked key is
refused by both (its change notice), and every other request keeps being served meanwhile.
Single Redis and a 3-master Cluster. How fast (propagation, stalls) is measured by
bench/keys_sidecar.py, not asserted here."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
from support.grant_store import key_policy, publish_policies, put_key, revoke_key
from support.key_sidecar import start
from support.polling import wait_for
from support.processes import UpstreamProcess
from support.redis_servers import RedisClusterProcs, RedisServer

RUN_LIMIT = 20.0  # the load stops by itself after this long, whatever happens
# The revoked key must be refused by every sidecar within this long of the revoke: a bound on a
# failure, not a speed (a notice takes milliseconds, bench/keys_sidecar.py measures it), yet well
# under RUN_LIMIT and under the 5 s of the old polling, so that only the notice (or the 1 s
# --grant-cache-max-age-s) can make it.
REVOKE_DEADLINE = 3.0


async def _stream(session: aiohttp.ClientSession, url: str, key: str, stop: asyncio.Event,
                  statuses: list[int]) -> None:
    """Requests for ``key``, one after another, until ``stop`` (or the run limit)."""
    deadline = time.monotonic() + RUN_LIMIT
    while not stop.is_set() and time.monotonic() < deadline:
        async with session.get(url + "/api", headers={"X-API-Key": key}) as r:
            await r.read()
            statuses.append(r.status)


async def until(condition: Callable[[], bool], what: str, timeout: float = RUN_LIMIT) -> None:
    async def probe() -> bool:
        return condition()

    await wait_for(probe, timeout=timeout, interval=0.01, what=what)


async def _load_and_revoke(urls: list[str], revoked: str, others: list[str], revoke: object) -> tuple[
        dict[str, list[int]], list[int]]:
    stop = asyncio.Event()
    seen = {url: [] for url in urls}  # the revoked key's statuses, per sidecar
    other: list[int] = []
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(_stream(session, url, revoked, stop, seen[url])) for url in urls]
        tasks += [asyncio.create_task(_stream(session, url, key, stop, other)) for url in urls for key in others]
        # Both sidecars serve the key (cached) before it is revoked.
        await until(lambda: all(200 in s for s in seen.values()), "the key served by both")
        marks = {url: len(s) for url, s in seen.items()}
        revoked_at = time.monotonic()
        await asyncio.to_thread(revoke)  # type: ignore[arg-type]
        try:
            left = REVOKE_DEADLINE - (time.monotonic() - revoked_at)
            await until(lambda: all(401 in s[marks[url]:] for url, s in seen.items()), "refused by both",
                        timeout=max(left, 0.01))
            # Keep the load a little longer: refused from then on, everywhere.
            ends = {url: len(s) for url, s in seen.items()}
            await until(lambda: all(len(s) >= ends[url] + 20 for url, s in seen.items()), "more requests")
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    return {url: s[marks[url]:] for url, s in seen.items()}, other


def test_revoked_under_load_is_refused_everywhere_and_others_keep_flowing(
        server: RedisServer | RedisClusterProcs, upstream_process: UpstreamProcess, labels: Path) -> None:
    ns = "kl-" + uuid.uuid4().hex[:8]
    policy = key_policy(ns, required=True, pro=1_000_000)
    publish_policies(server.url, ns, policy)
    revoked = "revoked-" + uuid.uuid4().hex
    others = [f"other-{i}-{uuid.uuid4().hex}" for i in range(3)]
    for key in [revoked, *others]:
        put_key(server.url, policy.ref, key, "pro")
    sidecars = [start(upstream_process, server.url, ns, labels) for _ in range(2)]
    try:
        after, other = asyncio.run(_load_and_revoke(
            [s.url for s in sidecars], revoked, others, lambda: revoke_key(server.url, policy.ref, revoked)))
    finally:
        for s in sidecars:
            s.close()
    for statuses in after.values():
        # Served until the notice, refused from the first refusal on: never served again.
        first = statuses.index(401)
        assert set(statuses[:first]) <= {200} and set(statuses[first:]) == {401}, statuses
    assert other and set(other) == {200}
