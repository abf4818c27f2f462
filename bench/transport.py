"""`make bench`, transport part: the client CPU time per call of the sidecar's own RESP client and
HTTP pool (:mod:`sluice_sidecar.transport`) against the maintained libraries they stand in for,
written into docs/benchmarks.md between the transport markers.

Re-run when those libraries improve: the hand-written clients are kept only while they cost
clearly less. Redis: one EVALSHA of the decision script per call (one bucket, as a request's
decision), against a local redis-server. HTTP: one GET of 11 bytes per call, against the
benchmark upstream (bench/upstream_app.py). Each client runs 50 concurrent callers (the
sidecar's situation) on uvloop in this process; CPU is this process's (all threads: a client
with a native core counts its threads too), divided by the calls. The servers run elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.redis_servers import RedisServer, pick_port  # noqa: E402

from bench.report import scaled_args, write_block  # noqa: E402

BEGIN, END = "<!-- bench-transport:begin -->", "<!-- bench-transport:end -->"
CALLERS = 50
REDIS_CALLS = 20_000
HTTP_CALLS = 8_000
KEY = "sl:{bench-transport:k1}:t:pro:x7Q"
ARGV = (1, 1, 1, 60_000, 60_000_000)  # one decision, one bucket, cost 1, EM, CAP

Call = Callable[[], Awaitable[Any]]


async def cpu_per_call(call: Call, calls: int, callers: int) -> float:
    """µs of this process's CPU per ``call()``, ``callers`` at a time, after a warm-up."""

    async def run(n: int) -> None:
        async def one(k: int) -> None:
            for _ in range(k):
                await call()
        await asyncio.gather(*(one(n // callers) for _ in range(callers)))

    await run(calls // 5)  # connections, pools, caches
    before = time.process_time()
    await run(calls)
    return (time.process_time() - before) * 1e6 / calls


async def both(call: Call, calls: int) -> tuple[float, float]:
    """CPU per call with CALLERS concurrent callers (the sidecar's case), then with one."""
    return await cpu_per_call(call, calls, CALLERS), await cpu_per_call(call, calls // 5, 1)


# Redis clients: each yields one EVALSHA of the decision script --------------------------------
@contextlib.asynccontextmanager
async def sluice_resp(server: RedisServer, sha: str) -> AsyncIterator[Call]:
    from sluice_sidecar.transport.resp import encode, open_connection

    conn = await open_connection(server.host, server.port, timeout=5, connect_timeout=5)
    try:  # encoded per call, as the others do (the store encodes once per batch)
        yield lambda: conn.send(encode("EVALSHA", sha, 1, KEY, *ARGV))
    finally:
        conn.close()


@contextlib.asynccontextmanager
async def redis_py(server: RedisServer, sha: str) -> AsyncIterator[Call]:
    import redis.asyncio

    client = redis.asyncio.Redis(host=server.host, port=server.port, max_connections=CALLERS)
    try:
        yield lambda: client.evalsha(sha, 1, KEY, *ARGV)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def coredis_client(server: RedisServer, sha: str) -> AsyncIterator[Call]:
    import coredis

    async with coredis.Redis(host=server.host, port=server.port, max_connections=CALLERS) as client:
        yield lambda: client.evalsha(sha, [KEY], list(ARGV))


@contextlib.asynccontextmanager
async def glide_client(server: RedisServer, sha: str) -> AsyncIterator[Call]:
    from glide import GlideClient, GlideClientConfiguration, NodeAddress

    client = await GlideClient.create(GlideClientConfiguration([NodeAddress(server.host, server.port)]))
    command: list[str | bytes] = ["EVALSHA", sha, "1", KEY, *map(str, ARGV)]
    try:
        yield lambda: client.custom_command(command)
    finally:
        await client.close()


REDIS_CLIENTS = {
    "Sluice RESP client (transport/resp.py)": (sluice_resp, "sluice_sidecar"),
    "redis-py asyncio": (redis_py, "redis"),
    "coredis": (coredis_client, "coredis"),
    "valkey-glide": (glide_client, "glide"),
}


# HTTP clients: each yields one GET with its whole body read --------------------------------------
@contextlib.asynccontextmanager
async def sluice_pool(port: int) -> AsyncIterator[Call]:
    from sluice_core.settingsform import default_of
    from sluice_core.sidecar_settings import SidecarSettings
    from sluice_sidecar.transport.httppool import UpstreamPool

    # The sidecar's own pool size (its --upstream-max-connections default).
    max_connections = default_of(SidecarSettings, "upstream_max_connections")
    pool = UpstreamPool("127.0.0.1", port, connect_timeout=5, read_timeout=5, max_connections=max_connections)
    head = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()

    async def get() -> bytes:
        resp = await pool.request("GET", head, None, False)
        if resp.complete:
            return resp.body_now()
        return b"".join([chunk async for chunk in resp.iter_body(5)])

    try:
        yield get
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def aiohttp_session(port: int) -> AsyncIterator[Call]:
    import aiohttp

    url = f"http://127.0.0.1:{port}/"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CALLERS)) as session:
        async def get() -> bytes:
            async with session.get(url) as resp:
                return await resp.read()
        yield get


HTTP_CLIENTS = {
    "Sluice HTTP pool (transport/httppool.py)": sluice_pool,
    "aiohttp ClientSession": aiohttp_session,
}


async def measure_redis(redis: RedisServer, scale: int = 1) -> dict[str, tuple[float, float] | str]:
    from sluice_core import scripts

    sha = redis.execute("SCRIPT", "LOAD", scripts.decide().source)
    sha = sha.decode() if isinstance(sha, bytes) else sha
    out: dict[str, tuple[float, float] | str] = {}
    for name, (client, module) in REDIS_CLIENTS.items():
        try:
            __import__(module)
        except ImportError:
            out[name] = "not installed (pip install -e '.[bench]')"
            continue
        async with client(redis, sha) as call:
            out[name] = await both(call, REDIS_CALLS // scale)
    return out


async def measure_http(port: int, scale: int = 1) -> dict[str, tuple[float, float] | str]:
    out: dict[str, tuple[float, float] | str] = {}
    for name, client in HTTP_CLIENTS.items():
        async with client(port) as call:
            out[name] = await both(call, HTTP_CALLS // scale)
    return out


def table(title: str, figures: dict[str, tuple[float, float] | str]) -> list[str]:
    ours = next(iter(figures.values()))
    assert not isinstance(ours, str)
    lines = [f"| {title} | client CPU µs/call, {CALLERS} callers | ratio to ours "
             "| µs/call, 1 caller | ratio to ours |", "|---|---:|---:|---:|---:|"]
    for name, v in figures.items():
        if isinstance(v, str):
            lines.append(f"| {name} | {v} | – | – | – |")
        else:
            lines.append(f"| {name} | {v[0]:.1f} | {v[0] / ours[0]:.1f}× | {v[1]:.1f} | {v[1] / ours[1]:.1f}× |")
    return lines


def main() -> int:
    args = scaled_args(__doc__, ROOT / "docs" / "benchmarks.md", "the number of calls", 100)
    started = time.monotonic()
    redis = RedisServer()
    port = pick_port()
    upstream = subprocess.Popen([sys.executable, str(ROOT / "bench" / "upstream_app.py"), str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        redis_figures = uvloop.run(measure_redis(redis, args.scale))
        http_figures = uvloop.run(measure_http(port, args.scale))
    finally:
        upstream.kill()
        upstream.wait()
        redis.close()
    lines = [BEGIN, "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC on {os.cpu_count()} cores, "
             f"Python {platform.python_version()}, uvloop, {CALLERS} concurrent callers, "
             f"{REDIS_CALLS // args.scale} EVALSHA / {HTTP_CALLS // args.scale} GET per client after a warm-up, "
             f"{time.monotonic() - started:.0f} s in all. Command: `make bench` "
             "(`python -m bench.transport`).", "",
             *table("Redis client, EVALSHA of decide.lua", redis_figures), "",
             *table("HTTP client, GET of 11 bytes", http_figures), "",
             f"Versions: {_versions()}.", "", END]
    block = "\n".join(lines)
    print(block)
    write_block(Path(args.out), BEGIN, END, block)
    return 0


def _wait_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"upstream on port {port} did not come up")


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("hiredis", "redis", "coredis", "valkey-glide", "aiohttp", "httptools"):
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{dist} {version(dist)}")
    return ", ".join(found)


if __name__ == "__main__":
    sys.exit(main())
