"""Proxying through a real sidecar on loopback: hop-by-hop and forwarded headers, bytes passed
unchanged both ways, 502/504 from a failing upstream, absolute-form targets, and 50 MiB each
way with flat memory and back-pressure (that test runs the ``sluice sidecar`` command as a
child process, so that its memory can be measured on its own)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil  # type: ignore[import-untyped]
import pytest
from support.http_calls import (
    assert_problem,
    call,
    metric,
    metrics_text,
)
from support.polling import wait_stable
from support.processes import SidecarProcess
from support.sidecar_harness import (
    UTF8_VALUE,
    Factory,
    Upstream,
    policy_doc,
    raw_request,
    write_file,
)

MiB = 1024 * 1024


# Proxying -------------------------------------------------------------------------------------
async def test_hop_by_hop_headers_are_not_forwarded(sidecars: Factory, upstream: Upstream) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}]))
    req = (b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, X-Hop-Custom\r\n"
           b"X-Hop-Custom: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: websocket\r\n"
           b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\nProxy-Connection: keep-alive\r\n"
           b"X-End-To-End: kept\r\n\r\n")
    r = await raw_request(sc.data_port, req)
    assert r is not None and r.status == 200
    got = {k.lower() for k, _ in upstream.seen[-1].headers}
    for h in ("connection", "x-hop-custom", "keep-alive", "te", "upgrade", "proxy-authorization",
              "proxy-connection"):
        assert h not in got, (h, upstream.seen[-1].headers)
    assert upstream.seen[-1].header("X-End-To-End") == ["kept"]
    # and on the way back
    r = await raw_request(sc.data_port, b"GET /__hop HTTP/1.1\r\nHost: t\r\n\r\n")
    assert r is not None and r.status == 200
    names = {k.lower() for k, _ in r.headers}
    for h in ("x-up-hop", "keep-alive", "proxy-authenticate", "trailer", "upgrade"):
        assert h not in names, (h, r.headers)
    assert "x-up-hop" not in (r.header("Connection") or "").lower()
    assert r.header("X-Up-End") == "kept"


async def test_forwarded_headers(sidecars: Factory, http: aiohttp.ClientSession, upstream: Upstream) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}]))
    await call(http, "GET", sc.url + "/a")
    assert upstream.seen[-1].header("X-Forwarded-For") == ["127.0.0.1"]
    assert upstream.seen[-1].header("X-Forwarded-Proto") == ["http"]
    await call(http, "GET", sc.url + "/b", headers={"X-Forwarded-For": "203.0.113.7, 10.1.2.3"})
    assert upstream.seen[-1].header("X-Forwarded-For") == ["203.0.113.7, 10.1.2.3, 127.0.0.1"]


@pytest.mark.parametrize("target", [
    "/a%2Fb/c%20d/%7e/%E2%82%AC?x=1&y=%2F&z=a+b&x=2&empty=&flag",
    "/search?q=%22quoted%22&sort=-date&page=2&a[]=1&b=%zz",
    "/p;matrix=1/%252F?%3D=%26",
])
async def test_query_and_percent_encoding_forwarded_unchanged(target: str, sidecars: Factory, upstream: Upstream) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}]))
    r = await raw_request(sc.data_port, f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    assert r is not None and r.status == 200
    assert upstream.seen[-1].raw_path == target


@pytest.mark.parametrize("value", ["caf\u00e9".encode(), "\u20ac 5".encode(), b"caf\xe9", b"\x80\xff"])
async def test_header_bytes_forwarded_unchanged(value: bytes, sidecars: Factory, upstream: Upstream) -> None:
    """Header values are opaque octets (RFC 9110 5.5): UTF-8 or Latin-1 bytes reach the app as sent."""
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}]))
    r = await raw_request(sc.data_port, b"GET /h HTTP/1.1\r\nHost: t\r\nX-Name: " + value + b"\r\n\r\n")
    assert r is not None and r.status == 200, r
    assert upstream.seen[-1].header("X-Name") == [value.decode("latin-1")]


async def test_response_header_bytes_relayed_unchanged(sidecars: Factory) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}]))
    r = await raw_request(sc.data_port, b"GET /__utf8 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert r is not None and r.status == 200
    assert r.header("X-Utf8") == UTF8_VALUE.encode().decode("latin-1")


async def test_head_then_get_on_the_same_connections(sidecars: Factory, http: aiohttp.ClientSession,
                                                     upstream: Upstream) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}]))
    for path, size in (("/__stream/10", "10"), ("/__stream/100000", "100000"), ("/echo", None)):
        async with http.head(sc.url + path) as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == size if size else r.headers["Content-Length"].isdigit()
            assert await r.read() == b""
        for i in range(3):  # the upstream connection was left clean: replies stay in step
            got = await call(http, "GET", f"{sc.url}/after-head-{i}")
            assert got.status == 200 and got.json()["raw_path"] == f"/after-head-{i}"


async def test_upstream_down_is_502(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    with socket.socket() as s:  # a port nothing listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        sc = await sidecars(policy_doc(), upstream=f"http://127.0.0.1:{port}")
        r = await call(http, "GET", sc.url + "/x")
    assert_problem(r, 502)
    assert (await call(http, "GET", sc.admin_url + "/healthz")).status == 200


async def test_upstream_too_slow_is_504(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(), upstream_timeout_s=0.3)
    r = await call(http, "GET", sc.url + "/__sleep/30")
    assert_problem(r, 504)
    text = await metrics_text(http, sc)
    assert metric(text, "sluice_upstream_errors_total", kind="timeout") == 1
    assert (await call(http, "GET", sc.url + "/fine")).status == 200


async def test_upstream_that_stops_reading_the_body_is_504(sidecars: Factory, upstream: Upstream) -> None:
    """An app that accepts the connection but never reads the upload is as stuck as one that
    never answers: the read timeout applies to sending the body too."""
    sc = await sidecars(policy_doc(), upstream_timeout_s=0.5, shutdown_timeout_s=1.0)
    size = 256 * MiB  # far more than the socket buffers on either side hold
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.data_port)

    async def upload() -> None:
        writer.write(b"POST /__stall/60 HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"z" * (256 * 1024)
        with contextlib.suppress(ConnectionError, OSError):
            for _ in range(size // len(block)):
                writer.write(block)
                await writer.drain()

    sender = asyncio.create_task(upload())
    try:
        status_line = await asyncio.wait_for(reader.readline(), 15)
        assert status_line.startswith(b"HTTP/1.1 504 "), status_line
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    assert upstream.seen and upstream.seen[-1].raw_path == "/__stall/60"


async def test_absolute_form_never_reaches_another_host(sidecars: Factory, upstream: Upstream,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    decoy = await Upstream().start()
    try:
        sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}]))
        # Watch every outgoing connection and name lookup this event loop makes.
        loop = asyncio.get_running_loop()
        connects: list[Any] = []
        lookups: list[Any] = []
        real_connect, real_lookup = loop.sock_connect, loop.getaddrinfo

        async def spy_connect(sock: socket.socket, address: Any) -> None:
            connects.append(address)
            await real_connect(sock, address)

        async def spy_lookup(host: Any, *a: Any, **kw: Any) -> Any:
            lookups.append(host)
            return await real_lookup(host, *a, **kw)

        monkeypatch.setattr(loop, "sock_connect", spy_connect)
        monkeypatch.setattr(loop, "getaddrinfo", spy_lookup)
        ok = await raw_request(sc.data_port, b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
        assert ok is not None and ok.status == 200
        # (the test's own raw connections to the sidecar go through this loop too)
        allowed = {("127.0.0.1", upstream.port), ("127.0.0.1", sc.data_port)}
        assert ("127.0.0.1", upstream.port) in {a[:2] for a in connects}, connects  # the spy works
        assert {a[:2] for a in connects} <= allowed, connects
        attacks = [
            b"GET http://evil.example/steal HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            b"GET http://127.0.0.1:%d/steal HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (decoy.port, decoy.port),
            b"GET https://evil.example:443/ HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (decoy.port, decoy.port),
            b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
            b"GET @evil.example/ HTTP/1.1\r\nHost: t\r\n\r\n",
        ]
        for attack in attacks:
            r = await raw_request(sc.data_port, attack)
            assert r is None or r.status == 400 or 200 <= r.status < 300, (attack, r)
        assert decoy.seen == []
        for s in upstream.seen:
            assert s.raw_path.startswith("/"), s
            assert "evil" not in s.raw_path and "steal" not in s.raw_path, s
            assert not any("evil" in v for v in s.header("Host")), s
        assert {a[:2] for a in connects} <= allowed, connects
        assert all(h in ("127.0.0.1", b"127.0.0.1") for h in lookups), lookups
        ok = await raw_request(sc.data_port, b"GET /still-fine HTTP/1.1\r\nHost: t\r\n\r\n")
        assert ok is not None and ok.status == 200
    finally:
        await decoy.close()


class RssSampler:
    """Peak resident memory of a process, sampled from /proc every few milliseconds in a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(0.005)

    def __enter__(self) -> RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


async def _body(total: int, chunk: int = 256 * 1024) -> AsyncIterator[bytes]:
    block = b"y" * chunk
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        yield block[:n]
        sent += n


async def _transfer(http: aiohttp.ClientSession, url: str, size: int) -> None:
    async with http.post(url + "/upload", data=_body(size)) as r:
        assert r.status == 200
        assert (await r.json())["body_length"] == size
    for suffix in ("", "?chunked=1"):
        got = 0
        async with http.get(f"{url}/__stream/{size}{suffix}") as r:
            assert r.status == 200
            async for chunk in r.content.iter_chunked(256 * 1024):
                got += len(chunk)
        assert got == size


@pytest.fixture
async def sidecar_process(tmp_path: Path, upstream: Upstream) -> AsyncIterator[SidecarProcess]:
    """The sidecar as a process of its own (so its RSS is its own), limits that never bind."""
    policy = tmp_path / "policy.yaml"
    write_file(policy, policy_doc(tiers=[{"name": "free", "requests": 1000, "period": "1s"}]))
    proc = await asyncio.to_thread(SidecarProcess, upstream.url, "--policy-file", str(policy),
                                   "--drain-s", "0", "--shutdown-timeout-s", "2")
    try:
        yield proc
    finally:
        await asyncio.to_thread(proc.close)


async def test_fifty_mib_both_ways_with_flat_memory(sidecar_process: SidecarProcess, upstream: Upstream,
                                                    http: aiohttp.ClientSession) -> None:
    proc = sidecar_process
    await _transfer(http, proc.url, 2 * MiB)  # warm up buffers and connection pools
    sampler = RssSampler(proc.proc.pid)
    baseline = sampler.rss()
    with sampler:
        await _transfer(http, proc.url, 50 * MiB)
    growth = sampler.peak - baseline
    assert growth < 20 * MiB, f"sidecar RSS grew by {growth / MiB:.1f} MiB for a 50 MiB body"
    assert upstream.seen[-3].body_length == 50 * MiB
    r = await call(http, "GET", proc.admin + "/healthz")
    assert r.status == 200


async def test_slow_client_and_slow_app_get_back_pressure(sidecar_process: SidecarProcess, upstream: Upstream,
                                                         http: aiohttp.ClientSession) -> None:
    """A client that stops reading stops the app's writes; an app that stops reading stops the
    client's upload: the sidecar holds neither body in memory meanwhile."""
    proc = sidecar_process
    total = 256 * MiB
    await _transfer(http, proc.url, 2 * MiB)
    sampler = RssSampler(proc.proc.pid)
    baseline = sampler.rss()
    with sampler:
        async with http.get(f"{proc.url}/__stream/{total}") as r:
            got = len(await r.content.readexactly(MiB))
            written = await wait_stable(lambda: upstream.stream_sent, what="bytes the app wrote")
            async for chunk in r.content.iter_chunked(256 * 1024):
                got += len(chunk)
        assert got == total

        sent = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal sent
            block = b"u" * (256 * 1024)
            while sent < total:
                sent += len(block)
                yield block

        post = asyncio.create_task(call(http, "POST", proc.url + "/__gated", data=body()))
        accepted = await wait_stable(lambda: sent, what="bytes the client could send")
        upstream.gate.set()
        reply = await post
        assert reply.status == 200 and reply.json()["body_length"] == total
    # what is in flight is socket buffers (and the sidecar's bounded ones), not the body
    assert written < 64 * MiB, f"the app wrote {written / MiB:.0f} MiB to a client that read 1 MiB"
    assert accepted < 64 * MiB, f"the client sent {accepted / MiB:.0f} MiB to an app that read one chunk"
    growth = sampler.peak - baseline
    assert growth < 20 * MiB, f"sidecar RSS grew by {growth / MiB:.1f} MiB"
