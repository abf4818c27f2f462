"""The control plane's Redis boundary (``sluice apply``, the operator), on redis.asyncio: the
config documents, the sidecars' heartbeats and the memory settings, read and written here only.
Every redis-py error is wrapped here, once, in :class:`ConfigStoreError`; none of them holds
the URL's password. The sidecar reads the same keys with its own lean client; both follow
:mod:`sluice_core.keyschema`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import redis.asyncio
import redis.asyncio.cluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from sluice_core import grants, keyschema, scripts
from sluice_core.configdoc import NamespaceConfig, build_doc, load_doc, placeholder_doc
from sluice_core.redisurl import RedisTarget, Topology, parse_redis_url

# A Cluster client that cannot reach any node raises RedisClusterException, which is no
# RedisError: both mean "Redis did not answer".
REDIS_FAILURES = (RedisError, RedisClusterException)
"""What a failed Redis call raises: every writer of the config store catches these (and wraps
them in :class:`ConfigStoreError`)."""


class ConfigStoreError(RuntimeError):
    """Redis could not be reached or refused a config operation (wrapped once, here)."""


@dataclass(eq=False)
class Client:
    """A Redis of any supported URL: ``redis`` sends the commands (a single node, Sentinel's
    current master, or a Cluster); ``sentinel`` holds the connections to the Sentinels that
    name the master, closed with it. Connects at its first command, so it may be made outside
    the event loop that uses it; use it in one loop only and :meth:`aclose` it there."""

    redis: redis.asyncio.Redis | redis.asyncio.RedisCluster
    sentinel: Sentinel | None = None

    async def aclose(self) -> None:
        await self.redis.aclose()
        if self.sentinel is not None:
            await self.sentinel.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


def connect(url: str | RedisTarget, *, timeout: float = 5.0) -> Client:
    """A client for any supported URL (single, TLS, Sentinel, Cluster); ``ValueError`` for a bad
    URL. ``timeout`` bounds every connect and every reply, the Sentinels' too, so a hung Redis
    ends a call with an error instead of holding the awaiting task forever: after at most
    2 × ``timeout`` and half a second of back-off. One retry covers a connection dropped at a
    failover; redis-py's default of ten would hold a reconcile (and its namespace's lock) for a
    minute against a Redis that accepts connections but never answers."""
    t = parse_redis_url(url) if isinstance(url, str) else url
    common: dict[str, Any] = {"username": t.username, "password": t.password,
                              "socket_timeout": timeout, "socket_connect_timeout": timeout,
                              "retry": Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), 1)}
    if t.tls:
        common.update(ssl=True, ssl_ca_certs=t.ssl_ca_certs, ssl_certfile=t.ssl_certfile,
                      ssl_keyfile=t.ssl_keyfile, ssl_cert_reqs="required" if t.ssl_verify else "none")
    if t.topology is Topology.CLUSTER:
        nodes = [redis.asyncio.cluster.ClusterNode(h, p) for h, p in t.hosts]
        return Client(redis.asyncio.RedisCluster(startup_nodes=nodes, **common))
    if t.topology is Topology.SENTINEL:
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(t.hosts), sentinel_kwargs={"password": t.sentinel_password, "socket_timeout": timeout,
                                            "socket_connect_timeout": timeout},
            **common)
        return Client(sentinel.master_for(t.master_name or "", db=t.db), sentinel)
    host, port = t.hosts[0]
    return Client(redis.asyncio.Redis(host=host, port=port, db=t.db, **common))


async def publish(client: Client, namespace: str, doc: str, *, min_version: int = 0) -> int:
    """Write ``doc`` as the namespace's config and announce it; return the new version."""
    s = scripts.publish_config()
    try:
        v = await client.redis.eval(s.source, 1, keyschema.config_key(namespace), doc,
                                    str(min_version), keyschema.CONFIG_CHANNEL, namespace)
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot write config for namespace {namespace!r}: {exc}") from exc
    return int(v)


async def ensure(client: Client, namespace: str, *, min_version: int = 0) -> int:
    """Create the namespace's placeholder document (no policies) if it has no document at all,
    and announce it; return its version, or 0 when a document was there (it stays untouched)."""
    s = scripts.publish_config()
    try:
        v = await client.redis.eval(s.source, 1, keyschema.config_key(namespace),
                                    placeholder_doc(namespace), str(min_version),
                                    keyschema.CONFIG_CHANNEL, namespace, "missing")
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot create config for namespace {namespace!r}: {exc}") from exc
    return int(v)


async def stored_version(client: Client, namespace: str) -> int | None:
    """The version of the namespace's document (None: there is none)."""
    try:
        value = await client.redis.hget(keyschema.config_key(namespace), "version")
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot read config for namespace {namespace!r}: {exc}") from exc
    return None if value is None else int(value)


async def exists(client: Client, namespace: str) -> bool:
    """Does Redis hold a document for the namespace?"""
    try:
        return bool(await client.redis.hexists(keyschema.config_key(namespace), "doc"))
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot read config for namespace {namespace!r}: {exc}") from exc


async def drop_if_empty(client: Client, namespace: str) -> bool:
    """Remove the namespace's config if it is the empty document its last policy left (for a
    namespace gone for good); True when it was removed."""
    s = scripts.drop_empty_config()
    try:
        return bool(await client.redis.eval(s.source, 1, keyschema.config_key(namespace),
                                            build_doc(namespace, [])))
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot remove config of namespace {namespace!r}: {exc}") from exc


async def read_raw(client: Client, namespace: str) -> tuple[int, str] | None:
    """The stored ``(version, JSON document)``, unparsed; None when there is none."""
    try:
        version, doc = await client.redis.hmget(keyschema.config_key(namespace), ["version", "doc"])
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot read config for namespace {namespace!r}: {exc}") from exc
    if version is None or doc is None:
        return None
    return int(version), doc.decode() if isinstance(doc, bytes) else str(doc)


async def read(client: Client, namespace: str) -> NamespaceConfig | None:
    raw = await read_raw(client, namespace)
    return load_doc(raw[1], raw[0]) if raw is not None else None


async def heartbeats(client: Client, namespace: str) -> dict[bytes | str, bytes | str]:
    """The namespace's sidecar heartbeats: pod name -> value (:func:`keyschema.parse_heartbeat`)."""
    try:
        return await client.redis.hgetall(keyschema.heartbeat_key(namespace))
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot read heartbeats of namespace {namespace!r}: {exc}") from exc


async def legacy_heartbeat_namespaces(client: Client, namespaces: Sequence[str], chunk: int = 1000) -> list[str]:
    """Which of ``namespaces`` have a per-namespace heartbeat hash (sidecars of the oldest
    releases write one; it expires with them). As :func:`missing_configs`: on one Redis one
    EXISTS counts a thousand at a time, and only when some exist are they looked at one by one."""
    if not namespaces:
        return []
    keys = [keyschema.heartbeat_key(ns) for ns in namespaces]
    try:
        if not isinstance(client.redis, redis.asyncio.RedisCluster):
            found = 0
            for start in range(0, len(keys), chunk):
                found += int(await client.redis.exists(*keys[start:start + chunk]))
            if not found:
                return []
        pipe = client.redis.pipeline(transaction=False)
        for ns in namespaces:
            pipe.exists(keyschema.heartbeat_key(ns))
        there = await pipe.execute()
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot look for per-namespace heartbeats: {exc}") from exc
    return [ns for ns, n in zip(namespaces, there, strict=True) if n]


async def drop_heartbeats(client: Client, namespace: str, pods: Sequence[bytes | str]) -> None:
    """Remove the heartbeats of these pods (stale ones: their sidecars are gone)."""
    if not pods:
        return
    try:
        await client.redis.hdel(keyschema.heartbeat_key(namespace), *pods)
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot prune heartbeats of namespace {namespace!r}: {exc}") from exc


async def put_grant(client: Client, policy_ref: str, key_sha256: bytes, stored: grants.StoredGrant) -> None:
    """Write one API key's grant under one policy (``namespace/name``, or a cluster policy's
    name) and announce it. No TTL: the value carries the expiry (the decision script refuses an
    expired grant; ``sluice apply`` prunes them). The primitive every writer of
    one grant builds on: one key change is this write, its entry in the policy's key index
    (:func:`keyschema.grant_index_key`) and one notice, whatever the number of keys; many keys
    at once: :mod:`sluice_core.grantstore`."""
    await _write_grant(client, policy_ref, key_sha256, grants.encode(stored, policy_ref), stored.expires_ms)


async def revoke_grant(client: Client, policy_ref: str, key_sha256: bytes) -> None:
    """Remove one API key's grant under one policy (and its index entry, after it) and announce
    it (a revoked key is refused everywhere as soon as sidecars hear the notice)."""
    await _write_grant(client, policy_ref, key_sha256, "", 0)


async def _write_grant(client: Client, policy_ref: str, key_sha256: bytes, value: str, expires_ms: int) -> None:
    # expires_ms: the value carries it; the grant has no TTL (write_grant.lua says why).
    del expires_ms
    pid = keyschema.policy_id(policy_ref)
    client_id = keyschema.client_for_api_key(key_sha256)
    key, index = keyschema.grant_key(pid, client_id), keyschema.grant_index_key(pid)
    lease, touched = keyschema.grant_lease_key(pid), keyschema.grant_touched_key(pid)
    args = (value, keyschema.KEYS_CHANNEL, keyschema.keys_notice(pid, client_id), client_id)
    s, note = scripts.write_grant(), scripts.note_grant()
    r = client.redis
    try:
        if not isinstance(r, redis.asyncio.RedisCluster):  # one call takes the grant and the index
            await r.eval(s.source, 4, key, index, lease, touched, *args)
        elif value:  # the index first: it must list every granted key (a re-apply revokes from it)
            await r.eval(note.source, 3, index, lease, touched, "add", client_id)
            await r.eval(s.source, 1, key, *args)
        else:  # the grant first: until it is gone, the index must still list it
            await r.eval(s.source, 1, key, *args)
            await r.eval(note.source, 3, index, lease, touched, "rem", client_id)
    except REDIS_FAILURES as exc:
        what = "write" if value else "revoke"
        raise ConfigStoreError(f"cannot {what} an API key grant of policy {policy_ref!r}: {exc}") from exc


async def get_grant(client: Client, policy_ref: str, key_sha256: bytes) -> grants.StoredGrant | None:
    """One API key's stored grant under one policy (None: no such key), for tools and tests."""
    return await get_grant_of(client, policy_ref, keyschema.client_for_api_key(key_sha256))


async def get_grant_of(client: Client, policy_ref: str, client_id: str) -> grants.StoredGrant | None:
    """:func:`get_grant` by the key's client id (``k…``), as bucket tools know a key."""
    key = keyschema.grant_key(keyschema.policy_id(policy_ref), client_id)
    try:
        value = await client.redis.get(key)
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot read an API key grant of policy {policy_ref!r}: {exc}") from exc
    return grants.decode(value, policy_ref) if value is not None else None


async def memory_settings(client: Client) -> list[tuple[int, str]]:
    """``(maxmemory, maxmemory-policy)`` of each node the client writes to (one, or every primary
    of a Cluster): from ``CONFIG GET``, else from ``INFO memory`` (managed Redis services often
    disable CONFIG)."""
    r = client.redis
    kwargs: dict[str, Any] = {}
    if isinstance(r, redis.asyncio.RedisCluster):  # ask every primary
        kwargs["target_nodes"] = r.PRIMARIES
    try:
        try:
            found = _per_node(await r.config_get("maxmemory*", **kwargs))
            return [(int(c["maxmemory"]), str(c["maxmemory-policy"])) for c in found]
        except (ResponseError, KeyError):
            found = _per_node(await r.info("memory", **kwargs))
            return [(int(i["maxmemory"]), str(i["maxmemory_policy"])) for i in found]
    except (*REDIS_FAILURES, KeyError, ValueError) as exc:
        raise ConfigStoreError(f"cannot read the memory settings: {exc}") from exc


def _per_node(reply: Mapping[Any, Any]) -> list[Mapping[str, Any]]:
    """A Cluster client answers ``{node: reply}``; a single node its reply."""
    values = list(reply.values())
    if values and all(isinstance(v, Mapping) for v in values):
        return values
    return [reply]


# ---------------------------------------------------------------------------------------------
# What an idle operator asks every interval: a few commands, however many namespaces it serves.


async def fresh_heartbeats(client: Client, since: float) -> list[tuple[bytes | str, float]]:
    """Every sidecar heartbeat newer than ``since`` (unix s), all namespaces at once:
    ``(member, time)`` (:func:`keyschema.parse_heartbeat_member`)."""
    try:
        entries = await client.redis.zrangebyscore(
            keyschema.HEARTBEATS_KEY, f"({since:.0f}", "+inf", withscores=True)
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot read heartbeats: {exc}") from exc
    return [(entry[0], float(entry[1])) for entry in entries if isinstance(entry, (tuple, list))]


async def prune_heartbeats(client: Client, before: float) -> int:
    """Remove the heartbeats older than ``before`` (their sidecars are gone, or have moved on to
    another state); how many went."""
    try:
        return int(await client.redis.zremrangebyscore(keyschema.HEARTBEATS_KEY, "-inf", f"({before:.0f}"))
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot prune heartbeats: {exc}") from exc


async def bump_epoch(client: Client, scope: str, by: int = 1) -> int:
    """Count one more config write by the operator serving ``scope``; the new count (``by=0``:
    the count as it is, 0 created where there is none)."""
    try:
        return int(await client.redis.hincrby(keyschema.OPERATOR_EPOCH_KEY, scope, by))
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot write the operator's epoch: {exc}") from exc


async def epoch(client: Client, scope: str) -> int | None:
    """The count :func:`bump_epoch` left (None: none, Redis lost it)."""
    try:
        value = await client.redis.hget(keyschema.OPERATOR_EPOCH_KEY, scope)
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot read the operator's epoch: {exc}") from exc
    return None if value is None else int(value)


async def missing_configs(client: Client, namespaces: Sequence[str], chunk: int = 1000) -> list[str]:
    """Which of ``namespaces`` have no config document. On one Redis one EXISTS counts a
    thousand at a time; only when some are missing are they looked at one by one. A Cluster
    client pipelines (one round trip per node)."""
    keys = [keyschema.config_key(ns) for ns in namespaces]
    try:
        there = await _there(client, keys, chunk)
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot check the config documents: {exc}") from exc
    return [ns for ns, n in zip(namespaces, there, strict=True) if not n]


async def missing_grant_indexes(client: Client, policy_refs: Sequence[str], chunk: int = 1000) -> list[str]:
    """Which of these policies have no key index (:func:`keyschema.grant_index_key`), as
    :func:`missing_configs` counts: for policies that have keys, the index gone means Redis
    lost their grants (a Cluster node restarted empty, a flush), whatever the count of writes
    on the node that holds it says."""
    keys = [keyschema.grant_index_key(keyschema.policy_id(ref)) for ref in policy_refs]
    try:
        there = await _there(client, keys, chunk)
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot check the API key indexes: {exc}") from exc
    return [ref for ref, n in zip(policy_refs, there, strict=True) if not n]


async def grant_is(client: Client, policy_ref: str, key_sha256: bytes, value: str | None) -> bool:
    """Does Redis hold this encoded grant (``value``; None: no grant) for the key? The read-back
    of a counted grant write (the operator's :meth:`Reconciler.count_write`)."""
    key = keyschema.grant_key(keyschema.policy_id(policy_ref), keyschema.client_for_api_key(key_sha256))
    try:
        held = await client.redis.get(key)
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot read an API key grant of policy {policy_ref!r}: {exc}") from exc
    if held is None or value is None:
        return held is None and value is None
    return (held.decode() if isinstance(held, bytes) else str(held)) == value


async def _there(client: Client, keys: Sequence[str], chunk: int) -> list[int]:
    """EXISTS of each key (1 or 0): one EXISTS per ``chunk`` keys when all are there."""
    if not isinstance(client.redis, redis.asyncio.RedisCluster):
        found = 0
        for start in range(0, len(keys), chunk):
            found += int(await client.redis.exists(*keys[start:start + chunk]))
        if found == len(keys):
            return [1] * len(keys)
    pipe = client.redis.pipeline()
    for key in keys:
        pipe.exists(key)
    return [int(n) for n in await pipe.execute()]
