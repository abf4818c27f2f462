"""Usage analytics exact end to end (#10 §5): two real cluster-mode sidecar processes on one
real Redis, the policy's API keys as Redis grants with known ids, several hundred concurrent
clients each sending a fixed number of requests split across both sidecars (a third of them
past their tier's limit), one sidecar flushing every half second and one only when stopped with
SIGTERM (its partial window, the whole run), and
the real ``sluice analytics`` process on SQLite and on PostgreSQL: once it has applied every
window of the stream, the per-client, per-outcome counts its ``/v1`` API serves are exactly
what each client saw (its 200s allowed, its 429s limited, nothing else), and they add up to
what it sent."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from sluice_core import configstore, grants, keyschema
from sluice_core.model import KeyGrant
from support.analytics_api import TOKEN
from support.analytics_process import CollectorProcess
from support.grant_store import key_policy, publish_policies, raw_key
from support.key_sidecar import start
from support.polling import poll
from support.processes import SidecarProcess, UpstreamProcess
from support.redis_servers import RedisServer
from support.usage_windows import StoredView

pytestmark = pytest.mark.slow

CLIENTS = 300
PER_CLIENT = 8  # split across the two sidecars, alternately
FREE = 3  # the free tier's requests an hour: every third client (free) is limited after 3
UNCAPPED = ("--max-connections-per-client", "4096", "--max-connections", "4096",
            "--max-inflight-requests", "4096", "--max-key-resolves", "4096",
            # A Redis call slowed past this by the machine's load is a failed_open 200, not a
            # miscount; the failure modes' counting is tests/sidecar/test_usage_stream.py's.
            "--redis-timeout-ms", "10000")
TRAFFIC_DEADLINE = 120.0  # bounds the load only: on a quiet machine it takes a few seconds


def _key(i: int) -> str:
    return f"sk-e2e-{i:04d}-" + uuid.uuid4().hex


async def _grant(url: str, ref: str, keys: list[str]) -> None:
    async with configstore.connect(url) as client:
        for i, k in enumerate(keys):
            tier = "free" if i % 3 == 0 else "pro"
            await configstore.put_grant(client, ref, raw_key(k), grants.StoredGrant(KeyGrant(tier), f"c{i}", 0))


async def _traffic(urls: list[str], keys: list[str]) -> list[Counter[int]]:
    """Each client's status codes; every client runs at once, its requests one after another."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async def client(i: int) -> Counter[int]:
            seen: Counter[int] = Counter()
            for n in range(PER_CLIENT):
                async with http.get(urls[(i + n) % 2] + "/api", headers={"X-API-Key": keys[i]}) as r:
                    await r.read()
                    seen[r.status] += 1
            return seen

        return await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(CLIENTS))), TRAFFIC_DEADLINE)


def _api(port: int, path: str, **query: str) -> dict[str, object]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(query)}",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        result: dict[str, object] = json.loads(r.read())
    return result


def _windows_added(server: RedisServer) -> int:
    """Entries ever added to the usage stream (``XINFO STREAM``'s ``entries-added``, Redis 7):
    not ``XLEN``, which the collector's trim of acknowledged entries lowers."""
    info = server.execute("XINFO", "STREAM", keyschema.USAGE_STREAM_KEY)
    fields = dict(zip(info[::2], info[1::2], strict=True)) if isinstance(info, list) else info
    return int(fields.get(b"entries-added", fields.get("entries-added")))


def test_stored_counts_are_exactly_what_the_clients_saw(fresh_redis: RedisServer, database_url: str,
                                                          token_file: str, tmp_path: Path) -> None:
    ns = "e2e-" + uuid.uuid4().hex[:8]
    policy = key_policy(ns, free=FREE, pro=1000)
    ref = f"{ns}/api"
    keys = [_key(i) for i in range(CLIENTS)]
    publish_policies(fresh_redis.url, ns, policy)
    asyncio.run(_grant(fresh_redis.url, ref, keys))
    labels = tmp_path / "labels"
    labels.write_text('app="web"\n')
    t0 = int(time.time())
    up = UpstreamProcess()
    collector = CollectorProcess(fresh_redis.url, database_url, extra=("--api-token-file", token_file))
    sidecars: list[SidecarProcess] = []
    try:
        # One sidecar with a short window (the collector applies windows while the load runs),
        # one with an hour's (only its SIGTERM flush of the partial window carries its counts).
        # The load-shedding caps raised: every client is one address here, and what is tested is
        # the counting of decisions, not the shedding (tests/sidecar/test_connection_limits.py).
        sidecars = [start(up, fresh_redis.url, ns, labels, "--usage-window-s", w, *UNCAPPED)
                    for w in ("0.5", "3600")]
        seen = asyncio.run(_traffic([s.url for s in sidecars], keys))
        for s in sidecars:
            assert s.terminate() == 0  # SIGTERM: the partial window goes out before exit
        written = _windows_added(fresh_redis)
        view = StoredView(database_url)
        poll(lambda: view.applied() == written, f"the collector applied all {written} windows",
             timeout=60, diagnose=collector.log_tail)
        assert collector.metric("sluice_analytics_bad_entries_total") == 0
        span = {"namespace": ns, "start": str(t0 - 120), "end": str(int(time.time()) + 120)}
        for i in range(CLIENTS):
            sent = seen[i]
            assert set(sent) <= {200, 429} and sum(sent.values()) == PER_CLIENT, (i, sent)
            got = _api(collector.port, f"/v1/clients/key:c{i}", **span)
            want = {"allowed": sent[200], "limited": sent[429]}
            assert got["outcomes"] == {k: v for k, v in want.items() if v}, (i, got, sent)
            assert got["requests"] == PER_CLIENT
        limited = sum(s[429] for s in seen)
        assert limited == (CLIENTS + 2) // 3 * (PER_CLIENT - FREE)  # the free third, past 3 each
        by_outcome: Counter[str] = Counter()
        for (_, _, outcome), n in view.totals().items():  # the store itself, every client at once
            by_outcome[outcome] += n
        assert by_outcome == {"allowed": CLIENTS * PER_CLIENT - limited, "limited": limited}
    finally:
        for s in sidecars:
            s.close()
        collector.stop()
        up.close()
