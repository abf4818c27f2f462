"""What waits for the key Secret listing, and what an unfinished one looks like: a policy that
does not identify clients by API key is programmed at once; one that does, while the listing is
not done, is not programmed, under its own status reason (not a Redis error). And a key Secret
with an absurdly large field is a key problem, never a key. Real Redis."""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Any

import pytest
from sluice_core import configstore
from sluice_operator import reconcile
from sluice_operator.keysecrets import POLICY_LABEL
from sluice_operator.reconcile import Reconciler
from sluice_operator.secretwatch import MAX_FIELD, KeySecretWatch
from sluice_operator.status import status_update
from support.redis_servers import RedisServer


def policy(ns: str, name: str, order: list[str]) -> dict[str, Any]:
    return {"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
            "metadata": {"name": name, "namespace": ns, "generation": 1},
            "spec": {"selector": {"matchLabels": {"app": name}}, "identify": {"order": order},
                     "tiers": [{"name": "free", "requests": 100, "period": "1m"}]}}


async def test_a_policy_without_api_keys_never_waits_for_the_listing(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconcile, "KEYS_LISTED_WAIT_S", 3600.0)  # were it to wait, the test would hang
    ns = "nowait-" + uuid.uuid4().hex[:6]
    reconciler = Reconciler(configstore.connect(redis_server.url))
    reconciler.keys_listed = [asyncio.Event()]  # a listing that never ends
    try:
        async with asyncio.timeout(60):  # a bound for the test, not a measurement
            out = await reconciler.reconcile(ns, [policy(ns, "ips", ["ip"])], [], complete=True)
        assert out.programmed and out.pushed and not out.failed, out
    finally:
        await reconciler.close()


async def test_an_unfinished_listing_is_its_own_status_reason(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconcile, "KEYS_LISTED_WAIT_S", 0.05)
    ns = "unlisted-" + uuid.uuid4().hex[:6]
    reconciler = Reconciler(configstore.connect(redis_server.url))
    reconciler.keys_listed = [asyncio.Event()]
    try:
        body = policy(ns, "keys", ["apiKey", "ip"])
        out = await reconciler.reconcile(ns, [body], [], complete=True)
        assert not out.programmed and not out.redis_error and out.keys_error, out
        status = status_update(body, out.results["keys"], out)
        assert status is not None
        programmed = next(c for c in status["conditions"] if c["type"] == "Programmed")
        assert (programmed["status"], programmed["reason"]) == ("False", "KeySecretsNotListed")
    finally:
        await reconciler.close()


def test_a_key_secret_with_an_absurdly_large_field_is_a_problem_not_a_key() -> None:
    async def ignore(*_: Any) -> None:
        return None

    watch = KeySecretWatch(lambda: None, POLICY_LABEL, lambda ns: ns, ignore)
    for name, data in (("big-key", {"key": base64.b64encode(b"k" * MAX_FIELD).decode()}),
                       ("big-tier", {"key": "c2stMQ==", "tier": "A" * (MAX_FIELD + 1)}),
                       ("big-data", {"key": "c2stMQ==", **{f"f{i}": "A" * MAX_FIELD for i in range(20)}})):
        body = {"metadata": {"name": name, "namespace": "shop", "labels": {POLICY_LABEL: "api"}}, "data": data}
        assert watch._put("ADDED", body) == ("shop", f"shop/{name}")
        record = watch.records["shop"][f"shop/{name}"]
        assert record.digest is None and record.problem and "larger than" in record.problem, name
    small = {"metadata": {"name": "ok", "namespace": "shop", "labels": {POLICY_LABEL: "api"}},
             "data": {"key": base64.b64encode(b"sk-1").decode()}}
    watch._put("ADDED", small)
    assert watch.records["shop"]["shop/ok"].problem is None
