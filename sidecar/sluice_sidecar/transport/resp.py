"""A lean, pipelining Redis connection for the sidecar's hot path.

Why not redis-py: its asyncio client spends several times the CPU per EVALSHA (as do coredis and
valkey-glide: bench/transport.py measures them) and takes one pooled connection per concurrent
call (raising "Too many connections" past the pool size). Here every
command issued during one event-loop iteration goes out in a single write on one connection,
and replies are matched to callers in order, parsed by hiredis. Timeouts are per command and
cost one timer per batch, not one per call.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable
from typing import Any, NamedTuple

import hiredis

from sluice_sidecar.transport.errors import AUTH, OOM, REFUSED, TIMEOUT, UNAVAILABLE, TransportError

_AUTH_REPLIES = ("WRONGPASS", "NOAUTH", "NOPERM", "ERR AUTH", "ERR invalid password")


class RedisReplyError(TransportError):
    """An error reply from Redis (``-ERR ...``); the connection itself is fine. Redis's own
    words name the condition (WRONGPASS, OOM ...), never a secret; the reason follows them."""

    def __init__(self, message: str) -> None:  # hiredis builds it from the reply's text alone
        super().__init__(message, OOM if message.startswith("OOM")
                         else AUTH if message.startswith(_AUTH_REPLIES) else REFUSED)


class ConnectionClosed(TransportError):
    """The connection is gone (or was never usable): nothing more will come on it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, UNAVAILABLE)


def encode(*args: bytes | str | int) -> bytes:
    """RESP-encode one command."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def encode_mixed(*args: bytes | str | int | Encoded) -> bytes:
    """:func:`encode`, where an :class:`Encoded` argument stands for the arguments it holds."""
    out = [b""]
    n = 0
    for a in args:
        if isinstance(a, Encoded):
            out.append(a.data)
            n += a.n
            continue
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        n += 1
    out[0] = b"*%d\r\n" % n
    return b"".join(out)


class Encoded(NamedTuple):
    """Arguments encoded once and sent in many commands (a policy's tiers in every resolve)."""

    n: int  # how many arguments
    data: bytes

    @classmethod
    def of(cls, *args: bytes | str | int) -> Encoded:
        return cls(len(args), encode(*args).split(b"\r\n", 1)[1])


def _expire_one(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TransportError("redis did not answer in time", TIMEOUT))


def _is_message(reply: Any) -> bool:
    """A published message: on a subscribed connection it may arrive while a PING waits for
    its answer, and must reach ``on_push`` rather than that PING."""
    return isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message"


class RespConnection(asyncio.Protocol):
    """One connection; ``send()`` returns a future for the reply. In push mode (pub/sub) every
    reply after the subscription goes to ``on_push`` instead."""

    def __init__(self, *, timeout: float, max_pending: int = 100_000,
                 on_push: Callable[[Any], None] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._reader = hiredis.Reader(replyError=RedisReplyError)
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._deadlines: collections.deque[tuple[float, asyncio.Future[Any]]] = collections.deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._timeout = timeout
        self._max_pending = max_pending
        self._on_push = on_push
        self.closed = False
        self.lost = asyncio.get_running_loop().create_future()

    # asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiters = self._waiters
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.abort(ConnectionClosed(f"protocol error: {exc}"))
                return
            if reply is False:
                return
            if waiters and not (self._on_push is not None and _is_message(reply)):
                fut = waiters.popleft()
                if not fut.done():
                    if isinstance(reply, RedisReplyError):
                        fut.set_exception(reply)
                    else:
                        fut.set_result(reply)
            elif self._on_push is not None:
                self._on_push(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        err = ConnectionClosed(f"connection lost: {exc}" if exc else "connection closed")
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(err)
        self._deadlines.clear()
        if self._timer is not None:
            self._timer.cancel()
        if not self.lost.done():
            self.lost.set_result(None)

    # commands ---------------------------------------------------------------------------
    def send(self, payload: bytes, timeout: float | None = None) -> asyncio.Future[Any]:
        """Queue one RESP-encoded command; all commands queued in this loop iteration are
        written together. The future fails with a :class:`TransportError` (reason ``timeout``) after ``timeout`` seconds,
        with :class:`RedisReplyError` on an error reply, :class:`ConnectionClosed` when the
        connection goes."""
        fut: asyncio.Future[Any] = self._loop.create_future()
        if self.closed or self._transport is None:
            fut.set_exception(ConnectionClosed("connection closed"))
            return fut
        if len(self._waiters) >= self._max_pending:
            fut.set_exception(ConnectionClosed("too many commands waiting on this connection"))
            return fut
        self._waiters.append(fut)
        self._out.append(payload)
        if timeout is None or timeout == self._timeout:
            # Same timeout for all: send order is deadline order, one timer serves the batch.
            deadline = self._loop.time() + self._timeout
            self._deadlines.append((deadline, fut))
            if self._timer is None:
                self._timer = self._loop.call_at(deadline, self._expire)
        else:
            # Another timeout would break that order (a short one queued behind a long one
            # would wait for the long one): it gets a timer of its own.
            handle = self._loop.call_later(timeout, _expire_one, fut)
            fut.add_done_callback(lambda _: handle.cancel())
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self._transport is not None and not self.closed:
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out.clear()
            self._transport.write(data)

    def _expire(self) -> None:
        self._timer = None
        now = self._loop.time()
        deadlines = self._deadlines
        while deadlines:
            deadline, fut = deadlines[0]
            if fut.done():
                deadlines.popleft()
                continue
            if deadline > now:
                self._timer = self._loop.call_at(deadline, self._expire)
                return
            deadlines.popleft()
            fut.set_exception(TransportError("redis did not answer in time", TIMEOUT))
        # The reply may still come; it will be matched to the (done) future and dropped. A
        # connection whose oldest reply is far overdue is stalled: drop it so the next use
        # reconnects instead of queueing behind it.
        if self._waiters and self._waiters[0].done() and len(self._waiters) > 1000:
            self.abort(ConnectionClosed("connection stalled"))

    async def call(self, *args: bytes | str | int, timeout: float | None = None) -> Any:
        return await self.send(encode(*args), timeout)

    def abort(self, exc: Exception | None = None) -> None:
        if self._transport is not None:
            self._transport.abort()
        self.connection_lost(exc)

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.close()


async def open_connection(host: str, port: int, *, timeout: float, connect_timeout: float,
                          username: str | None = None, password: str | None = None, db: int = 0,
                          ssl_context: ssl.SSLContext | None = None,
                          on_push: Callable[[Any], None] | None = None) -> RespConnection:
    """Connect, authenticate and select the database; raise :class:`TransportError` on failure
    (:class:`RedisReplyError` when Redis refused AUTH or SELECT, :class:`ConnectionClosed` when
    no connection could be made, reason ``timeout`` when none was made in time)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            _, conn = await loop.create_connection(
                lambda: RespConnection(timeout=timeout, on_push=on_push), host, port, ssl=ssl_context,
                server_hostname=host if ssl_context else None)
            try:
                if password is not None:
                    await conn.call(*(["AUTH", username, password] if username else ["AUTH", password]),
                                    timeout=connect_timeout)
                if db:
                    await conn.call("SELECT", db, timeout=connect_timeout)
            except BaseException:
                conn.close()
                raise
    except TransportError:
        raise
    except TimeoutError:
        raise TransportError(f"connecting to redis at {host}:{port} timed out", TIMEOUT) from None
    except OSError as exc:
        raise ConnectionClosed(f"cannot connect to redis at {host}:{port}: {exc.strerror or exc}") from exc
    return conn
