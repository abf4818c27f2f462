"""The admission webhook server over real HTTPS on loopback, with the operator-generated CA.

Also covers the two certificate modes of ``sluice_operator.certs`` (cert-manager files when
mounted, otherwise a self-signed CA that is reused across restarts).
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sluice_operator.certs import (
    CertBundle,
    ensure_certificates,
    issue,
    read_material,
    write_material,
)
from sluice_operator.injection.settings import InjectionSettings
from sluice_operator.webhook_server import WebhookServer
from support.paths import ROOT

POD = """
apiVersion: v1
kind: Pod
metadata:
  generateName: web-6b8f-
  namespace: shop
  labels: {app: web}
spec:
  containers:
    - name: web
      image: nginx:1.27
      ports: [{name: http, containerPort: 8080}]
      readinessProbe: {httpGet: {path: /, port: http}}
"""


def review(obj: Any, kind: str, namespace: str = "shop") -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": str(uuid.uuid4()), "kind": {"group": "", "version": "v1", "kind": kind},
                        "namespace": namespace, "operation": "CREATE", "object": obj,
                        "name": (obj.get("metadata") or {}).get("name", "")}}


@pytest.fixture
def bundle(tmp_path: Path) -> CertBundle:
    return ensure_certificates(tmp_path / "certs", ["localhost", "sluice-webhook.sluice-system.svc"],
                               ["127.0.0.1"])


def client_ssl(bundle: CertBundle) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=bundle.ca_pem.decode())
    return ctx


@pytest.fixture
async def server(bundle: CertBundle) -> AsyncIterator[WebhookServer]:
    lookups: list[str] = []

    async def namespace_labels(ns: str) -> Mapping[str, str] | None:
        lookups.append(ns)
        return {"sluice.dev/inject": "true"} if ns == "shop" else {}

    srv = WebhookServer(bundle.cert_path, bundle.key_path, host="127.0.0.1", port=0,
                        injection=InjectionSettings(image="sluice:test"),
                        namespace_labels=namespace_labels, max_body_bytes=256 * 1024)
    async with srv:
        assert srv.port != 0
        yield srv


@pytest.fixture
async def http(bundle: CertBundle) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl(bundle))) as s:
        yield s


async def test_healthz_over_https(server: WebhookServer, http: aiohttp.ClientSession) -> None:
    assert server.url.startswith("https://127.0.0.1:")
    async with http.get(f"{server.url}/healthz") as r:
        assert r.status == 200 and (await r.text()).strip() == "ok"
    # "localhost" is in the certificate too
    async with http.get(f"https://localhost:{server.port}/healthz") as r:
        assert r.status == 200


async def test_client_not_trusting_the_ca_is_refused(server: WebhookServer) -> None:
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await s.get(f"{server.url}/healthz")


async def test_validate_policy_refuses_bad_and_admits_good(server: WebhookServer,
                                                           http: aiohttp.ClientSession) -> None:
    bad = yaml.safe_load((ROOT / "crds/examples/bad/negative-requests.yaml").read_text())
    body = review(bad, "RateLimitPolicy")
    async with http.post(f"{server.url}/validate-policy", json=body) as r:
        assert r.status == 200 and r.content_type == "application/json"
        answer = await r.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == body["request"]["uid"] and response["allowed"] is False
    assert response["status"]["code"] == 422
    assert "spec.tiers[1].requests: must be a positive integer, got -5" in response["status"]["message"]
    assert {"field": "spec.tiers[1].requests", "message": "must be a positive integer, got -5",
            "reason": "FieldValueInvalid"} in response["status"]["details"]["causes"]

    good = yaml.safe_load((ROOT / "crds/examples/public-api.yaml").read_text())
    body = review(good, "RateLimitPolicy", namespace="default")
    async with http.post(f"{server.url}/validate-policy", json=body) as r:
        answer = await r.json()
    assert answer["response"] == {"uid": body["request"]["uid"], "allowed": True}


async def test_mutate_pod_injects_via_namespace_label(server: WebhookServer,
                                                      http: aiohttp.ClientSession) -> None:
    pod = yaml.safe_load(POD)
    body = review(pod, "Pod")
    async with http.post(f"{server.url}/mutate-pod", json=body) as r:
        assert r.status == 200
        answer = await r.json()
    response = answer["response"]
    assert response["uid"] == body["request"]["uid"] and response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    added = [op["value"] for op in patch if op["path"] == "/spec/containers/-"]
    assert len(added) == 1 and added[0]["name"] == "sluice-sidecar"
    assert added[0]["image"] == "sluice:test"
    assert {"op": "replace", "path": "/spec/containers/0/ports/0/name", "value": "http-app"} in patch
    assert {"op": "replace", "path": "/spec/containers/0/readinessProbe/httpGet/port",
            "value": 8080} in patch

    # a namespace without the label: allowed, no patch
    body = review(pod, "Pod", namespace="other")
    async with http.post(f"{server.url}/mutate-pod", json=body) as r:
        response = (await r.json())["response"]
    assert response == {"uid": body["request"]["uid"], "allowed": True}


async def test_namespace_lookup_failure_still_admits(bundle: CertBundle,
                                                     http: aiohttp.ClientSession) -> None:
    async def broken(ns: str) -> Mapping[str, str]:
        raise RuntimeError("forbidden: namespaces is not allowed")

    async with WebhookServer(bundle.cert_path, bundle.key_path, host="127.0.0.1", port=0,
                             namespace_labels=broken) as srv:
        body = review(yaml.safe_load(POD), "Pod")
        async with http.post(f"{srv.url}/mutate-pod", json=body) as r:
            response = (await r.json())["response"]
    assert response["allowed"] is True and "patch" not in response
    assert "forbidden" in response["warnings"][0]


async def test_pod_label_decides_without_reading_the_namespace(bundle: CertBundle,
                                                                http: aiohttp.ClientSession) -> None:
    """The namespace is read only when the pod's own label leaves the choice to it: one API
    server read less per labelled pod."""
    lookups: list[str] = []

    async def namespace_labels(ns: str) -> Mapping[str, str] | None:
        lookups.append(ns)
        return {}

    async with WebhookServer(bundle.cert_path, bundle.key_path, host="127.0.0.1", port=0,
                             namespace_labels=namespace_labels) as srv:
        async def mutate(inject: str | None) -> dict[str, Any]:
            pod = yaml.safe_load(POD)
            if inject is not None:
                pod["metadata"]["labels"]["sluice.dev/inject"] = inject
            async with http.post(f"{srv.url}/mutate-pod", json=review(pod, "Pod")) as r:
                return dict((await r.json())["response"])

        assert "patch" in await mutate("true")
        assert "patch" not in await mutate("false")
        assert lookups == []
        assert "patch" not in await mutate(None)
        assert lookups == ["shop"]


@pytest.mark.parametrize("path", ["/validate-policy", "/mutate-pod"])
async def test_bad_json_and_non_reviews_are_400(server: WebhookServer, http: aiohttp.ClientSession,
                                                path: str) -> None:
    for data in (b"{not json", b"\xff\xfe", b""):
        async with http.post(f"{server.url}{path}", data=data,
                             headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400, data
            assert "not JSON" in await r.text()
    for obj in ([1, 2], {"kind": "AdmissionReview"},
                {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}):
        async with http.post(f"{server.url}{path}", json=obj) as r:
            assert r.status == 400, obj
            assert "AdmissionReview" in await r.text()


async def test_oversized_body_is_refused(server: WebhookServer, http: aiohttp.ClientSession) -> None:
    big = review({"metadata": {"annotations": {"x": "a" * 300_000}}}, "Pod")
    async with http.post(f"{server.url}/mutate-pod", json=big) as r:
        assert r.status == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused while reading
        for _ in range(40):
            yield b" " * 10_000

    async with http.post(f"{server.url}/validate-policy", data=chunks()) as r:
        assert r.status == 413
    async with http.get(f"{server.url}/healthz") as r:  # and the server is fine
        assert r.status == 200


async def test_wrong_method_and_path(server: WebhookServer, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{server.url}/mutate-pod") as r:
        assert r.status == 405
    async with http.post(f"{server.url}/nope", json={}) as r:
        assert r.status == 404


# ------------------------------------------------------------------------------------------
# Certificates


def test_self_signed_certificate_covers_names_and_is_reused(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    first = ensure_certificates(d, ["sluice-webhook.sluice-system.svc"], ["10.0.0.1"])
    first_cert = first.cert_path.read_bytes()
    assert first.mode == "self-signed"
    cert = x509.load_pem_x509_certificate(first.cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["sluice-webhook.sluice-system.svc"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    ca = x509.load_pem_x509_certificate(first.ca_pem)
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    assert (first.key_path.stat().st_mode & 0o777) == 0o600

    # a restart reuses everything: the caBundle in the webhook configurations stays valid
    again = ensure_certificates(d, ["sluice-webhook.sluice-system.svc"], ["10.0.0.1"])
    assert again.ca_pem == first.ca_pem
    assert again.cert_path.read_bytes() == first_cert

    # a new name: a new serving cert from the same CA
    more = ensure_certificates(d, ["sluice-webhook.sluice-system.svc", "extra.example"])
    assert more.ca_pem == first.ca_pem
    assert more.cert_path.read_bytes() != first_cert
    x509.load_pem_x509_certificate(more.cert_path.read_bytes()).verify_directly_issued_by(ca)


def test_mounted_cert_manager_files_win(tmp_path: Path) -> None:
    mounted = tmp_path / "mounted"
    generated = ensure_certificates(tmp_path / "elsewhere", ["x.svc"])
    mounted.mkdir()
    for name, src in (("tls.crt", generated.cert_path), ("tls.key", generated.key_path)):
        (mounted / name).write_bytes(src.read_bytes())
    b = ensure_certificates(tmp_path / "own", ["x.svc"], provided_dir=mounted)
    assert b.mode == "provided" and b.cert_path == mounted / "tls.crt" and b.ca_pem == b""
    (mounted / "ca.crt").write_bytes(generated.ca_pem)
    b = ensure_certificates(tmp_path / "own", ["x.svc"], provided_dir=mounted)
    assert b.ca_pem == generated.ca_pem
    assert not (tmp_path / "own").exists()  # nothing generated in this mode
    # an empty mount (cert-manager not installed): self-signed
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ensure_certificates(tmp_path / "own", ["x.svc"], provided_dir=empty).mode == "self-signed"


async def test_rotated_certificate_files_are_served_without_a_restart(tmp_path: Path) -> None:
    """cert-manager rewrites its mounted Secret well before expiry: the operator must serve the
    new certificate to new connections without being restarted."""
    from sluice_operator.settings import OperatorSettings
    from sluice_operator.webhooks import serve_webhooks
    from support.polling import wait_for
    from support.redis_servers import pick_port

    mounted = tmp_path / "mounted"
    mounted.mkdir()

    def mount(b: CertBundle) -> None:
        for name, data in (("tls.key", b.key_path.read_bytes()), ("tls.crt", b.cert_path.read_bytes()),
                           ("ca.crt", b.ca_pem)):
            (mounted / (name + ".new")).write_bytes(data)
            (mounted / (name + ".new")).replace(mounted / name)

    def der(b: CertBundle) -> bytes:
        return x509.load_pem_x509_certificate(b.cert_path.read_bytes()).public_bytes(
            serialization.Encoding.DER)

    async def served(port: int) -> bytes:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # only to look at it
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return bytes(cert)

    first = ensure_certificates(tmp_path / "one", ["localhost"], ["127.0.0.1"])
    second = ensure_certificates(tmp_path / "two", ["localhost"], ["127.0.0.1"])  # another CA
    assert first.ca_pem != second.ca_pem
    mount(first)
    port = pick_port()
    settings = OperatorSettings(redis="redis://127.0.0.1:1", webhook_listen=f"127.0.0.1:{port}",
                                webhook_provided_cert_dir=str(mounted), webhook_cert_dir=str(tmp_path / "own"),
                                webhook_cert_check_s=0.1)
    server = await serve_webhooks(settings, api_client=None)
    try:
        assert await served(port) == der(first)
        mount(second)

        async def rotated() -> bool:
            return await served(port) == der(second)

        await wait_for(rotated, timeout=10, what="the rotated certificate to be served")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl(second))) as http, \
                http.get(f"https://127.0.0.1:{port}/healthz") as r:
            assert r.status == 200
        # The usual rotation: a new certificate from the same CA (only tls.crt/tls.key change).
        material = read_material(tmp_path / "two")
        assert material is not None
        renewed = write_material(tmp_path / "renewed", issue(["localhost"], ["127.0.0.1"], previous=material),
                                 "self-signed")
        assert renewed.ca_pem == second.ca_pem and der(renewed) != der(second)
        mount(renewed)

        async def renewed_served() -> bool:
            return await served(port) == der(renewed)

        await wait_for(renewed_served, timeout=10, what="the renewed certificate to be served")
    finally:
        await server.stop()
