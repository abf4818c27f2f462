"""`make bench`: what API keys cost a cluster-mode sidecar, for 0 / 10k / 100k / 1M keys: keys
resolved from Redis grants (issue #13) against keys embedded in the config document (before),
measured in the same run. Written into docs/benchmarks.md between the keys-sidecar markers.

Per key count and mode: the sidecar's start-up (spawn to ``/readyz`` 200) and RSS (after a
warm-up), the propagation of a key change (write returned → the first request that sees it, a
client polling with the key), the worst request latency of a steady stream of another key's
requests during those changes (the stall), and the bytes Redis sends per key change (its
``total_net_output_bytes``, the sidecar idle). The embedded mode at 1M keys is not run (a 100 MB
document; at 100k it already shows the trend). Then the hot-path CPU per request (wrk, known
keys): embedded grants, Redis grants cached (a hit), and Redis grants never cached (every
request a resolve: ``--grant-cache-size 1``, 16 keys in turn); and a flood of random unknown
keys on a single Redis and a 3-master Cluster. About 3 minutes on 2 cores.

Run alone: ``python -m bench.keys_sidecar [--seconds 8] [--out docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import aiohttp  # noqa: E402
from sluice_core import configdoc, configstore, grants, keyschema  # noqa: E402
from sluice_core.model import KeyGrant  # noqa: E402
from sluice_core.sidecar_settings import DEFAULT_GRANT_CACHE_SIZE  # noqa: E402
from support.grant_store import fill_grants, key_policy, raw_key  # noqa: E402
from support.redis_servers import RedisClusterProcs, RedisServer, pick_port  # noqa: E402

from bench.report import write_block  # noqa: E402
from bench.run import cpu_ns, rss_mb, wait_http, wrk  # noqa: E402

BEGIN, END = "<!-- keys-sidecar:begin -->", "<!-- keys-sidecar:end -->"
COUNTS = (0, 10_000, 100_000, 1_000_000)
EMBEDDED_COUNTS = (0, 10_000, 100_000)
KEYS = [f"bench-key-{i:02d}" for i in range(16)]  # the keys requests carry
WATCHED = "bench-watched-key"  # the key that is changed (revoked, granted again)
CHANGES = 10
WRK_SCRIPT = """
local keys = {%s}
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/", {["X-API-Key"] = keys[(n %% #keys) + 1]})
end
"""


@dataclass
class Row:
    mode: str
    keys: int
    start_s: float = 0.0
    rss_mb: float = 0.0
    propagation_ms: list[float] = field(default_factory=list)
    stall_ms: float = 0.0  # worst latency of the other stream during the changes
    quiet_ms: float = 0.0  # its worst latency with no change going on
    bytes_per_change: float = 0.0


class Bench:
    def __init__(self, redis: RedisServer, upstream: str, tmp: Path) -> None:
        self.redis = redis
        self.upstream = upstream
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.labels = tmp / "labels"
        self.labels.write_text('app="web"\n')

    def sidecar(self, ns: str, *extra: str, redis_url: str = "") -> tuple[str, str, subprocess.Popen[bytes], float]:
        """A cluster-mode sidecar of ``ns``: (url, admin url, process, seconds to ready)."""
        port, admin = pick_port(), pick_port()
        started = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "sluice_core.cli", "sidecar", "--upstream", self.upstream,
                              "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                              "--redis", redis_url or self.redis.url, "--namespace", ns, "--pod-labels", str(self.labels),
                              "--poll-interval-s", "60", "--log-level", "warning", "--redis-timeout-ms", "1000",
                              *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.005)
        return f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{admin}", p, time.perf_counter() - started

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        p.kill()
        p.wait()
        self.procs.remove(p)

    def close(self) -> None:
        for p in list(self.procs):
            self.stop(p)

    def sent(self) -> int:
        return int(self.redis.execute("INFO", "stats")["total_net_output_bytes"])


async def publish(url: str, ns: str, doc: str) -> None:
    async with configstore.connect(url) as client:
        await configstore.publish(client, ns, doc)


def embedded_docs(ns: str, n: int) -> tuple[str, str]:
    """The namespace's document with ``n`` + 16 embedded keys, without and with the watched key."""
    policy = key_policy(ns, required=True, pro=10**9)
    table = {os.urandom(32).hex(): KeyGrant("pro") for _ in range(n)}
    table.update({keyschema.hash_api_key(k): KeyGrant("pro") for k in KEYS})
    without = configdoc.build_doc(ns, [policy], {policy.name: table})
    table[keyschema.hash_api_key(WATCHED)] = KeyGrant("pro")
    return without, configdoc.build_doc(ns, [policy], {policy.name: table})


Change = Callable[[bool], Awaitable[None]]  # True: the watched key works after it


async def warm_up(session: aiohttp.ClientSession, url: str, n: int = 2000) -> None:
    for i in range(n):
        async with session.get(url, headers={"X-API-Key": KEYS[i % len(KEYS)]}) as r:
            await r.read()


async def changes(url: str, change: Change, row: Row) -> None:
    """CHANGES key changes, each timed to the first request that sees it, while another
    stream of requests runs; then the same stream alone (its quiet worst case)."""
    stop = asyncio.Event()
    worst = [0.0]

    async def stream(session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            t = time.perf_counter()
            async with session.get(url, headers={"X-API-Key": KEYS[0]}) as r:
                await r.read()
            worst[0] = max(worst[0], time.perf_counter() - t)

    async with aiohttp.ClientSession() as poller, aiohttp.ClientSession() as other:
        task = asyncio.create_task(stream(other))
        await asyncio.sleep(0.5)
        worst[0] = 0.0
        for i in range(CHANGES):
            works = i % 2 == 1
            t = time.perf_counter()
            await change(works)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                async with poller.get(url, headers={"X-API-Key": WATCHED}) as r:
                    await r.read()
                    if (r.status == 200) == works:
                        break
            row.propagation_ms.append((time.perf_counter() - t) * 1000)
            await asyncio.sleep(0.2)
        row.stall_ms = worst[0] * 1000
        worst[0] = 0.0
        await asyncio.sleep(2.0)
        row.quiet_ms = worst[0] * 1000
        stop.set()
        await task


def bytes_per_change(b: Bench, change: Change, settle: Callable[[], None]) -> float:
    """Redis's output bytes per key change (averaged over a few changes): with the sidecar idle,
    its notice and what the sidecar reads then; without a sidecar, the writer's own (subtracted)."""
    total = 0
    for i in range(4):
        before = b.sent()
        asyncio.run(change(i % 2 == 1))
        settle()
        total += b.sent() - before
    return total / 4


def measure_grants(b: Bench, n: int) -> Row:
    ns = f"bench-g{n}"
    policy = key_policy(ns, required=True, pro=10**9)
    url = b.redis.url
    asyncio.run(publish(url, ns, configdoc.build_doc(ns, [policy])))
    if n:
        fill_grants(url, policy.ref, n, "pro")

    async def put(key: str, works: bool) -> None:
        async with configstore.connect(url) as client:
            if works:
                await configstore.put_grant(client, policy.ref, raw_key(key),
                                            grants.StoredGrant(KeyGrant("pro"), "bench"))
            else:
                await configstore.revoke_grant(client, policy.ref, raw_key(key))

    for key in KEYS:
        asyncio.run(put(key, True))
    row = Row("Redis grants (after)", n)

    async def change(works: bool) -> None:
        await put(WATCHED, works)

    writer = bytes_per_change(b, change, lambda: None)  # no sidecar yet
    sidecar_url, _, p, row.start_s = b.sidecar(ns)

    async def run() -> None:
        async with aiohttp.ClientSession() as s:
            await warm_up(s, sidecar_url)
        row.rss_mb = rss_mb(p.pid)
        await changes(sidecar_url, change, row)

    asyncio.run(run())
    row.bytes_per_change = bytes_per_change(b, change, lambda: None) - writer
    b.stop(p)
    return row


def measure_embedded(b: Bench, n: int) -> Row:
    ns = f"bench-e{n}"
    url = b.redis.url
    without, with_key = embedded_docs(ns, n)
    asyncio.run(publish(url, ns, without))
    row = Row("embedded in the document (before)", n)

    async def change(works: bool) -> None:
        await publish(url, ns, with_key if works else without)

    writer = bytes_per_change(b, change, lambda: None)  # no sidecar yet
    sidecar_url, admin, p, row.start_s = b.sidecar(ns)

    async def run() -> None:
        async with aiohttp.ClientSession() as s:
            await warm_up(s, sidecar_url)
        await changes(sidecar_url, change, row)
        row.rss_mb = rss_mb(p.pid)  # after the changes: the "after one key change"

    asyncio.run(run())

    def settle() -> None:  # the sidecar has read the new document
        want = int(b.redis.execute("HGET", keyschema.config_key(ns), "version"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with urllib.request.urlopen(admin + "/admin/config", timeout=5) as r:
                if int(json.loads(r.read())["config"]["version"]) >= want:
                    return
            time.sleep(0.01)

    row.bytes_per_change = bytes_per_change(b, change, settle) - writer
    b.stop(p)
    return row


def hot_path(b: Bench, seconds: int) -> list[tuple[str, float, float, float]]:
    """(case, sidecar CPU µs/request, Redis CPU µs/request, req/s) per case, known keys only:
    the cases run in turn, twice, and each keeps its better run (the machine is shared)."""
    script = b.tmp / "keys.lua"
    script.write_text(WRK_SCRIPT % ", ".join(f'"{k}"' for k in KEYS))
    e_ns, g_ns = "bench-e0", "bench-g0"  # published above: 16 known keys each, no others
    cases = [("embedded grants (before)", e_ns, ()), ("Redis grants, cached (after)", g_ns, ()),
             ("Redis grants, never cached (every request resolves)", g_ns, ("--grant-cache-size", "1"))]
    best: dict[str, tuple[str, float, float, float]] = {}
    for name, ns, extra in cases * 2:
        url, _, p, _ = b.sidecar(ns, *extra)
        wrk(url, 2, 50, script)  # warm-up
        cpu, rcpu = cpu_ns(p.pid), cpu_ns(b.redis.proc.pid) if b.redis.proc else 0
        r = wrk(url, seconds, 50, script)
        assert r.non2xx == 0, f"{name}: {r.non2xx} refused"
        got = (name, (cpu_ns(p.pid) - cpu) / 1000 / r.requests,
               ((cpu_ns(b.redis.proc.pid) if b.redis.proc else 0) - rcpu) / 1000 / r.requests, r.rps)
        if name not in best or got[1] < best[name][1]:
            best[name] = got
        b.stop(p)
    return [best[name] for name, _, _ in cases]


RANDOM_KEYS = """
init = function() math.randomseed(os.time()) end
request = function()
  local key = string.format("%08x%08x", math.random(0, 0x7fffffff), math.random(0, 0x7fffffff))
  return wrk.format("GET", "/", {["X-API-Key"] = key})
end
"""


def flood_seconds(seconds: int) -> int:
    return max(3, seconds // 2)


def unknown_flood(b: Bench, seconds: int) -> list[tuple[str, float, float, float]]:
    """A flood of random keys (each one new): (case, sidecar CPU µs/request, p50 ms, req/s)."""
    script = b.tmp / "random.lua"
    script.write_text(RANDOM_KEYS)
    cluster = RedisClusterProcs(3)
    out = []
    try:
        cases = []
        for required in (True, False):
            for where, url in (("single Redis", b.redis.url), ("Redis Cluster", cluster.url)):
                ns = f"bench-u-{required}-{where[-7:].strip()}".lower().replace(" ", "")
                policy = key_policy(ns, required=required, free=10**9)
                asyncio.run(publish(url, ns, configdoc.build_doc(ns, [policy])))
                calls = "1 call" if required or where == "single Redis" else "2 calls"
                cases.append((f"Redis grants, required: {str(required).lower()}, {where} ({calls})", ns, url))
        ns = "bench-u-embedded"
        policy = key_policy(ns, required=False, free=10**9)
        asyncio.run(publish(b.redis.url, ns, configdoc.build_doc(ns, [policy], {policy.name: {}})))
        cases.append(("embedded grants (before), required: false, single Redis (1 call)", ns, b.redis.url))
        for name, ns, url in cases:
            sidecar_url, _, p, _ = b.sidecar(ns, redis_url=url)
            wrk(sidecar_url, 1, 50, script)  # warm-up
            cpu = cpu_ns(p.pid)
            r = wrk(sidecar_url, seconds, 50, script)
            out.append((name, (cpu_ns(p.pid) - cpu) / 1000 / r.requests, r.p50, r.rps))
            b.stop(p)
    finally:
        cluster.close()
    return out


def grant_cache_bytes(n: int = 100_000) -> tuple[float, float]:
    """Bytes of sidecar memory per cached key, known (a tier grant) and unknown (tracemalloc;
    the client id is counted: the cache keeps it)."""
    import tracemalloc

    from sluice_sidecar.grantcache import GrantCache

    out = []
    for bucket in (object(), None):
        cache: GrantCache[object] = GrantCache(n)
        clients = [keyschema.client_for_api_key(os.urandom(32)) for _ in range(n)]
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for c in clients:
            cache.put(c, bucket, 1_900_000_000_000, cache.ticket(c))
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        out.append((used + sum(sys.getsizeof(c) for c in clients)) / n)
    return out[0], out[1]


def table(rows: list[Row], hot: list[tuple[str, float, float, float]], flood: list[tuple[str, float, float, float]],
          per_entry: tuple[float, float], seconds: int, took: float) -> str:
    lines = [BEGIN, "", "### API keys in a cluster-mode sidecar (issue #13)", "",
             f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores, Python "
             f"{platform.python_version()}, one redis-server, one sidecar at a time; {CHANGES} key changes "
             f"per row; bytes per change net of the writer's own. Command: `python -m bench.keys_sidecar` "
             f"(part of `make bench`; this run took {took:.0f} s).", "",
             "| keys | where the keys are | start-up s | RSS MB | change propagation ms (median / max) "
             "| worst request during changes ms (quiet: ms) | Redis bytes per key change |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.keys:,} | {r.mode} | {r.start_s:.2f} | {r.rss_mb:.0f} | "
                     f"{statistics.median(r.propagation_ms):.1f} / {max(r.propagation_ms):.1f} | "
                     f"{r.stall_ms:.1f} ({r.quiet_ms:.1f}) | {r.bytes_per_change:,.0f} |")
    lines.append("| 1,000,000 | embedded in the document (before) | not run: a 100 MB document "
                 "per change and per sidecar | | | | |")
    base = hot[0][1]
    lines += ["", f"Hot path, known keys (wrk -t1 -c50 -d{seconds}s, 16 keys in turn, nothing refused; "
              "each case run twice, the better run kept):", "",
              "| case | sidecar CPU µs/request | ratio | Redis CPU µs/request | req/s |", "|---|---:|---:|---:|---:|"]
    for name, cpu, rcpu, rps in hot:
        lines.append(f"| {name} | {cpu:.0f} | {cpu / base:.2f}× | {rcpu:.1f} | {rps:.0f} |")
    lines += ["", f"A flood of random API keys, each one new (wrk -t1 -c50 -d{flood_seconds(seconds)}s; nothing is "
              "written to Redis for them; with `required: false` each request falls back to the anonymous "
              "client, whose bucket a Cluster keeps in another slot than the key's grant: a second call):", "",
              "| case | sidecar CPU µs/request | p50 ms | req/s |", "|---|---:|---:|---:|"]
    for name, cpu, p50, rps in flood:
        lines.append(f"| {name} | {cpu:.0f} | {p50:.2f} | {rps:.0f} |")
    known, unknown = per_entry
    size = DEFAULT_GRANT_CACHE_SIZE
    lines += ["", f"Grant cache (tracemalloc, 100,000 entries, client ids included): about **{known:.0f} bytes "
              f"per known key** and {unknown:.0f} per unknown one, so the default `--grant-cache-size` of "
              f"{size:,} holds at most ~{(known + unknown) * size / 2**20:.0f} MiB per policy.", "", END]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    if not shutil.which("wrk"):
        print("error: wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 1
    began = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-keys-"))
    redis = RedisServer()
    up_port = pick_port()
    up = subprocess.Popen([sys.executable, str(ROOT / "bench" / "upstream_app.py"), str(up_port)])
    b = Bench(redis, f"http://127.0.0.1:{up_port}", tmp)
    rows: list[Row] = []
    try:
        wait_http(b.upstream + "/")
        for n in COUNTS:
            print(f"Redis grants, {n:,} keys ...", flush=True)
            rows.append(measure_grants(b, n))
            if n in EMBEDDED_COUNTS:
                print(f"embedded grants, {n:,} keys ...", flush=True)
                rows.append(measure_embedded(b, n))
        print("hot path ...", flush=True)
        hot = hot_path(b, args.seconds)
        print("a flood of random keys ...", flush=True)
        flood = unknown_flood(b, flood_seconds(args.seconds))
        per_entry = grant_cache_bytes()
    finally:
        b.close()
        up.kill()
        up.wait()
        redis.close()
        shutil.rmtree(tmp, ignore_errors=True)
    block = table(rows, hot, flood, per_entry, args.seconds, time.monotonic() - began)
    print(block)
    write_block(Path(args.out), BEGIN, END, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
