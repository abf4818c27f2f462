"""A private Redis CA for injected sidecars: the variable the injector writes into the sidecar
container names the file a real sidecar process then trusts, against a real TLS redis-server
whose certificate a CA of its own signed (no system store trusts it). The pod spec and the
ConfigMap copy are checked with the real API server in tests/k8s/test_k8s_injection_pods.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sluice_core import configdoc, configstore
from sluice_core.parse import parse_policy
from sluice_operator.injection.container import sidecar_container
from sluice_operator.injection.names import REDIS_CA_KEY, REDIS_CA_MOUNT, REDIS_CA_VOLUME
from sluice_operator.injection.settings import InjectionSettings
from support.processes import SidecarProcess, UpstreamProcess, http_get, wait_until
from support.sidecar_harness import policy_doc
from support.tls_redis import PASSWORD, tls_redis_server


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[tuple[str, int]]:
    with tls_redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamProcess]:
    up = UpstreamProcess()
    yield up
    up.close()


def injected_ca_env() -> str:
    """The CA variable of the injected container, checked to name the mounted ConfigMap's file."""
    container = sidecar_container(InjectionSettings(redis_ca_file="/etc/sluice/redis-tls/ca.crt"),
                                  "http", 15080, 15090, 8080)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == REDIS_CA_VOLUME]
    (name,) = [e["name"] for e in container["env"] if e.get("value") == f"{mount['mountPath']}/{REDIS_CA_KEY}"]
    assert mount["mountPath"] == REDIS_CA_MOUNT and mount["readOnly"] is True
    return str(name)


def cluster_sidecar(url: str, ca: str, up: UpstreamProcess, tmp_path: Path,
                    env: dict[str, str]) -> tuple[SidecarProcess, str]:
    """A cluster-mode sidecar on ``url``; its namespace's config published (trusting ``ca``)."""
    ns = "ca-" + uuid.uuid4().hex[:8]
    labels = tmp_path / "labels"
    labels.write_text('app="web"\n')

    async def publish() -> None:
        async with configstore.connect(f"{url}?ssl_ca_certs={ca}") as client:
            await configstore.publish(client, ns, configdoc.build_doc(ns, [parse_policy(policy_doc("api", ns, tiers=[
                {"name": "free", "requests": 2, "period": "1h"}]))]))

    asyncio.run(publish())
    sidecar = SidecarProcess(up.url, "--redis", url, "--namespace", ns, "--pod-labels", str(labels),
                             "--pod-name", "web-0", env=env, wait_ready=False)
    return sidecar, ns


def test_a_sidecar_given_the_injected_ca_variable_enforces_through_a_private_ca_redis(
        tls_redis: tuple[str, int], upstream: UpstreamProcess, tmp_path: Path) -> None:
    ca, port = tls_redis
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}"  # no ssl_ca_certs: the URL is the same everywhere
    sidecar, _ = cluster_sidecar(url, ca, upstream, tmp_path, {injected_ca_env(): ca})
    try:
        sidecar.wait_ready()
        codes = [http_get(sidecar.url + "/")[0] for _ in range(3)]
        assert codes == [200, 200, 429]  # 2 an hour, decided in the TLS Redis
    finally:
        sidecar.close()


def test_without_it_the_private_ca_is_not_trusted(tls_redis: tuple[str, int], upstream: UpstreamProcess,
                                                  tmp_path: Path) -> None:
    """What the sidecars of an injected namespace did before: the store's TLS handshake fails."""
    ca, port = tls_redis
    sidecar, _ = cluster_sidecar(f"rediss://:{PASSWORD}@127.0.0.1:{port}", ca, upstream, tmp_path, {})
    try:
        wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in sidecar.output(), 20, what="the TLS handshake refused")
        assert http_get(sidecar.admin + "/readyz")[0] == 503
    finally:
        sidecar.close()
