"""Redis decision store: one EVALSHA of ``decide.lua`` per request, pipelined.

Works unchanged on a single Redis, behind Sentinel and on Redis Cluster: every key of one
decision shares a hash tag, so a decision goes to the node owning that tag's slot. Errors of
any kind surface here once, as :class:`StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import binascii
import logging

from sluice_core import scripts
from sluice_core.redisurl import RedisTarget, Topology

from sluice_sidecar.resp import (
    ConnectionClosed,
    RedisReplyError,
    RespConnection,
    encode,
    open_connection,
)
from sluice_sidecar.stores.base import StoreUnavailable

log = logging.getLogger("sluice.redis")
SLOTS = 16384
Addr = tuple[str, int]


def key_slot(key: str) -> int:
    """Redis Cluster slot: CRC16-XMODEM (``binascii.crc_hqx``) of the hash tag, mod 16384."""
    s = key.find("{")
    if s >= 0:
        e = key.find("}", s + 1)
        if e > s + 1:
            key = key[s + 1:e]
    return binascii.crc_hqx(key.encode(), 0) % SLOTS


class RedisNodes:
    """Connections to the nodes of one target, (re)opened on demand, shared by the decision
    store and the config reader."""

    def __init__(self, target: RedisTarget, *, timeout: float, connect_timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._conns: dict[Addr, RespConnection] = {}
        self._locks: dict[Addr, asyncio.Lock] = {}
        self._slots: list[Addr] | None = None
        self._master: Addr | None = None
        self._ssl = target.ssl_context()
        self._refreshing: asyncio.Task[None] | None = None

    async def connect(self, addr: Addr) -> RespConnection:
        conn = self._conns.get(addr)
        if conn is not None and not conn.closed:
            return conn
        lock = self._locks.setdefault(addr, asyncio.Lock())
        async with lock:
            conn = self._conns.get(addr)
            if conn is not None and not conn.closed:
                return conn
            t = self.target
            conn = await open_connection(
                addr[0], addr[1], timeout=self.timeout, connect_timeout=self.connect_timeout,
                username=t.username, password=t.password,
                db=t.db if t.topology is not Topology.CLUSTER else 0, ssl_context=self._ssl)
            self._conns[addr] = conn
            return conn

    # Topology ---------------------------------------------------------------------------
    async def primary(self) -> Addr:
        """The address serving non-cluster commands (single Redis, or Sentinel's master)."""
        t = self.target
        if t.topology is Topology.SINGLE:
            return t.hosts[0]
        if t.topology is Topology.CLUSTER:
            return self.node_for_slot(0) if self._slots else t.hosts[0]
        if self._master is None:
            self._master = await self._ask_sentinels()
        return self._master

    async def _ask_sentinels(self) -> Addr:
        t = self.target
        for host, port in t.hosts:
            try:
                conn = await open_connection(host, port, timeout=self.timeout,
                                             connect_timeout=self.connect_timeout,
                                             password=t.sentinel_password)
                try:
                    reply = await conn.call("SENTINEL", "get-master-addr-by-name", t.master_name or "")
                finally:
                    conn.close()
                if reply:
                    return (reply[0].decode(), int(reply[1]))
            except (OSError, TimeoutError, RedisReplyError, ConnectionClosed) as exc:
                log.warning("sentinel %s:%s did not answer: %s", host, port, exc)
        raise StoreUnavailable(f"no sentinel knows master {t.master_name!r}")

    async def for_key(self, key: str) -> RespConnection:
        """The connection to the node that serves ``key`` (cluster-aware)."""
        if self.target.topology is Topology.CLUSTER:
            if self._slots is None:
                await self.refresh_slots()
            return await self.connect(self.node_for_slot(key_slot(key)))
        return await self.connect(await self.primary())

    def forget_master(self) -> None:
        self._master = None

    def node_for_slot(self, slot: int) -> Addr:
        assert self._slots is not None
        return self._slots[slot]

    async def refresh_slots(self) -> None:
        """Load the slot map with CLUSTER SLOTS from the first node that answers."""
        candidates = list(dict.fromkeys([*self.target.hosts, *self._conns]))
        last: Exception | None = None
        for addr in candidates:
            try:
                conn = await self.connect(addr)
                reply = await conn.call("CLUSTER", "SLOTS")
            except (OSError, TimeoutError, RedisReplyError, ConnectionClosed) as exc:
                last = exc
                continue
            slots: list[Addr] = [self.target.hosts[0]] * SLOTS
            for entry in reply:
                start, end, master = entry[0], entry[1], entry[2]
                host = master[0].decode() or addr[0]
                for s in range(start, end + 1):
                    slots[s] = (host, int(master[1]))
            self._slots = slots
            return
        raise StoreUnavailable(f"no cluster node answered CLUSTER SLOTS: {last}")

    def moved(self, slot: int, addr: Addr) -> None:
        if self._slots is not None:
            self._slots[slot] = addr
        self.schedule_refresh()

    def schedule_refresh(self) -> None:
        """Reload the slot map in the background (one refresh at a time): after MOVED, and
        after a node could not be reached (a failed-over master's address stays dead and
        never answers MOVED)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh_slots()
        except StoreUnavailable as exc:  # the next failed decision schedules another try
            log.warning("cluster slot map refresh failed: %s", exc)

    async def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
        if self._refreshing is not None:
            self._refreshing.cancel()


class RedisStore:
    name = "redis"

    def __init__(self, target: RedisTarget, *, timeout: float = 0.05, connect_timeout: float = 0.5) -> None:
        self.nodes = RedisNodes(target, timeout=timeout, connect_timeout=connect_timeout)
        self._script = scripts.decide()
        self._sha = self._script.sha1.encode()
        self._cluster = target.topology is Topology.CLUSTER
        self._conn: RespConnection | None = None  # single/sentinel fast path

    async def decide(self, keys: tuple[str, ...], cost: int, params: tuple[int, ...]) -> list[int]:
        payload = encode(b"EVALSHA", self._sha, len(keys), *keys, cost, *params)
        try:
            return await self._run(payload, keys, cost, params)
        except StoreUnavailable:
            raise
        except RedisReplyError as exc:
            raise StoreUnavailable(f"redis refused the decision: {str(exc)[:120]}") from exc
        except (OSError, TimeoutError, ConnectionClosed) as exc:
            self._conn = None
            if self._cluster:
                self.nodes.schedule_refresh()
            else:
                self.nodes.forget_master()
            raise StoreUnavailable(f"redis unavailable: {exc or type(exc).__name__}") from exc

    async def _run(self, payload: bytes, keys: tuple[str, ...], cost: int, params: tuple[int, ...]) -> list[int]:
        if not self._cluster:
            conn = self._conn
            if conn is None or conn.closed:
                conn = self._conn = await self.nodes.connect(await self.nodes.primary())
            try:
                result: list[int] = await conn.send(payload)
                return result
            except RedisReplyError as exc:
                if str(exc).startswith("NOSCRIPT"):
                    return await self._load_and_retry(conn, payload)
                if str(exc).startswith("READONLY"):  # Sentinel failed over under us
                    self._conn = None
                    self.nodes.forget_master()
                raise
        slot = key_slot(keys[0])
        if self.nodes._slots is None:
            await self.nodes.refresh_slots()
        for _ in range(3):
            conn = await self.nodes.connect(self.nodes.node_for_slot(slot))
            try:
                reply: list[int] = await conn.send(payload)
                return reply
            except RedisReplyError as exc:
                msg = str(exc)
                if msg.startswith("NOSCRIPT"):
                    return await self._load_and_retry(conn, payload)
                if msg.startswith("MOVED"):
                    _, _, where = msg.split(" ")
                    host, _, port = where.rpartition(":")
                    self.nodes.moved(slot, (host, int(port)))
                    continue
                if msg.startswith("ASK"):
                    _, _, where = msg.split(" ")
                    host, _, port = where.rpartition(":")
                    target = await self.nodes.connect((host, int(port)))
                    target.send(encode("ASKING"))
                    try:
                        reply = await target.send(payload)
                        return reply
                    except RedisReplyError as exc2:
                        if str(exc2).startswith("NOSCRIPT"):
                            await target.call("SCRIPT", "LOAD", self._script.source)
                            target.send(encode("ASKING"))
                            reply = await target.send(payload)
                            return reply
                        raise
                raise
        raise StoreUnavailable("cluster kept redirecting the decision")

    async def _load_and_retry(self, conn: RespConnection, payload: bytes) -> list[int]:
        # Redis restarted or SCRIPT FLUSH: load once, then the cached SHA works again.
        await conn.call("SCRIPT", "LOAD", self._script.source)
        result: list[int] = await conn.send(payload)
        return result

    async def close(self) -> None:
        await self.nodes.close()
