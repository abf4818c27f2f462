"""Where a Redis command goes: the nodes of one target (single, Sentinel, Cluster), found and
re-found on demand, one pipelining connection per node shared by the decision store and the
config reader.

A Cluster's slot map comes from ``CLUSTER SLOTS`` and follows ``MOVED``; a Sentinel's master
comes from ``SENTINEL get-master-addr-by-name`` and is asked again after a command went
unanswered or met ``READONLY``. :meth:`RedisNodes.execute` sends a command until it is answered,
following ``MOVED`` and ``ASK`` and loading its script again on ``NOSCRIPT``; every failure is a
:class:`TransportError`.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
from collections.abc import Callable
from enum import Enum
from typing import Any, NamedTuple

from sluice_core.redisurl import RedisTarget, Topology

from sluice_sidecar.transport.errors import AUTH, UNAVAILABLE, TransportError
from sluice_sidecar.transport.resp import RedisReplyError, RespConnection, encode, open_connection

log = logging.getLogger("sluice.redis")
SLOTS = 16384
Addr = tuple[str, int]
SUBSCRIBER_TIMEOUT_S = 5.0  # a pub/sub connection only waits for its SUBSCRIBE reply
SENDS = 4  # a command's tries in execute(): redirections and a script load, then it fails


def key_slot(key: str) -> int:
    """Redis Cluster slot: CRC16-XMODEM (``binascii.crc_hqx``) of the hash tag, mod 16384."""
    s = key.find("{")
    if s >= 0:
        e = key.find("}", s + 1)
        if e > s + 1:
            key = key[s + 1:e]
    return binascii.crc_hqx(key.encode(), 0) % SLOTS


class Retry(Enum):
    """How to send a command again after an error reply that a second try cures."""

    MOVED = "MOVED"  # to the slot's owner (the slot map has been corrected)
    ASK = "ASK"  # once to a slot's importing node, after ASKING (:meth:`RedisNodes.ask`)
    NOSCRIPT = "NOSCRIPT"  # on the same connection, once the script is loaded again
    READONLY = "READONLY"  # a master demoted under us: the next command goes to the master found again


class Redirect(NamedTuple):
    retry: Retry
    addr: Addr | None = None  # where to, for ASK


# The error replies :meth:`RedisNodes.execute` may cure by sending again (the decision store
# sends a batch that met one there); any other fails the command.
RETRYABLE = tuple(r.value for r in Retry)


def _address(where: str) -> Addr:
    host, _, port = where.rpartition(":")
    return host, int(port)


class RedisNodes:
    """Connections to the nodes of one target, (re)opened on demand."""

    def __init__(self, target: RedisTarget, *, timeout: float, connect_timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.cluster = target.topology is Topology.CLUSTER
        self._conns: dict[Addr, RespConnection] = {}
        self._locks: dict[Addr, asyncio.Lock] = {}
        self._slots: list[Addr] | None = None
        # The node serving non-cluster commands: a single Redis's, or Sentinel's master once asked.
        self._master: Addr | None = target.hosts[0] if target.topology is Topology.SINGLE else None
        self._ssl = target.ssl_context()
        self._refreshing: asyncio.Task[None] | None = None
        self._initial: asyncio.Future[None] | None = None
        self.preload: list[str] = []  # Lua sources loaded on every new connection

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
            try:
                conn = await open_connection(
                    addr[0], addr[1], timeout=self.timeout, connect_timeout=self.connect_timeout,
                    username=t.username, password=t.password,
                    db=t.db if not self.cluster else 0, ssl_context=self._ssl)
                try:
                    for source in self.preload:
                        await conn.call("SCRIPT", "LOAD", source, timeout=self.connect_timeout)
                except BaseException:
                    conn.close()
                    raise
            except RedisReplyError as exc:
                # Refused while connecting (AUTH, SELECT, SCRIPT LOAD; a Redis still LOADING):
                # every retry costs a new connection, so it is never an instant reason.
                reason = AUTH if exc.reason == AUTH else UNAVAILABLE
                raise TransportError(f"redis refused the connection: {str(exc)[:120]}", reason) from exc
            self._conns[addr] = conn
            return conn

    def addresses(self) -> list[Addr]:
        """The nodes decisions go to now: the slot map's masters (Cluster), else none known
        (the caller asks :meth:`primary`)."""
        return list(dict.fromkeys(self._slots)) if self._slots is not None else []

    # Where a key goes -------------------------------------------------------------------
    async def primary(self) -> Addr:
        """The address serving non-cluster commands (single Redis, or Sentinel's master)."""
        if self.cluster:
            return self.node_for_slot(0) if self._slots is not None else self.target.hosts[0]
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
            except TransportError as exc:
                log.warning("sentinel %s:%s did not answer: %s", host, port, exc)
        raise TransportError(f"no sentinel knows master {t.master_name!r}")

    async def for_key(self, key: str) -> RespConnection:
        """The connection to the node that serves ``key`` (cluster-aware)."""
        if self.cluster:
            await self.ensure_slots()
            return await self.connect(self.node_for_slot(key_slot(key)))
        return await self.connect(await self.primary())

    def ready_for(self, key: str) -> RespConnection | None:
        """The connection to ``key``'s node if the node is known and connected already (the
        fast path: no await), else None (then :meth:`for_key`). It may have closed since."""
        if self._slots is not None:
            return self._conns.get(self._slots[key_slot(key)])
        return self._conns.get(self._master) if self._master is not None else None

    def node_for_slot(self, slot: int) -> Addr:
        assert self._slots is not None
        return self._slots[slot]

    def rediscover(self) -> None:
        """A command went unanswered (timeout, connection lost or refused): the node may be
        gone. Cluster: reload the slot map in the background (a failed-over master's address
        stays dead and never answers MOVED); Sentinel: ask the sentinels at the next use."""
        if self.cluster:
            self.schedule_refresh()
        elif self.target.topology is Topology.SENTINEL:
            self._master = None

    def _redirect(self, exc: RedisReplyError, key: str) -> Redirect | None:
        """What the error reply ``exc`` to a command on ``key`` asks for, once noted here
        (MOVED corrects the slot map, READONLY forgets the demoted master); None when a second
        try would not cure it."""
        msg = str(exc)
        if not msg.startswith(RETRYABLE):
            return None
        if msg.startswith("MOVED"):
            addr = _address(msg.split(" ")[2])
            if self._slots is not None:
                self._slots[key_slot(key)] = addr
            self.schedule_refresh()
            return Redirect(Retry.MOVED)
        if msg.startswith("ASK"):
            return Redirect(Retry.ASK, _address(msg.split(" ")[2]))
        if msg.startswith("READONLY"):
            self.rediscover()
            return Redirect(Retry.READONLY)
        return Redirect(Retry.NOSCRIPT)

    async def execute(self, payload: bytes, key: str, *, reload: str | None = None) -> Any:
        """Send ``payload``, a command on ``key`` (its first key), until it is answered: to the
        slot's owner after ``MOVED``, once to the importing node after ``ASK``, on the same
        connection after loading ``reload`` (the Lua source of an ``EVALSHA``) on ``NOSCRIPT``
        (Redis restarted, or ``SCRIPT FLUSH``). Any other error reply fails it, ``READONLY``
        too: the next command goes to the master found again."""
        conn = await self.for_key(key)
        asking = False
        for _ in range(SENDS):
            try:
                return await (self.ask(conn, payload) if asking else conn.send(payload))
            except RedisReplyError as exc:
                redirect = self._redirect(exc, key)
                if redirect is None or redirect.retry is Retry.READONLY:
                    raise
                if redirect.retry is Retry.NOSCRIPT:
                    if reload is None:
                        raise
                    await conn.call("SCRIPT", "LOAD", reload, timeout=self.connect_timeout)
                elif redirect.retry is Retry.MOVED:
                    conn, asking = await self.for_key(key), False
                else:
                    assert redirect.addr is not None
                    conn, asking = await self.connect(redirect.addr), True
        raise TransportError("cluster kept redirecting the decision")

    @staticmethod
    async def ask(conn: RespConnection, payload: bytes) -> Any:
        """``payload`` on a slot's importing node: ASKING counts for the next command only, so
        both are queued in the same turn (nothing else can slip between them)."""
        _, reply = await asyncio.gather(conn.send(encode("ASKING")), conn.send(payload))
        return reply

    # Cluster slot map ----------------------------------------------------------------------
    async def ensure_slots(self) -> None:
        """Load the slot map once; concurrent callers wait for the same CLUSTER SLOTS."""
        if self._slots is not None:
            return
        if self._initial is None or self._initial.done():
            self._initial = asyncio.ensure_future(self.refresh_slots())
        await asyncio.shield(self._initial)

    async def refresh_slots(self) -> None:
        """Load the slot map with CLUSTER SLOTS from the first node that answers."""
        candidates = list(dict.fromkeys([*self.target.hosts, *self._conns]))
        last: Exception | None = None
        for addr in candidates:
            try:
                conn = await self.connect(addr)
                reply = await conn.call("CLUSTER", "SLOTS")
            except TransportError as exc:
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
        raise TransportError(f"no cluster node answered CLUSTER SLOTS: {last}")

    def schedule_refresh(self) -> None:
        """Reload the slot map in the background (one refresh at a time)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh_slots()
        except TransportError as exc:  # the next failed decision schedules another try
            log.warning("cluster slot map refresh failed: %s", exc)

    # Pub/sub -------------------------------------------------------------------------------
    async def subscribe(self, channels: tuple[str, ...], on_message: Callable[[Any], None]) -> RespConnection:
        """A connection of its own subscribed to ``channels`` (one SUBSCRIBE: Redis subscribes
        to all of them before it answers), every message handed to
        ``on_message``; its ``lost`` future says when it is gone (the caller subscribes again).
        On a Cluster any node will do (a message published on one reaches every node's
        subscribers): the configured ones first, then the slot map's; else the primary."""
        t = self.target
        candidates = (list(dict.fromkeys([*t.hosts, *self.addresses()])) if self.cluster
                      else [await self.primary()])
        last: TransportError | None = None
        for host, port in candidates:
            try:
                conn = await open_connection(
                    host, port, timeout=SUBSCRIBER_TIMEOUT_S, connect_timeout=self.connect_timeout,
                    username=t.username, password=t.password, ssl_context=self._ssl,
                    on_push=on_message)
            except TransportError as exc:
                last = exc
                continue
            try:
                await conn.call("SUBSCRIBE", *channels)  # the first channel's confirmation;
                # the others' arrive as pushes (not "message": ignored by on_message)
            except BaseException:
                conn.close()
                raise
            return conn
        self.rediscover()
        assert last is not None
        raise last

    async def close(self) -> None:
        # The slot map loads first: one finishing after this would open a connection again.
        tasks = [t for t in (self._refreshing, self._initial) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
