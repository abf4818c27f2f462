"""A lean HTTP/1.1 client for the one upstream (bytes on the wire; what the sidecar forwards and
relays is :mod:`sluice_sidecar.proxy`'s): pooled keep-alive connections, responses parsed
by httptools (llhttp), bodies streamed both ways with flow control.

Why not aiohttp's client: per request it builds a ClientRequest, a ClientResponse, timers and a
connector lease, which measured as the single largest CPU cost of the proxy. The sidecar always
talks to one origin on localhost with plain HTTP/1.1, so the client needed is small.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

import httptools

from sluice_sidecar.transport.errors import PROTOCOL, TIMEOUT, UNAVAILABLE, TransportError

CHUNK = 64 * 1024
# Response bytes buffered here before reading from the upstream pauses (the check is after
# each read of at most CHUNK). The kernel's socket buffer reads ahead far more, outside the
# process: 16 KiB streamed as fast as 256 KiB did, and a client that stops reading holds
# 80 KiB here at most instead of 512 KiB (bench: docs/security.md, slow-read).
MAX_BUFFERED = 16 * 1024


class _Reset(Exception):
    """The connection closed before any byte of the response: safe to retry on a new one."""


class _Unsolicited(Exception):
    """The upstream sent a response before it was sent a request."""


class UpstreamResponse:
    __slots__ = ("_body", "_conn", "_error", "_event", "_size", "close_delimited", "complete",
                 "content_length", "headers", "keep_alive", "reason", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self.close_delimited = False  # neither Content-Length nor chunked: the body ends at EOF
        self.complete = False
        self.keep_alive = True
        self._body: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._event = asyncio.Event()
        self._error: Exception | None = None

    # Told by the connection as the response arrives -------------------------------------------
    def feed(self, chunk: bytes) -> int:
        """A piece of the body arrived; returns how many bytes wait unread now."""
        self._body.append(chunk)
        self._size += len(chunk)
        self._event.set()
        return self._size

    def finish(self) -> None:
        self.complete = True
        self._event.set()

    def fail(self, exc: Exception) -> None:
        """The rest of the body will not come: the reader gets ``exc`` after what arrived."""
        self._error = exc
        self._event.set()

    # Read by the relay ---------------------------------------------------------------------
    def body_now(self) -> bytes:
        """The whole body, when ``complete`` (small responses arrive in one read)."""
        data = b"".join(self._body)
        self._body.clear()
        self._conn.release()
        return data

    async def iter_body(self, read_timeout: float) -> AsyncIterator[bytes]:
        while True:
            if self._body:
                chunk = self._body.popleft()
                self._size -= len(chunk)
                self._conn.resume_if_drained(self._size)
                yield chunk
                continue
            if self.complete:
                self._conn.release()
                return
            if self._error is not None:
                raise self._error
            self._event.clear()
            try:
                async with asyncio.timeout(read_timeout):
                    await self._event.wait()
            except TimeoutError:
                self._conn.close()
                raise TransportError("the upstream stopped sending the body", TIMEOUT) from None

    def discard(self) -> None:
        """The relay stopped before handing the connection back (client gone, upstream failed):
        whatever is left of this response is unread, so the connection cannot be reused."""
        if self._conn.resp is self:
            self._conn.close()


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: UpstreamResponse | None = None
        self.head: asyncio.Future[UpstreamResponse] | None = None
        self.got_bytes = False
        self.closed = False
        self.head_only = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._reading_paused = False
        self._header_name = b""
        self._buffer = pool.read_buffer

    # asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(TransportError("the upstream switched protocols (not supported)", PROTOCOL))
        except httptools.HttpParserError as exc:
            why = "a response nobody asked for" if isinstance(exc.__context__, _Unsolicited) else exc
            self._fail(TransportError(f"malformed upstream response: {why}", PROTOCOL))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._can_write.set()
        self.pool.forget(self)
        resp = self.resp
        if resp is not None and not resp.complete:
            if not self.got_bytes:
                self._fail(_Reset())
            else:
                # A close-delimited body ends at a clean close (FIN); a reset is an error, which
                # leaves it incomplete (RFC 9112, section 8). httptools cannot be told about EOF.
                if exc is None and resp.close_delimited:
                    self.on_message_complete()
                if not resp.complete:
                    self._fail(TransportError("the upstream closed the connection mid-response" if exc is None
                                              else "the upstream reset the connection mid-response", PROTOCOL))

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # httptools callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        resp = self.resp
        if resp is None or resp.complete:
            # A response nobody asked for (bytes after a complete one): relayed, it would end up
            # in the previous body or answer the next request. The connection is closed.
            raise _Unsolicited()

    def on_status(self, status: bytes) -> None:
        assert self.resp is not None
        self.resp.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.resp is not None
        # aiohttp writes header values back as UTF-8 (surrogates dropped): decoding the same
        # way relays UTF-8 values unchanged; other non-ASCII bytes are lost, not garbled.
        self.resp.headers.append((name.decode("latin-1"),
                                  value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        resp.status = self.parser.get_status_code()
        if resp.status < 200:  # 1xx: an interim response; the real one follows
            resp.headers = []
            return
        resp.keep_alive = self.parser.should_keep_alive()
        chunked = False
        for k, v in resp.headers:
            lk = k.lower()
            if lk == "content-length" and v.isdigit():
                resp.content_length = int(v)
            elif lk == "transfer-encoding":
                chunked = v.rsplit(",", 1)[-1].strip().lower() == "chunked"
        resp.close_delimited = resp.content_length is None and not chunked
        if self.head_only:  # HEAD: no body follows, whatever Content-Length says
            resp.complete = True
            resp.keep_alive = False
        if self.head is not None and not self.head.done():
            self.head.set_result(resp)

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        assert resp is not None
        if resp.feed(body) > MAX_BUFFERED and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        resp = self.resp
        if resp is None or resp.status < 200:
            return
        resp.finish()

    # ------------------------------------------------------------------------------------
    def _fail(self, exc: Exception) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
        elif self.resp is not None:
            self.resp.fail(exc if not isinstance(exc, _Reset) else TransportError(
                "the upstream closed the connection", PROTOCOL))
        self.close()

    def begin(self, head_only: bool) -> asyncio.Future[UpstreamResponse]:
        """A request is going out: its response starts afresh; returns the future of its head."""
        self.resp = UpstreamResponse(self)
        self.head = head = asyncio.get_running_loop().create_future()
        self.got_bytes = False
        self.head_only = head_only
        return head

    def resume_if_drained(self, size: int) -> None:
        if self._reading_paused and size < MAX_BUFFERED // 2 and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    async def drain(self, timeout: float) -> None:
        if not self._can_write.is_set():
            # An upstream that stopped reading the body is as stuck as one that stopped
            # answering: the read timeout applies (TimeoutError -> 504).
            async with asyncio.timeout(timeout):
                await self._can_write.wait()
        if self.closed:
            raise _Reset()

    def release(self) -> None:
        resp = self.resp
        self.resp = None
        self.head = None
        if resp is not None and resp.keep_alive and not self.closed and not self._reading_paused:
            self.pool.put_back(self)
        else:
            self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()
        self.pool.forget(self)


def _abandon(head: asyncio.Future[UpstreamResponse] | None) -> None:
    """Nobody will await ``head`` any more: settle it, so that an error the closing connection
    sets on it later is not reported as "Future exception was never retrieved"."""
    if head is not None:
        if not head.done():
            head.cancel()
        elif not head.cancelled():
            head.exception()


def _expire_head(head: asyncio.Future[UpstreamResponse]) -> None:
    if not head.done():
        head.set_exception(TimeoutError())


class UpstreamPool:
    def __init__(self, host: str, port: int, *, connect_timeout: float, read_timeout: float,
                 max_connections: int) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._slots = asyncio.Semaphore(max_connections)
        self.host_header = f"{host}:{port}"
        # One read buffer for every connection: each read is parsed before the next, and the
        # parser copies out what it keeps (head fields, body pieces).
        self.read_buffer = memoryview(bytearray(CHUNK))

    def forget(self, conn: _Connection) -> None:
        if conn in self._all:
            self._all.discard(conn)
            self._slots.release()
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    def put_back(self, conn: _Connection) -> None:
        self._idle.append(conn)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        await self._slots.acquire()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except TimeoutError:
            self._slots.release()
            raise TransportError("connecting to the upstream timed out", TIMEOUT) from None
        except OSError as exc:
            self._slots.release()
            raise TransportError(f"cannot connect to the upstream: {exc.strerror or exc}", UNAVAILABLE) from None
        self._all.add(conn)
        return conn

    async def request(self, method: str, head: bytes, body: AsyncIterator[bytes] | None,
                      chunked: bool) -> UpstreamResponse:
        """Send one request (``head``: request line and headers, ending in a blank line) and
        return once the response headers are in. Retries once on a fresh connection when a
        pooled one turns out to be closed and no body had to be sent."""
        for attempt in (0, 1):
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await self._connect()
            if conn.closed:
                continue
            loop = asyncio.get_running_loop()
            waiter = conn.begin(method == "HEAD")
            assert conn.transport is not None
            try:
                conn.transport.write(head)
                if body is not None:
                    async for chunk in body:
                        if not chunk:
                            continue
                        conn.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                        await conn.drain(self.read_timeout)
                    if chunked:
                        conn.transport.write(b"0\r\n\r\n")
                # One timer per request (cheaper than asyncio.timeout's context machinery).
                timer = loop.call_later(self.read_timeout, _expire_head, waiter)
                try:
                    return await waiter
                finally:
                    timer.cancel()
            except _Reset:
                _abandon(conn.head)
                conn.close()
                if reused and body is None and attempt == 0:
                    continue
                raise TransportError("the upstream closed the connection", PROTOCOL) from None
            except TimeoutError:
                _abandon(conn.head)
                conn.close()
                raise TransportError("the upstream did not answer in time", TIMEOUT) from None
            except BaseException:
                _abandon(conn.head)
                conn.close()
                raise
        raise TransportError("the upstream closed the connection", PROTOCOL)

    async def close(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
