"""The same decisions and config reads over every supported Redis URL: TLS with a password
(``rediss://``) and Sentinel (``redis+sentinel://``). Single and Cluster are covered by the
store and cluster-mode tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sluice_core import configdoc, configstore, keyschema
from sluice_core.model import Limit
from sluice_core.parse import parse_policy
from sluice_core.redisurl import parse_redis_url
from sluice_sidecar.stores.redis import RedisStore
from support.redis_servers import RedisServer, sentinel_for
from support.tls_redis import tls_redis_server

LIMIT = Limit(requests=2, period_us=3_600_000_000, burst=2)
PARAMS = (LIMIT.emission_us, LIMIT.capacity_us)
POLICY = parse_policy({"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
                       "metadata": {"name": "p", "namespace": "topo"},
                       "spec": {"tiers": [{"name": "free", "requests": 1, "period": "1m"}]}})


async def exercise(url: str) -> None:
    """Two admitted, one refused, on one fresh bucket; then a config round trip."""
    store = RedisStore(parse_redis_url(url), timeout=2.0, connect_timeout=2.0)
    key = keyschema.tier_bucket_key(keyschema.client_tag("topo/p", "i" + uuid.uuid4().hex), "free", *PARAMS)
    try:
        allowed = [(await store.decide((key,), 1, PARAMS)).allowed for _ in range(3)]
    finally:
        await store.close()
    assert allowed == [True, True, False]
    ns = "topo-" + uuid.uuid4().hex[:6]
    async with configstore.connect(url) as client:
        version = await configstore.publish(client, ns, configdoc.build_doc(ns, [POLICY]))
        cfg = await configstore.read(client, ns)
    assert version == 1
    assert cfg is not None
    assert cfg.version == 1
    assert cfg.policies[0].name == "p"


@pytest.fixture
def tls_redis() -> Iterator[tuple[str, int]]:
    with tls_redis_server() as server:
        yield server


async def test_tls_with_password(tls_redis: tuple[str, int]) -> None:
    ca, port = tls_redis
    await exercise(f"rediss://:s3cret@127.0.0.1:{port}?ssl_ca_certs={ca}")


async def test_tls_wrong_password_is_unavailable_and_secret_free(tls_redis: tuple[str, int]) -> None:
    from sluice_sidecar.stores.base import StoreUnavailable

    ca, port = tls_redis
    target = parse_redis_url(f"rediss://:wrong-secret@127.0.0.1:{port}?ssl_ca_certs={ca}")
    assert "wrong-secret" not in repr(target) + str(target)
    store = RedisStore(target, timeout=2.0, connect_timeout=2.0)
    with pytest.raises(StoreUnavailable) as info:
        await store.decide(("sl:{x:y}:t:free",), 1, PARAMS)
    await store.close()
    assert "wrong-secret" not in str(info.value)


@pytest.fixture
def sentinel() -> Iterator[tuple[RedisServer, int]]:
    master = RedisServer()
    try:
        with sentinel_for(master) as port:
            yield master, port
    finally:
        master.close()


async def test_sentinel(sentinel: tuple[RedisServer, int]) -> None:
    master, port = sentinel
    await exercise(f"redis+sentinel://127.0.0.1:{port}/sluicemaster")
    assert master.execute("DBSIZE") >= 2  # the bucket and the config landed on the master
