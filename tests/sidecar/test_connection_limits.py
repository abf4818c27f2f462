"""Memory exhaustion through the client side: huge heads, slowloris, idle floods, too many
requests in flight, clients that stop reading a response or sending a body. A real sidecar process (standalone, memory store) in front of a real slow
upstream; its RSS and descriptors are read with psutil. Limits are set through SLUICE_*
environment variables, so that a sidecar without them runs (and holds everything) rather than
refusing an unknown flag."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import psutil
import pytest
from sluice_core import keyschema
from sluice_core.sidecar_settings import SidecarSettings
from sluice_sidecar.stores.memory import MemoryStore
from support.polling import wait_for
from support.processes import SidecarProcess, UpstreamProcess
from support.redis_servers import RedisServer
from support.sidecar_harness import Upstream

MEMORY_LIMIT = 128 * 2**20  # the injected sidecar's default memory limit
POLICY = """
apiVersion: sluice.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: api}
spec:
  tiers: [{name: free, requests: 100000, period: 1s}]
"""


@pytest.fixture
async def stream_upstream() -> AsyncIterator[Upstream]:
    """The harness's upstream (in this process), for ``/__stream/<n>`` and a body it waits for."""
    up = await Upstream().start()
    yield up
    await up.close()


@contextlib.contextmanager
def sidecar(upstream_process: UpstreamProcess | Upstream, tmp_path: Path, policy_text: str = POLICY,
            **env: str) -> Iterator[SidecarProcess]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text)
    sc = SidecarProcess(upstream_process.url, "--policy-file", str(policy), env=env)
    try:
        yield sc
    finally:
        sc.close()


class Peak:
    """Samples ``value()`` in a thread (every 20 ms) while the block runs; keeps the largest."""

    def __init__(self, value: Callable[[], float]) -> None:
        self.value = value
        self.start = self.peak = value()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(psutil.Error, OSError):
                self.peak = max(self.peak, self.value())

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class PeakRss(Peak):
    def __init__(self, pid: int) -> None:
        proc = psutil.Process(pid)
        super().__init__(lambda: proc.memory_info().rss)

    def __str__(self) -> str:
        return f"RSS {self.start / 2**20:.0f} MiB at start, {self.peak / 2**20:.0f} MiB at peak"


async def exchange(port: int, request: bytes, timeout: float = 10.0, source: str = "127.0.0.1") -> bytes:
    """Send ``request`` from ``source`` (while reading, so a refusal mid-send is seen) and return
    all that comes back until the sidecar closes; b"" if it closed or reset without an answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(request)
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(timeout):
                return await reader.read(-1)
        return b""
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0


async def gather_bounded(coros: list[Awaitable[bytes]], limit: int = 200) -> list[bytes]:
    sem = asyncio.Semaphore(limit)

    async def one(c: Awaitable[bytes]) -> bytes:
        async with sem:
            return await c
    return await asyncio.gather(*(one(c) for c in coros))


async def poll(value: Callable[[], float], ok: Callable[[float], bool], what: str,
               timeout: float = 20.0) -> float:
    async def probe() -> list[float] | None:  # a list: 0 is a value, not "not yet"
        v = await asyncio.to_thread(value)
        return [v] if ok(v) else None
    try:
        return (await wait_for(probe, timeout=timeout, interval=0.1, what=what))[0]
    except AssertionError:
        raise AssertionError(f"{what}: still {value()} after {timeout} s") from None


def client_sockets(sc: SidecarProcess) -> int:
    """The sidecar's sockets on its data port other than the listener (what the kernel says,
    independent of its own gauge)."""
    conns = psutil.Process(sc.proc.pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.laddr and c.laddr.port == sc.port and c.status != psutil.CONN_LISTEN)


def head(target: str, fields: int, size: int) -> bytes:
    lines = "".join(f"X-Pad-{i}: {'a' * size}\r\n" for i in range(fields))
    return f"GET {target} HTTP/1.1\r\nHost: t\r\n{lines}\r\n".encode()


# ---------------------------------------------------------------------------------------------
async def test_header_flood_is_refused_431_and_memory_stays_bounded(
        upstream_process: UpstreamProcess, tmp_path: Path) -> None:
    """150 requests of 100 fields x 8,000 bytes each (under the per-field limit) against an
    upstream that would hold them 30 s: each is answered 431 without reaching the upstream."""
    # the defaults, but one host plays every client
    with sidecar(upstream_process, tmp_path, SLUICE_MAX_CONNECTIONS_PER_CLIENT="1000") as sc:
        flood = head("/slow?s=30", 100, 8000)
        with PeakRss(sc.proc.pid) as rss:
            answers = await gather_bounded([exchange(sc.port, flood) for _ in range(150)])
        statuses = [status_of(a) for a in answers]
        assert statuses == [431] * 150, (sorted(set(statuses)), str(rss))
        assert b"application/problem+json" in answers[0]  # and the connection was closed
        assert rss.peak < MEMORY_LIMIT, str(rss)
        assert sc.metric("sluice_overload_refusals_total", reason="header_size") == 150
        # Too many small fields is refused the same way; a large head under the limit passes.
        assert status_of(await exchange(sc.port, head("/", 101, 10))) == 431
        ok = await exchange(sc.port, head("/", 30, 400).replace(b"HTTP/1.1\r\n", b"HTTP/1.0\r\n", 1))
        assert status_of(ok) == 200, ok[:200]


async def test_a_large_head_behind_another_request_in_the_same_read_is_refused(
        upstream_process: UpstreamProcess, tmp_path: Path) -> None:
    """Pipelined behind a small request (and behind one with a body), in one write: the large
    head is measured on its own, whether complete or not: 200 for the first, then 431."""
    big = head("/", 30, 8000)  # 240 KB, every field under the per-field limit
    post = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
    with sidecar(upstream_process, tmp_path) as sc:
        for first in (b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", post):
            for second in (big, big[:-2]):  # complete, and never completed
                answer = await exchange(sc.port, first + second)
                statuses = [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)]
                assert statuses == [200, 431], (first[:4], len(second), answer[:400])
        assert sc.metric("sluice_overload_refusals_total", reason="header_size") == 4


async def test_slowloris_connections_are_closed_after_the_header_timeout(
        upstream_process: UpstreamProcess, tmp_path: Path) -> None:
    """300 connections trickling a head a byte at a time and 100 that send nothing: all closed
    once the header timeout passes; an honest client is served meanwhile."""
    with sidecar(upstream_process, tmp_path, SLUICE_HEADER_TIMEOUT_S="1",
                 SLUICE_MAX_CONNECTIONS_PER_CLIENT="1000") as sc:  # one host plays every client
        stop_at = time.monotonic() + 20  # every trickle loop ends by then
        closed_by_server = 0

        async def trickle(silent: bool) -> None:
            nonlocal closed_by_server
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
            data = b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 1000
            try:
                for byte in ([] if silent else data):
                    if time.monotonic() > stop_at or reader.at_eof():
                        break
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.2)  # the attack's pace, not synchronisation
                answer = await asyncio.wait_for(reader.read(-1), max(0.1, stop_at - time.monotonic()))
                assert answer == b"", answer[:100]  # closed without an answer
                closed_by_server += 1
            except ConnectionError:  # reset: closed while this client was writing
                closed_by_server += 1
            except TimeoutError:
                pass
            finally:
                writer.close()

        tasks = [asyncio.create_task(trickle(silent=i % 4 == 3)) for i in range(400)]
        with PeakRss(sc.proc.pid) as rss:
            await poll(lambda: client_sockets(sc), lambda v: v >= 100, "slowloris connections open")
            assert status_of(await exchange(sc.port, b"GET / HTTP/1.0\r\n\r\n")) == 200
            await poll(lambda: client_sockets(sc), lambda v: v == 0, "sidecar client sockets")
            await asyncio.gather(*tasks)
        assert closed_by_server == 400
        assert sc.metric("sluice_overload_refusals_total", reason="header_timeout") == 400
        assert sc.metric("sluice_client_connections") == 0
        assert rss.peak < MEMORY_LIMIT, str(rss)


async def test_idle_flood_is_capped_then_closed_after_the_keepalive_timeout(
        upstream_process: UpstreamProcess, tmp_path: Path) -> None:
    """2,000 keep-alive clients each make one request and stay idle: never more than 500 are
    open (the cap), the others are refused 503 at once; the idle ones are closed after the
    keep-alive timeout (some may be before the flood ends, freeing places for later ones)."""
    with sidecar(upstream_process, tmp_path, SLUICE_MAX_CONNECTIONS="500", SLUICE_KEEPALIVE_TIMEOUT_S="3",
                 SLUICE_MAX_CONNECTIONS_PER_CLIENT="5000") as sc:  # one host plays every client
        streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        statuses: list[int] = []

        async def idle_client() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
            streams.append((reader, writer))
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            try:
                async with asyncio.timeout(10):
                    first = await reader.readuntil(b"\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                statuses.append(0)
                return
            statuses.append(status_of(first))
            if statuses[-1] != 200:
                writer.close()  # refused with Connection: close

        try:
            with PeakRss(sc.proc.pid) as rss, Peak(lambda: sc.metric("sluice_client_connections")) as open_:
                for _ in range(20):  # waves of 100, each held open
                    await asyncio.gather(*(idle_client() for _ in range(100)))
                counts = {s: statuses.count(s) for s in set(statuses)}
                assert set(counts) == {200, 503} and counts[200] >= 500, counts
                assert sc.metric("sluice_overload_refusals_total", reason="connections") == counts[503]
                await poll(lambda: client_sockets(sc), lambda v: v == 0,
                           "idle connections closed by the keep-alive timeout")
                assert sc.metric("sluice_client_connections") == 0
            assert open_.peak == 500, open_.peak  # reached, never passed
            assert rss.peak < MEMORY_LIMIT, str(rss)
            # Below the cap again: served.
            assert status_of(await exchange(sc.port, b"GET / HTTP/1.0\r\n\r\n")) == 200
        finally:
            for _, writer in streams:
                writer.close()


async def hold_one_byte(port: int, n: int, source: str) -> list[asyncio.StreamWriter]:
    """``n`` connections from ``source`` that each send one byte of a request head, then wait."""
    held = []
    for _ in range(n):
        _, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        writer.write(b"G")
        held.append(writer)
    return held


def refusals(sc: SidecarProcess) -> float:
    return sc.metric("sluice_overload_refusals_total")


async def test_one_host_cannot_take_every_connection(upstream_process: UpstreamProcess, tmp_path: Path) -> None:
    """150 one-byte connections from 127.0.0.1 (no request completes, no token is taken): 20
    are held (the per-client cap), the rest refused 503, so the global cap of 100 is never
    reached and a client at 127.0.0.2 is served."""
    with sidecar(upstream_process, tmp_path, SLUICE_MAX_CONNECTIONS="100", SLUICE_MAX_CONNECTIONS_PER_CLIENT="20",
                 SLUICE_HEADER_TIMEOUT_S="60") as sc:
        held = await hold_one_byte(sc.port, 150, "127.0.0.1")
        try:
            # every attacking connection is either open or refused
            await poll(lambda: sc.metric("sluice_client_connections") + refusals(sc), lambda v: v == 150,
                       "150 connections accepted or refused")
            answer = await exchange(sc.port, b"GET / HTTP/1.0\r\n\r\n", source="127.0.0.2")
            assert status_of(answer) == 200, answer[:300]
            assert sc.metric("sluice_overload_refusals_total", reason="client_connections") == 130
            assert sc.metric("sluice_overload_refusals_total", reason="connections") == 0
            assert sc.metric("sluice_decisions_total") == 1  # the honest request only
            # the same host's own request is refused while it holds its 20 (answered once the
            # refused connections have stopped lingering: past that cap one is closed at once)
            async def refused() -> bytes:
                answer = await exchange(sc.port, b"GET / HTTP/1.0\r\n\r\n")
                return answer if status_of(answer) == 503 else b""
            answer = await wait_for(refused, timeout=20, interval=0.2, what="a 503 for the same host")
            assert b"overloaded" in answer and b"from this client" in answer, answer[:300]
        finally:
            for writer in held:
                writer.close()
        await poll(lambda: sc.metric("sluice_client_connections"), lambda v: v == 0, "attack connections closed")
        assert status_of(await exchange(sc.port, b"GET / HTTP/1.0\r\n\r\n")) == 200


async def test_trusted_proxies_are_exempt_from_the_per_client_cap(upstream_process: UpstreamProcess,
                                                                  tmp_path: Path) -> None:
    """Behind an ingress every connection comes from the ingress: the policy's trusted proxies
    (127.0.0.1 here) are not capped per client; another address (127.0.0.2) is."""
    trusting = POLICY + "  identify: {order: [ip], trustedProxies: [127.0.0.1/32]}\n"
    with sidecar(upstream_process, tmp_path, trusting, SLUICE_MAX_CONNECTIONS_PER_CLIENT="5",
                 SLUICE_HEADER_TIMEOUT_S="60") as sc:
        held = await hold_one_byte(sc.port, 12, "127.0.0.1")
        held += await hold_one_byte(sc.port, 12, "127.0.0.2")
        try:
            await poll(lambda: sc.metric("sluice_client_connections") + refusals(sc), lambda v: v == 24,
                       "24 connections accepted or refused")
            assert sc.metric("sluice_client_connections") == 17  # 12 from the proxy, 5 from the client
            assert sc.metric("sluice_overload_refusals_total", reason="client_connections") == 7
        finally:
            for writer in held:
                writer.close()


async def test_the_first_byte_does_not_restart_the_head_clock(upstream_process: UpstreamProcess,
                                                             tmp_path: Path) -> None:
    """A connection that sends one byte just before the header timeout is closed when the
    timeout passes from the connection's opening (4 s), not a full timeout after that byte
    (7.5 s): one byte cannot hold a place twice as long."""
    with sidecar(upstream_process, tmp_path, SLUICE_HEADER_TIMEOUT_S="4") as sc:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
        try:
            await asyncio.sleep(3.5)  # the attack's pace: the byte comes late
            writer.write(b"G")
            with contextlib.suppress(ConnectionError):
                # 6.5 s after connecting: closed by now (at 4 s), and without an answer
                assert await asyncio.wait_for(reader.read(-1), 3.0) == b""
        finally:
            writer.close()
        assert sc.metric("sluice_overload_refusals_total", reason="header_timeout") == 1


async def test_requests_in_flight_are_capped_without_taking_a_token(
        upstream_process: UpstreamProcess, tmp_path: Path) -> None:
    with sidecar(upstream_process, tmp_path, SLUICE_MAX_INFLIGHT_REQUESTS="4") as sc:
        held = [await asyncio.open_connection("127.0.0.1", sc.port) for _ in range(4)]
        try:
            for _, writer in held:
                writer.write(b"GET /slow?s=30 HTTP/1.1\r\nHost: t\r\n\r\n")
            await poll(lambda: sc.metric("sluice_inflight_requests"), lambda v: v == 4,
                       "4 requests held by the upstream")
            decided = sc.metric("sluice_decisions_total")
            answer = await exchange(sc.port, b"GET / HTTP/1.0\r\n\r\n")
            assert status_of(answer) == 503 and b"Retry-After: 1" in answer, answer[:300]
            assert b"overloaded" in answer
            assert sc.metric("sluice_overload_refusals_total", reason="inflight") == 1
            assert sc.metric("sluice_decisions_total") == decided  # refused before any decision
        finally:
            for _, writer in held:
                writer.close()
        await poll(lambda: sc.metric("sluice_inflight_requests"), lambda v: v == 0,
                   "held requests cancelled")
        assert status_of(await exchange(sc.port, b"GET / HTTP/1.0\r\n\r\n")) == 200


async def test_the_inflight_gauge_counts_what_the_cap_counts(upstream_process: UpstreamProcess, tmp_path: Path,
                                                            fresh_redis: RedisServer) -> None:
    """Requests waiting for their decision (Redis paused) are in flight as much as requests at
    the upstream: ``sluice_inflight_requests`` shows them, and the cap refuses the next one."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    sc = SidecarProcess(upstream_process.url, "--policy-file", str(policy), "--redis", fresh_redis.url,
                        env={"SLUICE_MAX_INFLIGHT_REQUESTS": "3", "SLUICE_REDIS_TIMEOUT_MS": "30000"})
    held = []
    try:
        assert status_of(await exchange(sc.port, b"GET / HTTP/1.0\r\n\r\n")) == 200
        fresh_redis.pause()
        for _ in range(3):
            _, writer = await asyncio.open_connection("127.0.0.1", sc.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            held.append(writer)
        await poll(lambda: sc.metric("sluice_inflight_requests"), lambda v: v == 3,
                   "3 requests waiting for their decision")
        answer = await exchange(sc.port, b"GET / HTTP/1.0\r\n\r\n")
        assert status_of(answer) == 503 and b"overloaded" in answer, answer[:300]
        assert sc.metric("sluice_overload_refusals_total", reason="inflight") == 1
    finally:
        fresh_redis.resume()
        for writer in held:
            writer.close()
        sc.close()


def test_memory_store_default_cap_fits_the_memory_limit() -> None:
    """The in-memory store filled to its default cap (and past it: the oldest are dropped)
    stays a small part of the 128 MiB limit; the old default (1,000,000) took about 240 MB."""
    cap = SidecarSettings(upstream="http://127.0.0.1:1").memory_max_buckets
    store = MemoryStore(max_buckets=cap)
    gc.collect()
    before = psutil.Process().memory_info().rss
    params = (10**9, 10**10)  # buckets that stay for the whole test
    for i in range(cap + 1000):
        ip = f"i2001:db8::{i >> 16:x}:{i & 0xFFFF:x}"
        store.decide_now((keyschema.tier_bucket_key(keyschema.client_tag("default/api", ip),
                                                    "free", 10**6, 10**7),), 1, params)
    gc.collect()
    grown = psutil.Process().memory_info().rss - before
    assert len(store) == cap
    assert grown < 16 * 2**20, f"{cap} buckets took {grown / 2**20:.0f} MiB"


# Slow clients --------------------------------------------------------------------------------
def stalled_reader(port: int, target: str) -> socket.socket:
    """A client that sends one request and never reads: a small receive buffer, so that the
    kernel absorbs little of the response and the sidecar's own buffers fill."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    return sock


async def test_clients_that_stop_reading_are_aborted_and_their_slots_freed(
        stream_upstream: Upstream, tmp_path: Path) -> None:
    """Two clients ask for 50 MiB each and read nothing, with an in-flight cap of 2: both
    slots are held until the client timeout passes, then both connections are aborted and a
    third client is served."""
    with sidecar(stream_upstream, tmp_path, SLUICE_MAX_INFLIGHT_REQUESTS="2",
                 SLUICE_CLIENT_TIMEOUT_S="1") as sc:
        held = [stalled_reader(sc.port, f"/__stream/{50 * 2**20}") for _ in range(2)]
        try:
            with PeakRss(sc.proc.pid) as rss:
                await poll(lambda: sc.metric("sluice_inflight_requests"), lambda v: v == 2,
                           "2 responses in flight")
                await poll(lambda: client_sockets(sc), lambda v: v == 0,
                           "stalled readers aborted by the sidecar")
            answer = await exchange(sc.port, b"GET / HTTP/1.0\r\n\r\n")
            assert status_of(answer) == 200, answer[:300]
            assert sc.metric("sluice_overload_refusals_total", reason="send_timeout") == 2
            assert sc.metric("sluice_inflight_requests") == 0
            assert rss.peak < MEMORY_LIMIT, str(rss)
            assert stream_upstream.stream_sent < 2 * 50 * 2**20  # relaying stopped with them
        finally:
            for sock in held:
                sock.close()


async def test_a_slow_reader_that_keeps_reading_gets_the_whole_response(
        stream_upstream: Upstream, tmp_path: Path) -> None:
    """The timeout is between bytes, not for the whole response: a client that takes 4 MiB
    in 64 KiB reads over several client timeouts gets all of it."""
    size = 4 * 2**20
    with sidecar(stream_upstream, tmp_path, SLUICE_CLIENT_TIMEOUT_S="1") as sc:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, limit=2**16)
        try:
            writer.write(f"GET /__stream/{size} HTTP/1.0\r\n\r\n".encode())
            head_ = await reader.readuntil(b"\r\n\r\n")
            assert status_of(head_) == 200, head_
            got = 0
            async with asyncio.timeout(60):
                while chunk := await reader.read(2**16):
                    got += len(chunk)
                    await asyncio.sleep(0.02)  # a slow client's pace (~3 MiB/s), not synchronisation
            assert got == size
        finally:
            writer.close()
        assert sc.metric("sluice_overload_refusals_total", reason="send_timeout") == 0


async def test_request_bodies_that_stop_arriving_get_408_and_their_slots_freed(
        stream_upstream: Upstream, tmp_path: Path) -> None:
    """Two clients declare a 1 MiB body, send 10 bytes and then nothing, with an in-flight cap
    of 2: after the client timeout each is answered 408 (problem+json) and closed, the
    upstream connection is dropped, and a third client is served."""
    stalled = b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1048576\r\n\r\n" + b"0123456789"
    with sidecar(stream_upstream, tmp_path, SLUICE_MAX_INFLIGHT_REQUESTS="2",
                 SLUICE_CLIENT_TIMEOUT_S="1") as sc:
        tasks = [asyncio.create_task(exchange(sc.port, stalled, timeout=20)) for _ in range(2)]
        answers = await asyncio.gather(*tasks)
        for answer in answers:  # exchange returns once the sidecar closed the connection
            assert status_of(answer) == 408, answer[:300]
            assert b"application/problem+json" in answer and b"Connection: close" in answer
        assert sc.metric("sluice_overload_refusals_total", reason="body_timeout") == 2
        await poll(lambda: sc.metric("sluice_inflight_requests"), lambda v: v == 0, "slots freed")
        answer = await exchange(sc.port, b"POST / HTTP/1.0\r\nContent-Length: 2\r\n\r\nok")
        assert status_of(answer) == 200, answer[:300]
        assert sc.metric("sluice_upstream_errors_total") == 0  # the client's fault, not the app's


async def test_a_slow_body_that_keeps_arriving_is_forwarded(
        stream_upstream: Upstream, tmp_path: Path) -> None:
    """Between bytes, not for the whole body: 10 pieces over about 3 client timeouts arrive."""
    with sidecar(stream_upstream, tmp_path, SLUICE_CLIENT_TIMEOUT_S="1") as sc:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
        try:
            writer.write(b"POST /upload HTTP/1.0\r\nContent-Length: 100\r\n\r\n")
            for _ in range(10):
                await asyncio.sleep(0.3)  # the client's pace, not synchronisation
                writer.write(b"x" * 10)
            async with asyncio.timeout(20):
                answer = await reader.read(-1)
        finally:
            writer.close()
        assert status_of(answer) == 200, answer[:300]
        assert b'"body_length": 100' in answer
