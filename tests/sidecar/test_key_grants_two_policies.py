"""A pod under its namespace's policy and a ClusterRateLimitPolicy, both resolving API keys from
their Redis grants (a real sidecar process; single Redis, where both policies' buckets go in one
all-or-nothing call, and a 3-master Cluster, where they are two ordered calls with a refund).
A key the cache misses is resolved first (reading only), then decided as a cached key is: known
to both it takes from both, unknown to either it is refused by that one, and a revocation under
either policy takes effect through its notice."""

from __future__ import annotations

import uuid
from pathlib import Path

from sluice_core import configdoc, configstore
from sluice_core.model import CLUSTER_SCOPE
from sluice_core.parse import parse_policy
from support.grant_store import key_policy, publish_policies, put_key, revoke_key
from support.key_sidecar import call, start
from support.polling import wait_until
from support.processes import UpstreamProcess
from support.redis_servers import RedisClusterProcs, RedisServer
from support.store_calls import store_call


def test_keys_of_both_policies_resolve_from_redis(server: RedisServer | RedisClusterProcs,
                                                  upstream_process: UpstreamProcess, labels: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    ns = f"k2-{tag}"
    local = key_policy(ns, required=True, pro=5)
    shared = parse_policy({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "ClusterRateLimitPolicy",
        "metadata": {"name": f"partners-{tag}"},
        "spec": {"identify": {"order": ["apiKey"]}, "apiKeys": {"header": "X-API-Key", "required": True},
                 "tiers": [{"name": "free", "requests": 1000, "period": "1h"}]}})
    publish_policies(server.url, ns, local)
    store_call(server.url, configstore.publish, CLUSTER_SCOPE,
               configdoc.build_doc(CLUSTER_SCOPE, [shared], scopes={shared.name: [ns]}))
    both, local_only = "both-" + uuid.uuid4().hex, "local-" + uuid.uuid4().hex
    for key in (both, local_only):
        put_key(server.url, local.ref, key, "pro")
    put_key(server.url, shared.ref, both, "free")
    sidecar = start(upstream_process, server.url, ns, labels)
    try:
        first, headers = call(sidecar, both)
        assert first == 200
        assert '"pro";q=5' in headers["RateLimit-Policy"]
        assert f'"{shared.name}/free";q=1000' in headers["RateLimit-Policy"]
        # Exact across both: the local tier's 5, then refused (the shared budget got its refund
        # on the Cluster, took nothing on a single Redis).
        assert [call(sidecar, both)[0] for _ in range(5)] == [200] * 4 + [429]
        assert call(sidecar, local_only)[0] == 401  # the shared policy does not know it
        revoke_key(server.url, shared.ref, both)
        wait_until(lambda: call(sidecar, both)[0] == 401, 10, what="revoked by the shared policy")
    finally:
        sidecar.close()
