"""What start-up at a thousand policies costs, in counts (times are in bench.operator_scale):
kopf's wait for its indexes, the last handled spec of each policy, the API connections."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
from kopf._cogs.aiokits import aiotoggles
from sluice_operator.diffbase import MemoryDiffBase
from sluice_operator.indexwait import quiet_index_wait
from sluice_operator.kubelogin import API_CONNECTIONS, pooled_session

ANNOTATION = "kopf.zalando.org/last-handled-configuration"


async def until(probe: Any, what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not probe():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0)


async def test_the_index_wait_wakes_its_waiters_once_when_every_object_is_indexed() -> None:
    """kopf holds every object's worker until all objects are indexed (a toggle each). Each
    indexed object used to wake every waiting worker: n² checks of the set, 1.16 million at
    start-up with 1,000 policies in 1,000 namespaces. Now: about n."""
    assert quiet_index_wait()
    n = 200
    toggles = aiotoggles.ToggleSet(all)
    pending = [await toggles.make_toggle(name=f"object {i}") for i in range(n)]
    checks = 0
    is_on = toggles.is_on

    def counted() -> bool:
        nonlocal checks
        checks += 1
        return is_on()

    toggles.is_on = counted  # type: ignore[method-assign]
    workers = [asyncio.create_task(toggles.wait_for(True)) for _ in range(n)]

    def all_waiting() -> bool:
        waiting = [f for f in toggles._condition._waiters or () if not f.done()]  # not woken
        return len(waiting) == n and not toggles._condition.locked()

    await until(all_waiting, "every worker waiting")
    for toggle in pending[:-1]:  # objects indexed one by one, the workers running in between
        await toggles.drop_toggle(toggle)
        await until(all_waiting, "every worker waiting again")
    assert not any(w.done() for w in workers)  # still waiting: one object is not indexed
    await toggles.drop_toggle(pending[-1])
    await asyncio.wait_for(asyncio.gather(*workers), 5)
    assert checks < 10 * n, checks  # n * n / 2 before


def test_the_last_handled_spec_is_kept_in_memory_not_in_an_annotation() -> None:
    """kopf stored it in an annotation: a PATCH per new or changed policy (three per new one
    with the finalizer and the status). One an earlier operator wrote is still read."""
    storage = MemoryDiffBase()
    body = kopf.Body({"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
                      "metadata": {"name": "api", "namespace": "a", "uid": "u1", "managedFields": [{}]},
                      "spec": {"tiers": [{"name": "free"}]}, "status": {"keys": 1}})
    essence = storage.build(body=body)
    assert essence == {"spec": {"tiers": [{"name": "free"}]}}  # what kopf's own build keeps
    assert essence == kopf.AnnotationsDiffBaseStorage().build(body=body)
    patch = kopf.Patch()
    storage.store(body=body, patch=patch, essence=essence)
    assert not patch  # nothing written to the object
    assert storage.fetch(body=body) == essence

    annotated = kopf.Body({"metadata": {"uid": "u2", "annotations": {ANNOTATION: '{"spec":{"x":1}}'}},
                           "spec": {"x": 2}})
    assert storage.fetch(body=annotated) == {"spec": {"x": 1}}  # an earlier version's
    storage.forget("u1")
    assert storage.fetch(body=body) is None and len(storage) == 0


async def test_a_cluster_wide_operator_has_a_bounded_pool_of_api_connections() -> None:
    """kopf's own session has none: 1,000 fresh policies opened about 1,000 TLS connections at
    once (handshakes on two shared cores, 128 KiB of buffers each: most of a 440 MB RSS peak)."""
    info = kopf.ConnectionInfo(server="https://127.0.0.1:6443", scheme="Bearer", token="t0ken",
                               default_namespace="default")
    context = pooled_session(info)
    session = context.aiohttp_session
    try:
        assert session.connector is not None and session.connector.limit == API_CONNECTIONS
        assert session.headers["Authorization"] == "Bearer t0ken"
        assert (context.server, context.default_namespace) == (info.server, "default")
    finally:
        await session.close()
