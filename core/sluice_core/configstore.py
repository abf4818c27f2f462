"""Reading and writing the compiled config in Redis with redis-py (the control-plane side:
``sluice apply``, the operator, admin commands). The sidecar reads the same keys with its own
lean client; both follow :mod:`sluice_core.keyschema`."""

from __future__ import annotations

from typing import Any

import redis
import redis.cluster
import redis.sentinel

from sluice_core import keyschema, scripts
from sluice_core.configdoc import NamespaceConfig, build_doc, load_doc, placeholder_doc
from sluice_core.redisurl import RedisTarget, Topology, parse_redis_url


class ConfigStoreError(RuntimeError):
    """Redis could not be reached or refused a config operation (wrapped once, here)."""


def connect(url: str | RedisTarget, *, timeout: float = 5.0) -> Any:
    """A redis-py client for any supported URL (single, TLS, Sentinel, Cluster)."""
    t = parse_redis_url(url) if isinstance(url, str) else url
    common: dict[str, Any] = {"username": t.username, "password": t.password,
                              "socket_timeout": timeout, "socket_connect_timeout": timeout}
    if t.tls:
        common.update(ssl=True, ssl_ca_certs=t.ssl_ca_certs, ssl_certfile=t.ssl_certfile,
                      ssl_keyfile=t.ssl_keyfile, ssl_cert_reqs="required" if t.ssl_verify else "none")
    if t.topology is Topology.CLUSTER:
        nodes = [redis.cluster.ClusterNode(h, p) for h, p in t.hosts]  # type: ignore[no-untyped-call]
        return redis.cluster.RedisCluster(startup_nodes=nodes, **common)
    if t.topology is Topology.SENTINEL:
        sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(t.hosts), sentinel_kwargs={"password": t.sentinel_password, "socket_timeout": timeout},
            **common)
        return sentinel.master_for(t.master_name or "", db=t.db)  # type: ignore[no-untyped-call]
    host, port = t.hosts[0]
    return redis.Redis(host=host, port=port, db=t.db, **common)


def publish(client: Any, namespace: str, doc: str, *, min_version: int = 0) -> int:
    """Write ``doc`` as the namespace's config and announce it; return the new version."""
    s = scripts.publish_config()
    try:
        v = client.eval(s.source, 1, keyschema.config_key(namespace), doc, str(min_version),
                        keyschema.CONFIG_CHANNEL, namespace)
    except redis.RedisError as exc:
        raise ConfigStoreError(f"cannot write config for namespace {namespace!r}: {exc}") from exc
    return int(v)


def ensure(client: Any, namespace: str, *, min_version: int = 0) -> int:
    """Create the namespace's placeholder document (no policies) if it has no document at all,
    and announce it; return its version, or 0 when a document was there (it stays untouched)."""
    s = scripts.publish_config()
    try:
        v = client.eval(s.source, 1, keyschema.config_key(namespace), placeholder_doc(namespace),
                        str(min_version), keyschema.CONFIG_CHANNEL, namespace, "missing")
    except redis.RedisError as exc:
        raise ConfigStoreError(f"cannot create config for namespace {namespace!r}: {exc}") from exc
    return int(v)


def exists(client: Any, namespace: str) -> bool:
    """Does Redis hold a document for the namespace?"""
    try:
        return bool(client.hexists(keyschema.config_key(namespace), "doc"))
    except redis.RedisError as exc:
        raise ConfigStoreError(f"cannot read config for namespace {namespace!r}: {exc}") from exc


def drop_if_empty(client: Any, namespace: str) -> bool:
    """Remove the namespace's config if it is the empty document its last policy left (for a
    namespace gone for good); True when it was removed."""
    s = scripts.drop_empty_config()
    try:
        return bool(client.eval(s.source, 1, keyschema.config_key(namespace), build_doc(namespace, [])))
    except redis.RedisError as exc:
        raise ConfigStoreError(f"cannot remove config of namespace {namespace!r}: {exc}") from exc


def read_raw(client: Any, namespace: str) -> tuple[int, str] | None:
    """The stored ``(version, JSON document)``, unparsed; None when there is none."""
    try:
        version, doc = client.hmget(keyschema.config_key(namespace), ["version", "doc"])
    except redis.RedisError as exc:
        raise ConfigStoreError(f"cannot read config for namespace {namespace!r}: {exc}") from exc
    if version is None or doc is None:
        return None
    return int(version), doc.decode() if isinstance(doc, bytes) else str(doc)


def read(client: Any, namespace: str) -> NamespaceConfig | None:
    raw = read_raw(client, namespace)
    return load_doc(raw[1], raw[0]) if raw is not None else None
