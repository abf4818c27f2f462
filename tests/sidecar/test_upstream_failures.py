"""What the sidecar does when the upstream fails after the response head went out, when the
client goes away mid-body, with a refused request target, and who pays for a failed request.

The upstream here is a scripted asyncio server (raw bytes, so it can lie about its length, reset
the connection or stall), the client a raw socket, the sidecar a real one on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.sidecar_harness import RunningSidecar, policy_doc, raw_request, start_sidecar

DEADLINE = 10.0  # the client's wait for the end of a response (an old sidecar kept it open 70 s)
BODY = b"x" * 1000
PLENTY: dict[str, object] = {"tiers": [{"name": "free", "requests": 1000, "period": "1m"}]}


class ScriptedUpstream:
    """Answers by path: ``/cl-reset`` (Content-Length 100000, 1,000 bytes, then a TCP reset),
    ``/chunked-reset`` (three chunks, then a reset), ``/chunked-garbage`` (a chunk, then bytes
    that are not chunked encoding), ``/cl-stall`` (1,000 of 100,000 bytes, then silence), ``/head-then-reset`` and
    ``/head-then-silence`` (a head announcing 100,000 bytes, then not one),
    ``/close-delimited`` and ``/close-delimited-reset`` (no length: 1,000 bytes, then a clean
    close or a reset), ``/two-answers`` (a second, unasked-for response right behind the first), ``/silent`` (no answer), ``/endless`` (chunks until the connection breaks); anything else: ``ok``
    on a keep-alive connection."""

    def __init__(self) -> None:
        self.connections = 0
        self.endless_ended = asyncio.Event()
        self._stop = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> ScriptedUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.transport.abort()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                # The script is chosen by the path up to its first percent-escape.
                path = head.split(b" ", 2)[1].decode().partition("%")[0]
                if not await self._answer(path, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            if not writer.transport.is_closing():
                writer.close()

    async def _answer(self, path: str, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection is finished with."""
        ok = b"HTTP/1.1 200 OK\r\n"
        if path == "/cl-reset":
            writer.write(ok + b"Content-Length: 100000\r\n\r\n" + BODY)
            await _reset(writer)
        elif path == "/chunked-reset":
            writer.write(ok + b"Transfer-Encoding: chunked\r\n\r\n")
            writer.write(b"".join(b"%x\r\n%b\r\n" % (len(BODY), BODY) for _ in range(3)))
            await _reset(writer)
        elif path == "/chunked-garbage":
            writer.write(ok + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n" % (len(BODY), BODY))
            await writer.drain()
            writer.write(b"this is not a chunk size\r\n\r\n")
            await self._stop.wait()
        elif path == "/head-then-reset":
            writer.write(ok + b"Content-Length: 100000\r\n\r\n")
            await _reset(writer)
        elif path == "/head-then-silence":
            writer.write(ok + b"Content-Length: 100000\r\n\r\n")
            await writer.drain()
            await self._stop.wait()
        elif path == "/cl-stall":
            writer.write(ok + b"Content-Length: 100000\r\n\r\n" + BODY)
            await writer.drain()
            await self._stop.wait()
        elif path in ("/close-delimited", "/close-delimited-reset"):
            writer.write(ok + b"Connection: close\r\n\r\n" + BODY)
            if path.endswith("-reset"):
                await _reset(writer)
            else:
                await writer.drain()
                writer.close()
        elif path == "/two-answers":
            writer.write(ok + b"Content-Length: 2\r\n\r\nok" + ok + b"Content-Length: 5\r\n\r\nEVIL!")
            await writer.drain()
            return True
        elif path == "/silent":
            await self._stop.wait()
        elif path == "/endless":
            writer.write(ok + b"Transfer-Encoding: chunked\r\n\r\n")
            try:
                while True:
                    writer.write(b"%x\r\n%b\r\n" % (len(BODY), BODY))
                    await writer.drain()
            finally:
                self.endless_ended.set()
        else:
            writer.write(ok + b"Content-Length: 2\r\n\r\nok")
            await writer.drain()
            return True
        return False


async def _reset(writer: asyncio.StreamWriter) -> None:
    """Flush, then close with a TCP reset (SO_LINGER 0) rather than a clean FIN."""
    await writer.drain()
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def read_to_end(port: int, request: bytes) -> bytes:
    """Send ``request`` on a raw socket and return every byte until the sidecar closes (EOF or
    reset); fail if it is still open after :data:`DEADLINE`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = bytearray()
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(DEADLINE):
            while chunk := await reader.read(65536):
                data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the connection was still open after {DEADLINE}s; got {bytes(data[:300])!r}") from None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    return bytes(data)


def aborted(sc: RunningSidecar) -> float:
    value = sc.sidecar.metrics.registry.get_sample_value("sluice_upstream_errors_total",
                                                          {"kind": "aborted_midbody"})
    return value or 0.0


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    up = await ScriptedUpstream().start()
    yield up
    await up.close()


@pytest.fixture
async def sidecar(tmp_path: Path, upstream: ScriptedUpstream) -> AsyncIterator[RunningSidecar]:
    sc = await start_sidecar(tmp_path, policy_doc(**PLENTY), upstream=upstream.url,
                             upstream_timeout_s=0.5, shutdown_timeout_s=1.0)
    yield sc
    await sc.stop()


def get(path: str) -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode()


# The upstream fails after the head was relayed -------------------------------------------------
@pytest.mark.parametrize("path", ["/cl-reset", "/chunked-reset", "/chunked-garbage", "/cl-stall",
                                  "/close-delimited-reset"])
async def test_upstream_failing_mid_body_aborts_the_client_connection(
        path: str, sidecar: RunningSidecar, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        data = await read_to_end(sidecar.data_port, get(path))
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), data[:300]
    assert data.count(b"HTTP/1.") == 1, data  # nothing (no 502) was written into the body
    assert b"problem+json" not in data
    headers = head.lower()
    if b"content-length: 100000" in headers:
        assert len(body) < 100000
    else:
        assert b"transfer-encoding: chunked" in headers, head
        assert not body.endswith(b"0\r\n\r\n"), body[-50:]  # the chunked stream is left unfinished
    assert aborted(sidecar) == 1
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in logged] == ["sluice.proxy"], [r.getMessage() for r in logged]
    assert path in logged[0].getMessage() and "aborted" in logged[0].getMessage()
    # The sidecar (and its pool) carry on.
    after = await raw_request(sidecar.data_port, get("/fine"))
    assert after is not None and after.status == 200 and after.body == b"ok"


@pytest.mark.parametrize(("path", "level"), [("/cl-reset", logging.WARNING),
                                              ("/head-then-reset", logging.INFO)])
async def test_a_path_with_encoded_newlines_cannot_forge_log_lines(
        path: str, level: int, sidecar: RunningSidecar, caplog: pytest.LogCaptureFixture) -> None:
    """The path is logged as sent (escapes kept), quoted and truncated: ``%0d%0a`` decoded would
    start a forged line of the operator's log."""
    forged = path + "%0d%0aERROR%20sluice.sidecar%20forged" + "x" * 1000
    with caplog.at_level(logging.DEBUG, logger="sluice.proxy"):
        await read_to_end(sidecar.data_port, get(forged).replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    logged = [r.getMessage() for r in caplog.records if r.name == "sluice.proxy" and r.levelno == level]
    assert len(logged) == 1, logged
    assert "\r" not in logged[0] and "\n" not in logged[0], logged[0]
    assert path + "%0d%0aERROR" in logged[0]
    assert len(logged[0]) < 500, len(logged[0])  # the target is truncated


@pytest.mark.parametrize(("path", "status", "kind"), [("/head-then-reset", 502, "protocol"),
                                                      ("/head-then-silence", 504, "timeout")])
async def test_upstream_failing_before_the_first_body_byte_is_a_clean_error(
        path: str, status: int, kind: str, sidecar: RunningSidecar) -> None:
    """No byte has reached the client yet (the head waits for the body's first bytes), so the
    failure can still be answered properly."""
    r = await raw_request(sidecar.data_port, get(path))
    assert r is not None and r.status == status, r
    assert r.header("Content-Type") == "application/problem+json"
    value = sidecar.sidecar.metrics.registry.get_sample_value("sluice_upstream_errors_total", {"kind": kind})
    assert value == 1
    assert aborted(sidecar) == 0


async def test_close_delimited_body_ends_at_a_clean_close(sidecar: RunningSidecar) -> None:
    """No length and ``Connection: close``: the upstream's FIN is the end of the body, not an
    error (the client gets it whole, chunked)."""
    r = await raw_request(sidecar.data_port, get("/close-delimited"))
    assert r is not None and r.status == 200 and r.body == BODY
    assert aborted(sidecar) == 0


async def test_client_gone_mid_body_drops_the_upstream_connection(
        sidecar: RunningSidecar, upstream: ScriptedUpstream, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.data_port)
        writer.write(get("/endless"))
        await writer.drain()
        await asyncio.wait_for(reader.readexactly(64 * 1024), DEADLINE)  # the body is flowing
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # the client vanishes (reset)
        await asyncio.wait_for(upstream.endless_ended.wait(), DEADLINE)  # its upstream connection closed
        assert upstream.connections == 1
        after = await raw_request(sidecar.data_port, get("/fine"))
    assert after is not None and after.status == 200 and after.body == b"ok"
    assert upstream.connections == 2  # a fresh connection: the broken one was not pooled
    assert aborted(sidecar) == 0  # the upstream did nothing wrong
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], \
        [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sidecar.sidecar.metrics.registry.get_sample_value("sluice_inflight_requests") == 0


async def test_a_response_nobody_asked_for_is_never_relayed(sidecar: RunningSidecar,
                                                             upstream: ScriptedUpstream) -> None:
    """Bytes behind a complete response would land in its body (or answer the next request):
    the connection they came on is closed instead."""
    r = await raw_request(sidecar.data_port, get("/two-answers"))
    assert r is not None and r.status == 200 and r.body == b"ok"
    for _ in range(3):
        after = await raw_request(sidecar.data_port, get("/fine"))
        assert after is not None and after.status == 200 and after.body == b"ok"
    assert upstream.connections == 2  # the connection that carried the extra response was dropped


# Refused request targets -------------------------------------------------------------------------
@pytest.mark.parametrize("request_bytes", [
    b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
    b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n",
], ids=["connect", "absolute-form", "asterisk-form"])
async def test_refused_target_closes_the_connection(request_bytes: bytes, sidecar: RunningSidecar) -> None:
    """What follows a request that is not origin-form cannot be trusted to be a sane request
    (after CONNECT a client sends tunnel bytes): answer 400 and close."""
    data = await read_to_end(sidecar.data_port, request_bytes + get("/next"))
    assert data.startswith(b"HTTP/1.1 400 "), data[:300]
    assert data.count(b"HTTP/1.") == 1, data  # the bytes behind it were not served


# Who pays for a request the upstream fails -------------------------------------------------------
@pytest.mark.parametrize("case", ["down", "silent"])
async def test_a_request_the_upstream_fails_still_costs_its_token(
        case: str, tmp_path: Path, upstream: ScriptedUpstream) -> None:
    """Documented: the token is taken when the limiter decides; a failed upstream does not give
    it back (a refund would be a second Redis round trip, and free retries for whoever can make
    the upstream fail)."""
    if case == "down":
        with socket.socket() as s:  # a port nothing listens on (bound, never listening)
            s.bind(("127.0.0.1", 0))
            target, failed = f"http://127.0.0.1:{s.getsockname()[1]}", 502
    else:
        target, failed = upstream.url, 504
    sc = await start_sidecar(tmp_path, policy_doc(tiers=[{"name": "free", "requests": 2, "period": "1h"}]),
                             upstream=target, upstream_timeout_s=0.3, shutdown_timeout_s=1.0)
    try:
        statuses = []
        for _ in range(3):
            r = await raw_request(sc.data_port, get("/silent"))
            statuses.append(r.status if r is not None else None)
    finally:
        await sc.stop()
    assert statuses == [failed, failed, 429]
