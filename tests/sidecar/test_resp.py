"""The sidecar's pipelining Redis connection (:mod:`sluice_sidecar.transport.resp`) against a real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sluice_sidecar.transport.errors import (
    AUTH,
    OOM,
    REFUSED,
    TIMEOUT,
    UNAVAILABLE,
    TransportError,
)
from sluice_sidecar.transport.resp import (
    ConnectionClosed,
    RedisReplyError,
    RespConnection,
    encode,
    open_connection,
)
from support.redis_servers import RedisServer, pick_port


class CountingTransport:
    """Wraps a transport to count ``write`` calls (one per coalesced batch)."""

    def __init__(self, inner: asyncio.Transport) -> None:
        self.inner = inner
        self.writes: list[int] = []

    def write(self, data: bytes) -> None:
        self.writes.append(len(data))
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def connect(server: RedisServer, timeout: float = 1.0, **kw: Any) -> RespConnection:
    return await open_connection(server.host, server.port, timeout=timeout, connect_timeout=1.0,
                                 **kw)


@pytest.fixture
async def conn(redis_server: RedisServer) -> AsyncIterator[RespConnection]:
    c = await connect(redis_server)
    try:
        yield c
    finally:
        c.close()


def test_encode() -> None:
    assert encode(b"GET", "k", 12) == b"*3\r\n$3\r\nGET\r\n$1\r\nk\r\n$2\r\n12\r\n"
    assert encode("SET", "é", b"") == b"*3\r\n$3\r\nSET\r\n$2\r\n\xc3\xa9\r\n$0\r\n\r\n"


async def test_concurrent_sends_coalesce_into_one_write(conn: RespConnection) -> None:
    counting = CountingTransport(conn._transport)  # type: ignore[arg-type]
    conn._transport = counting  # type: ignore[assignment]
    n = 1000
    futs = [conn.send(encode("ECHO", f"msg-{i}")) for i in range(n)]
    assert counting.writes == []  # nothing written until the loop runs
    replies = await asyncio.gather(*futs)
    assert replies == [f"msg-{i}".encode() for i in range(n)]
    assert len(counting.writes) == 1  # one write for the whole batch


async def test_concurrent_callers_get_their_own_replies_in_order(conn: RespConnection) -> None:
    key = f"test:resp:{uuid.uuid4().hex}"

    async def caller(i: int) -> tuple[int, bytes, int]:
        await asyncio.sleep(0)  # spread the callers over a few loop iterations
        if i % 3:
            await asyncio.sleep(0)
        echo = await conn.call("ECHO", f"caller-{i}")
        count = await conn.call("INCR", key)
        return i, echo, count

    results = await asyncio.gather(*(caller(i) for i in range(500)))
    for i, echo, _ in results:
        assert echo == f"caller-{i}".encode()
    counts = sorted(c for _, _, c in results)
    assert counts == list(range(1, 501))  # every INCR reply went to exactly one caller
    # Replies come back in the order the commands were sent.
    futs = [conn.send(encode("INCR", key)) for _ in range(200)]
    assert await asyncio.gather(*futs) == list(range(501, 701))
    await conn.call("DEL", key)


async def test_error_reply_fails_only_its_caller(conn: RespConnection) -> None:
    key = f"test:resp:{uuid.uuid4().hex}"
    await conn.call("SET", key, "not a number")
    futs = []
    for i in range(30):
        futs.append(conn.send(encode("ECHO", f"ok-{i}")))
        futs.append(conn.send(encode("INCR", key)))  # ERR value is not an integer
    futs.append(conn.send(encode("NOSUCHCOMMAND")))
    results = await asyncio.gather(*futs, return_exceptions=True)
    for i in range(30):
        assert results[2 * i] == f"ok-{i}".encode()
        err = results[2 * i + 1]
        assert isinstance(err, RedisReplyError) and "not an integer" in str(err)
    assert isinstance(results[-1], RedisReplyError)
    with pytest.raises(RedisReplyError, match=r"WRONGTYPE|not an integer"):
        await conn.call("INCR", key)
    assert not conn.closed
    assert await conn.call("PING") == b"PONG"  # the connection itself is fine
    await conn.call("DEL", key)


async def test_timeout_on_a_paused_server(fresh_redis: RedisServer) -> None:
    conn = await connect(fresh_redis, timeout=0.05)
    try:
        assert await conn.call("PING") == b"PONG"
        fresh_redis.pause()
        try:
            t0 = time.monotonic()
            with pytest.raises(TransportError, match="did not answer in time"):
                await conn.call("ECHO", "late")
            elapsed = time.monotonic() - t0
            assert 0.04 <= elapsed < 0.5, elapsed
            # Many at once: one timer, every caller still fails in bounded time.
            t0 = time.monotonic()
            results = await asyncio.gather(*(conn.call("ECHO", f"x{i}") for i in range(100)),
                                           return_exceptions=True)
            assert time.monotonic() - t0 < 0.5
            assert all(isinstance(r, TransportError) and r.reason == TIMEOUT for r in results)
            # A per-call timeout overrides the connection's.
            t0 = time.monotonic()
            with pytest.raises(TransportError, match="did not answer in time"):
                await conn.call("PING", timeout=0.01)
            assert time.monotonic() - t0 < 0.5
        finally:
            fresh_redis.resume()
        # The late replies arrive and are dropped; the next caller gets its own reply.
        assert await asyncio.wait_for(conn.call("ECHO", "mine", timeout=2.0), 5) == b"mine"
        assert not conn.closed
    finally:
        conn.close()


async def test_short_timeout_behind_a_long_one_still_expires_in_time(
        fresh_redis: RedisServer) -> None:
    """Deadlines are not always in send order (per-call timeouts): a 50 ms command queued after
    a 5 s one must still fail after about 50 ms, not after 5 s."""
    conn = await connect(fresh_redis, timeout=0.05)
    try:
        fresh_redis.pause()
        try:
            slow = conn.send(encode("PING"), timeout=5.0)
            t0 = time.monotonic()
            with pytest.raises(TransportError, match="did not answer in time"):
                await asyncio.wait_for(conn.call("ECHO", "fast"), 2.0)
            assert time.monotonic() - t0 < 0.5
            assert not slow.done()
        finally:
            fresh_redis.resume()
        assert await asyncio.wait_for(slow, 5) == b"PONG"
    finally:
        conn.close()


async def test_connection_loss_fails_pending_futures(fresh_redis: RedisServer) -> None:
    conn = await connect(fresh_redis, timeout=10.0)
    assert await conn.call("PING") == b"PONG"
    fresh_redis.pause()  # commands stay pending...
    futs = [conn.send(encode("ECHO", f"p{i}")) for i in range(10)]
    await asyncio.sleep(0)  # let the batch be written
    fresh_redis.kill()  # ...until the server dies (SIGKILL works on a stopped process)
    t0 = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 5)
    assert time.monotonic() - t0 < 2.0
    assert all(isinstance(r, ConnectionClosed) for r in results), results
    assert conn.closed
    assert conn.lost.done()
    with pytest.raises(ConnectionClosed):  # later sends fail at once
        await conn.call("PING")


async def test_server_closing_the_connection_fails_pending_futures(
        redis_server: RedisServer) -> None:
    conn = await connect(redis_server, timeout=10.0)
    try:
        my_id = await conn.call("CLIENT", "ID")
        blocked = conn.send(encode("BLPOP", f"test:resp:{uuid.uuid4().hex}", 0))
        behind = conn.send(encode("PING"))
        # Wait until the server is really blocked in BLPOP (not a fixed sleep).
        deadline = time.monotonic() + 5
        while b"cmd=blpop" not in redis_server.execute("CLIENT", "LIST", "ID", my_id):
            assert time.monotonic() < deadline, "BLPOP never reached the server"
            await asyncio.sleep(0.01)
        assert not blocked.done()
        assert redis_server.execute("CLIENT", "KILL", "ID", my_id) == 1
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(blocked, 5)
        with pytest.raises(ConnectionClosed):
            await behind
        await asyncio.wait_for(conn.lost, 5)
        assert conn.closed
    finally:
        conn.close()


async def test_too_many_pending_commands_are_refused(redis_server: RedisServer) -> None:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: RespConnection(timeout=1.0, max_pending=3),
                                           redis_server.host, redis_server.port)
    try:
        futs = [conn.send(encode("PING")) for _ in range(4)]
        results = await asyncio.gather(*futs, return_exceptions=True)
        assert results[:3] == [b"PONG"] * 3
        assert isinstance(results[3], ConnectionClosed)
        assert await conn.call("PING") == b"PONG"  # room again once replies arrived
    finally:
        conn.close()


async def test_protocol_garbage_closes_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"?this is not RESP\r\n")
        await writer.drain()
        await reader.read(100)
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: RespConnection(timeout=2.0),
                                               "127.0.0.1", port)
        fut = conn.send(encode("PING"))
        with pytest.raises(ConnectionClosed, match="protocol error"):
            await asyncio.wait_for(fut, 5)
        assert conn.closed
    finally:
        server.close()
        await server.wait_closed()


async def test_push_mode_delivers_messages(redis_server: RedisServer) -> None:
    got: list[Any] = []
    arrived = asyncio.Event()

    def on_push(msg: Any) -> None:
        got.append(msg)
        arrived.set()

    channel = f"test:resp:{uuid.uuid4().hex}"
    sub = await connect(redis_server, on_push=on_push)
    try:
        # The subscription's confirmation answers the SUBSCRIBE; messages go to on_push.
        assert await sub.call("SUBSCRIBE", channel) == [b"subscribe", channel.encode(), 1]
        assert redis_server.execute("PUBLISH", channel, "hello") == 1
        await asyncio.wait_for(arrived.wait(), 5)
        assert got == [[b"message", channel.encode(), b"hello"]]
    finally:
        sub.close()


async def test_open_connection_authenticates_and_selects(fresh_redis: RedisServer) -> None:
    fresh_redis.execute("CONFIG", "SET", "requirepass", "s3cret")
    with pytest.raises(RedisReplyError):
        await connect(fresh_redis, password="wrong")
    conn = await connect(fresh_redis, password="s3cret", db=3)
    try:
        await conn.call("SET", "k", "v")
        with fresh_redis.client(password="s3cret", db=3) as r:
            assert r.get("k") == b"v"
    finally:
        conn.close()


async def test_every_failure_is_one_error_type_with_its_reason(fresh_redis: RedisServer) -> None:
    """Callers catch TransportError alone and branch on ``reason`` (the store's metric label)."""
    with pytest.raises(TransportError) as refused:  # nothing listens there
        await open_connection("127.0.0.1", pick_port(), timeout=1.0, connect_timeout=1.0)
    assert refused.value.reason == UNAVAILABLE
    blocked = await connect(fresh_redis, timeout=0.2)
    try:
        with pytest.raises(TransportError) as slow:
            await blocked.call("BLPOP", f"test:resp:{uuid.uuid4().hex}", 0)
        assert slow.value.reason == TIMEOUT
    finally:
        blocked.close()
    conn = await connect(fresh_redis)
    try:
        await conn.call("SET", "s", "v")
        with pytest.raises(TransportError) as wrong_type:
            await conn.call("LPUSH", "s", "x")
        assert wrong_type.value.reason == REFUSED
        fresh_redis.execute("CONFIG", "SET", "maxmemory-policy", "noeviction")
        fresh_redis.execute("CONFIG", "SET", "maxmemory", "1")
        with pytest.raises(TransportError) as full:
            await conn.call("SET", "k", "v")
        assert full.value.reason == OOM
        fresh_redis.execute("CONFIG", "SET", "maxmemory", "0")
    finally:
        conn.close()
    with pytest.raises(TransportError) as lost:
        await conn.call("PING")
    assert lost.value.reason == UNAVAILABLE
    fresh_redis.execute("CONFIG", "SET", "requirepass", "s3cret")
    with pytest.raises(TransportError) as auth:
        await connect(fresh_redis, password="wrong")
    assert auth.value.reason == AUTH
