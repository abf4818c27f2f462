"""Redis decision store: one EVALSHA of ``decide.lua`` per request, pipelined.

Works unchanged on a single Redis, behind Sentinel and on Redis Cluster: every key of one
decision shares a hash tag, so a decision goes to the node owning that tag's slot. Errors of
any kind surface here once, as :class:`StoreUnavailable` with a reason (:func:`reason_of`).

Every new connection loads the decision script before it carries anything else, so a Redis that
restarted (its script cache empty) never answers ``NOSCRIPT`` to the decisions pipelined on the
connection that replaced the lost one; ``NOSCRIPT`` is still handled (``SCRIPT FLUSH``) by
loading the script and sending the batch again, for every batch that met it.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
from collections.abc import Coroutine
from typing import Any

from sluice_core import keyschema, scripts
from sluice_core.gcra import Decision, expand
from sluice_core.redisurl import RedisTarget, Topology

from sluice_sidecar.resp import (
    ConnectionClosed,
    RedisReplyError,
    RespConnection,
    encode,
    open_connection,
)
from sluice_sidecar.stores.base import AUTH, OOM, REFUSED, TIMEOUT, UNAVAILABLE, StoreUnavailable

log = logging.getLogger("sluice.redis")
SLOTS = 16384
Addr = tuple[str, int]
# Error replies a second try can cure (script cache emptied, cluster redirection, failover):
# a batch that meets one is sent again on the careful path; any other error reply fails it.
RETRYABLE = ("NOSCRIPT", "MOVED", "ASK", "READONLY")
PROBE_KEY = f"{keyschema.PREFIX}:probe"  # read by the probe (cost 0), never written; no bucket's name
PROBE_EM_US = 1_000_000


def reason_of(exc: BaseException) -> str:
    """The ``reason`` of a failure (metrics label, ERROR log line, /readyz)."""
    if isinstance(exc, StoreUnavailable):
        return exc.reason
    if isinstance(exc, TimeoutError):
        return TIMEOUT
    if isinstance(exc, RedisReplyError):
        msg = str(exc)
        if msg.startswith("OOM"):
            return OOM
        if msg.startswith(("WRONGPASS", "NOAUTH", "NOPERM", "ERR AUTH", "ERR invalid password")):
            return AUTH
        return REFUSED
    return UNAVAILABLE


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
                    db=t.db if t.topology is not Topology.CLUSTER else 0, ssl_context=self._ssl)
                try:
                    for source in self.preload:
                        await conn.call("SCRIPT", "LOAD", source, timeout=self.connect_timeout)
                except BaseException:
                    conn.close()
                    raise
            except RedisReplyError as exc:
                # Refused while connecting (AUTH, SELECT, SCRIPT LOAD; a Redis still LOADING):
                # every retry costs a new connection, so it is never an instant reason.
                reason = AUTH if reason_of(exc) == AUTH else UNAVAILABLE
                raise StoreUnavailable(f"redis refused the connection: {str(exc)[:120]}", reason) from exc
            self._conns[addr] = conn
            return conn

    def addresses(self) -> list[Addr]:
        """The nodes decisions go to now: the slot map's masters (Cluster), else none known
        (the caller asks :meth:`primary`)."""
        return list(dict.fromkeys(self._slots)) if self._slots is not None else []

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
            await self.ensure_slots()
            return await self.connect(self.node_for_slot(key_slot(key)))
        return await self.connect(await self.primary())

    def ready_for(self, key: str) -> RespConnection | None:
        """The open connection to ``key``'s node if the slot map and connection exist (the
        cluster fast path: no await), else None."""
        if self._slots is None:
            return None
        return self._conns.get(self._slots[key_slot(key)])

    def forget_master(self) -> None:
        self._master = None

    def node_for_slot(self, slot: int) -> Addr:
        assert self._slots is not None
        return self._slots[slot]

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
            except (OSError, TimeoutError, RedisReplyError, ConnectionClosed, StoreUnavailable) as exc:
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


Pending = tuple[tuple[str, ...], int, tuple[int, ...], "asyncio.Future[Decision]"]


class RedisStore:
    """Decisions asked for during one event-loop turn go to Redis as one script run (per slot
    on a Cluster), so the script's fixed cost (call, ``TIME``, reply) is paid once per batch;
    batches themselves are pipelined on one connection per node."""

    name = "redis"

    def __init__(self, target: RedisTarget, *, timeout: float = 0.05, connect_timeout: float = 0.5,
                 max_batch: int = 64) -> None:
        self.nodes = RedisNodes(target, timeout=timeout, connect_timeout=connect_timeout)
        self._script = scripts.decide()
        self.nodes.preload.append(self._script.source)
        self._sha = self._script.sha1.encode()
        self._cluster = target.topology is Topology.CLUSTER
        self._conn: RespConnection | None = None  # single/sentinel fast path
        self._pending: list[Pending] = []
        self._flush_scheduled = False
        self.max_batch = max_batch
        self._tasks: set[asyncio.Future[None]] = set()
        self.batches = 0  # script runs sent (decisions / batches = mean batch size)
        self.decisions = 0

    async def decide(self, keys: tuple[str, ...], cost: int, params: tuple[int, ...]) -> Decision:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Decision] = loop.create_future()
        self._pending.append((keys, cost, params, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await fut

    def atomic(self, keys: tuple[str, ...]) -> bool:
        """One script call can take keys of any hash tags, except on a Cluster (one slot)."""
        return not self._cluster or len({key_slot(k) for k in keys}) == 1

    # Batching -------------------------------------------------------------------------------
    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        if self._cluster:
            by_slot: dict[int, list[Pending]] = {}
            for item in pending:
                by_slot.setdefault(key_slot(item[0][0]), []).append(item)
            groups = list(by_slot.values())
        else:
            groups = [pending]
        for group in groups:
            for i in range(0, len(group), self.max_batch):
                self._send(group[i:i + self.max_batch])

    def _payload(self, group: list[Pending]) -> bytes:
        keys: list[str] = []
        argv: list[int] = [len(group)]
        for k, cost, params, _ in group:
            keys.extend(k)
            argv.append(len(k))
            argv.append(cost)
            argv.extend(params)
        return encode(b"EVALSHA", self._sha, len(keys), *keys, *argv)

    def _send(self, group: list[Pending]) -> None:
        group = [g for g in group if not g[3].done()]  # callers that went away
        if not group:
            return
        self.batches += 1
        self.decisions += len(group)
        payload = self._payload(group)
        conn = self._conn if not self._cluster else self.nodes.ready_for(group[0][0][0])
        if conn is not None and not conn.closed:
            conn.send(payload).add_done_callback(lambda f: self._sent(group, payload, f))
        else:
            self._spawn(self._send_slowly(group, payload))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

    def _sent(self, group: list[Pending], payload: bytes, f: asyncio.Future[Any]) -> None:
        exc = f.exception() if not f.cancelled() else ConnectionClosed("cancelled")
        if exc is None:
            self._distribute(group, f.result())
        elif isinstance(exc, RedisReplyError) and str(exc).startswith(RETRYABLE):
            # The careful path: e.g. every batch pipelined behind the first NOSCRIPT met it too,
            # and each is sent again (after the script is loaded), none failed.
            self._spawn(self._send_slowly(group, payload))
        else:
            self._fail(group, exc)

    async def _send_slowly(self, group: list[Pending], payload: bytes) -> None:
        try:
            reply = await self._execute(payload, group[0][0][0])
        except BaseException as exc:  # every caller must hear back, whatever happened
            self._fail(group, exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._distribute(group, reply)

    @staticmethod
    def _distribute(group: list[Pending], reply: list[int]) -> None:
        at = 0
        for keys, cost, params, fut in group:
            n = len(keys)
            if not fut.done():
                fut.set_result(expand(reply[at], reply[at + 1:at + 1 + n], cost, params))
            at += 1 + n

    def _fail(self, group: list[Pending], exc: BaseException) -> None:
        err = self._wrap(exc)
        for _, _, _, fut in group:
            if not fut.done():
                fut.set_exception(err)

    def _wrap(self, exc: BaseException) -> StoreUnavailable:
        """Every failure leaves the store as one StoreUnavailable (the cause kept too)."""
        if isinstance(exc, StoreUnavailable):
            return exc
        reason = reason_of(exc)
        if isinstance(exc, RedisReplyError):
            # Redis's own words: they name the condition (WRONGPASS, OOM ...), never a secret.
            err = StoreUnavailable(f"redis refused: {str(exc)[:120]}", reason)
        else:
            self._conn = None
            if self._cluster:
                self.nodes.schedule_refresh()
            else:
                self.nodes.forget_master()
            err = StoreUnavailable(f"redis unavailable: {exc or type(exc).__name__}", reason)
        err.__cause__ = exc
        return err

    async def probe(self) -> None:
        """Can decisions go through now? Do what a decision does, under the decision timeout:
        on every node decisions go to, connect (authenticate; a new connection loads the
        decision script) and run the script once, reading one bucket (cost 0: nothing is
        written). A Redis that answers, but slower than ``--redis-timeout-ms``, fails the probe
        as it fails decisions, so the breaker stays open instead of closing for requests that
        would time out. The circuit breaker calls this while open, and once at start."""
        try:
            if self._cluster:
                await self.nodes.refresh_slots()
                addrs = self.nodes.addresses()
            else:
                addrs = [await self.nodes.primary()]
            for addr in addrs:
                conn = await self.nodes.connect(addr)
                payload = encode(b"EVALSHA", self._sha, 1, self._probe_key(addr), 1, 1, 0,
                                 PROBE_EM_US, PROBE_EM_US)
                try:
                    await conn.send(payload, self.nodes.timeout)
                except RedisReplyError as exc:
                    if not str(exc).startswith("NOSCRIPT"):  # a cached connection, then SCRIPT FLUSH
                        raise
                    await conn.call("SCRIPT", "LOAD", self._script.source, timeout=self.nodes.connect_timeout)
                    await conn.send(payload, self.nodes.timeout)
                if not self._cluster:
                    self._conn = conn
        except (OSError, TimeoutError, RedisReplyError, ConnectionClosed, StoreUnavailable) as exc:
            raise self._wrap(exc)  # noqa: B904 - the cause is kept in __cause__

    def _probe_key(self, addr: Addr) -> str:
        """A key no bucket uses, on ``addr``'s slots (Cluster: the first hash tag found there)."""
        if not self._cluster:
            return PROBE_KEY
        for i in range(SLOTS * 8):
            key = f"{{{PROBE_KEY}-{i}}}"
            if self.nodes.node_for_slot(key_slot(key)) == addr:
                return key
        return PROBE_KEY  # pragma: no cover - every master in the slot map owns a slot

    # One script run, with reconnects, NOSCRIPT and cluster redirections -----------------------
    async def _execute(self, payload: bytes, first_key: str) -> list[int]:
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
        slot = key_slot(first_key)
        await self.nodes.ensure_slots()
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
                    return await self._ask(await self.nodes.connect((host, int(port))), payload)
                raise
        raise StoreUnavailable("cluster kept redirecting the decision")

    async def _ask(self, target: RespConnection, payload: bytes) -> list[int]:
        """A slot being migrated: ASKING, then the script, on the importing node."""
        for attempt in (0, 1):
            asking = target.send(encode("ASKING"))
            run = target.send(payload)
            try:
                await asking
                reply: list[int] = await run
                return reply
            except RedisReplyError as exc:
                if attempt == 0 and str(exc).startswith("NOSCRIPT"):
                    await target.call("SCRIPT", "LOAD", self._script.source)
                    continue
                raise
        raise StoreUnavailable("unreachable")  # pragma: no cover

    async def _load_and_retry(self, conn: RespConnection, payload: bytes) -> list[int]:
        # Redis restarted or SCRIPT FLUSH: load once, then the cached SHA works again.
        await conn.call("SCRIPT", "LOAD", self._script.source)
        result: list[int] = await conn.send(payload)
        return result

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.nodes.close()
