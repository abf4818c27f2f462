"""An API key granted a limit of its own takes that bucket, not its tier's: ``sluice bucket get``
and the API list it (kind ``own``), and a reset empties it, whether the key's grant is in Redis
(single Redis and the 3-master Cluster) or embedded in the config document. A real cluster-mode
sidecar spends the tokens with the real decision script."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sluice_analytics.api import ApiContext
from sluice_analytics.auth import TokenFile
from sluice_core import cli, configdoc, configstore, grants, keyschema
from sluice_core.model import KeyGrant, Limit
from support.analytics_api import AUTH, api_client
from support.grant_store import key_policy, raw_key
from support.polling import wait_for
from support.sidecar_harness import Upstream, start_sidecar

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
HOUR_US = 3_600_000_000
OWN = Limit(3, HOUR_US, 3)  # the tier "pro" gives 1000 an hour: a spent own bucket is unmistakable


@pytest.fixture(params=["redis-grant-single", "redis-grant-cluster", "embedded"])
def where(request: pytest.FixtureRequest) -> tuple[str, str]:
    server = request.getfixturevalue("redis_cluster" if request.param.endswith("cluster") else "redis_server")
    return request.param, str(server.url)


async def test_own_limit_bucket_listed_and_reset(where: tuple[str, str], tmp_path: Path, upstream: Upstream,
                                                 engine: Any, token_file: str) -> None:
    kind, url = where
    ns, key = "own-" + uuid.uuid4().hex[:8], "key-" + uuid.uuid4().hex
    policy = key_policy(ns)
    embedded = {policy.name: {keyschema.hash_api_key(key): KeyGrant("pro", OWN, key_id="acme")}}
    async with configstore.connect(url) as redis:
        await configstore.publish(redis, ns, configdoc.build_doc(ns, [policy], embedded if kind == "embedded" else None))
        if kind != "embedded":
            await configstore.put_grant(redis, policy.ref, raw_key(key), grants.StoredGrant(KeyGrant("pro", OWN), "acme"))
        labels = tmp_path / "labels"
        labels.write_text('app="web"\n')
        sc = await start_sidecar(tmp_path, None, upstream=upstream, redis=url, policy_file=None, namespace=ns,
                                 pod_labels=str(labels), pod_name="web-0", redis_timeout_ms=5000)
        api = await api_client(ApiContext(engine, TokenFile(token_file), redis))
        try:
            async with aiohttp.ClientSession() as http:
                async def ask() -> int:
                    async with http.get(sc.url + "/x", headers={"X-API-Key": key}) as r:
                        return r.status

                async def loaded() -> bool:
                    async with http.get(sc.admin_url + "/readyz") as r:
                        return bool((await r.json())["config"]["policyRef"])

                await wait_for(loaded, what="the policy loaded")
                assert [await ask() for _ in range(4)] == [200, 200, 200, 429]
                client = f"api-key-sha256:{keyschema.hash_api_key(key)}"
                seen = await buckets(api, ns, client)
                assert seen["own"] == {"kind": "own", "name": "pro", "capacity": 3, "remaining": 0}
                assert seen["tier"]["pro"]["remaining"] == 1000  # the tier's bucket is untouched

                # The CLI names the client by its bucket id as well; its reset empties the own bucket.
                cid = keyschema.client_for_api_key(raw_key(key))
                out = await asyncio.to_thread(sluice_json, "bucket", "reset", "--redis", url, "--namespace", ns,
                                              "--policy", policy.name, "--client", f"id:{cid}")
                assert out["deleted"] == 1
                again = await buckets(api, ns, client)
                assert again["own"]["remaining"] == 3
                assert await ask() == 200
                # The grant itself is not what a reset removes.
                assert await configstore.get_grant(redis, policy.ref, raw_key(key)) is not None or kind == "embedded"
        finally:
            await api.close()
            await sc.stop()


async def buckets(api: TestClient[web.Request, web.Application], ns: str, client: str) -> dict[str, Any]:
    resp = await api.get("/v1/buckets", params={"namespace": ns, "policy": "api", "client": client}, headers=AUTH)
    assert resp.status == 200, await resp.text()
    out: dict[str, Any] = {"tier": {}}
    for b in (await resp.json())["buckets"]:
        if b["kind"] == "own":
            out["own"] = {k: b[k] for k in ("kind", "name", "capacity", "remaining")}
        else:
            out[b["kind"]][b["name"]] = b
    return out


def sluice_json(*argv: str) -> dict[str, Any]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main([*argv, "--json"]) == 0
    result: dict[str, Any] = json.loads(buf.getvalue())
    return result
