"""The operator highly available: two ``sluice operator`` processes against the real API server
(tests/support/control_plane.py) and a real Redis, peering as the chart runs them (issue #3).

- One ClusterKopfPeering (kopf's CRD, from the chart) lists both replicas; the older one has the
  higher priority and reconciles, the younger one waits paused: a policy is programmed once, by
  the older one, and the younger one's reconcile counter stays at zero.
- Both serve the admission webhooks with the same certificate, kept in one Secret: both answer
  ``/validate-policy`` over HTTPS verified against the Secret's CA, and the webhook
  configurations' ``caBundle`` is that CA.
- SIGKILL of the active replica: the other resumes when the dead one's keep-alive expires (the
  peering lifetime), removes it from the peering object and reconciles a new policy.
- The certificate Secret under races (in-process, against the same API server): replicas that
  all find it absent create it once (the others read the winner's), and replicas that all find
  it stale renew it once (resourceVersion conflicts), keeping the CA.

The operators serve only namespaces named ``sluice-ha-*`` (kopf namespace patterns), so other
test files' policies are left alone. Each replica registers the webhook configurations with a
URL to its own port (there is no Service to share here): the younger one registers last, so the
API server calls the replica that survives the kill. The configurations are cluster-wide (the
validating one is ``failurePolicy: Fail``): they are deleted at teardown before the operators
stop, or every later policy write in the session would be refused.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import http.client
import json
import logging
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from kubernetes import config as k8s_config
from sluice_core import configstore
from sluice_operator import certstore
from sluice_operator.certstore import ensure_shared_certificates
from support.control_plane import ControlPlane
from support.crds import apply_crds, established
from support.examples import expectation
from support.operator_process import OperatorProcess
from support.paths import ROOT
from support.polling import poll
from support.redis_servers import pick_port
from support.sluice_objects import (
    WEBHOOK_CONFIGS,
    delete_webhook_configurations,
    peers,
    policy_manifest,
    programmed,
)
from support.store_calls import store_call

pytestmark = pytest.mark.k8s

PEERING_CRD = ROOT / "charts" / "sluice" / "crds" / "kopf.dev_clusterkopfpeerings.yaml"
BAD_REGEX = ROOT / "crds" / "examples" / "bad" / "bad-regex.yaml"
NS_PREFIX = "sluice-ha"
LIFETIME_S = 6  # peering lifetime: how long a killed replica blocks the other one at most
RESUMING = "Resuming operations after the pause"  # kopf's log line when a replica goes active


# ---------------------------------------------------------------------------------------------
# two operator processes


def start_replica(identity: str, cp: ControlPlane, redis_url: str, workdir: Path, peering: str,
            secret: str | None) -> OperatorProcess:
    """``sluice operator --peering ...``; ``secret`` None: no webhooks (they would re-register
    the configurations)."""
    port = pick_port()
    webhooks = [] if secret is None else [
        "--webhook-listen", f"127.0.0.1:{port}",
        "--webhook-url", f"https://127.0.0.1:{port}",
        "--webhook-cert-dir", str(workdir / f"certs-{identity}"),
        "--webhook-provided-cert-dir", str(workdir / "no-cert-manager"),
        "--webhook-cert-secret", secret]
    return OperatorProcess(
        identity, cp.kubeconfig, redis_url, workdir,
        ["--resync-interval-s", "1", "--namespace", f"{NS_PREFIX}-*", "--peering", peering,
         "--peering-lifetime-s", str(LIFETIME_S), *webhooks], webhook_port=port)


@dataclass
class Pair:
    cp: ControlPlane
    redis_url: str
    peering: str
    secret_ns: str
    secret_name: str
    older: OperatorProcess
    younger: OperatorProcess
    namespaces: list[str] = field(default_factory=list)  # created here: deleted at teardown

    @property
    def replicas(self) -> list[OperatorProcess]:
        return [self.older, self.younger]

    def diagnose(self) -> str:
        return "\n".join(r.report() for r in self.replicas)

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        return poll(predicate, what, timeout, diagnose=self.diagnose)

    def secret(self) -> dict[str, bytes]:
        obj = self.cp.kubectl_json("get", "secret", self.secret_name, "-n", self.secret_ns)
        return {k: base64.b64decode(v) for k, v in obj["data"].items()}

    def namespace(self) -> str:
        return new_namespace(self.cp, self.namespaces)


def new_namespace(cp: ControlPlane, created: list[str]) -> str:
    ns = f"{NS_PREFIX}-{uuid.uuid4().hex[:6]}"
    cp.kubectl("create", "namespace", ns)
    created.append(ns)
    return ns


@pytest.fixture(scope="module")
def k8s(control_plane: ControlPlane) -> ControlPlane:
    """The control plane with Sluice's CRDs and kopf's ClusterKopfPeering CRD (the chart's)."""
    cp = apply_crds(control_plane)
    cp.kubectl("apply", "-f", str(PEERING_CRD))
    poll(lambda: established(cp, "clusterkopfpeerings.kopf.dev"),
         "ClusterKopfPeering CRD Established")
    return cp


@pytest.fixture(scope="module")
def pair(k8s: ControlPlane, redis_server: Any, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Pair]:
    """Two replicas, the second started once the first is active (it is then the older, with
    the higher priority); both webhooks registered and called by the API server."""
    cp, suffix = k8s, uuid.uuid4().hex[:6]
    workdir = tmp_path_factory.mktemp("peering")
    peering, secret_ns, secret_name = f"sluice-ha-{suffix}", "default", f"sluice-ha-{suffix}-tls"
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
        "metadata": {"name": peering}}))
    started: list[OperatorProcess] = []
    namespaces: list[str] = []
    # kopf starts peering (and watching) per served namespace: with a pattern and no namespace
    # that matches it yet, a replica has nothing to do and no keep-alive to send
    new_namespace(cp, namespaces)

    def start(identity: str) -> OperatorProcess:
        replica = start_replica(f"{identity}-{suffix}", cp, redis_server.url, workdir, peering,
                                f"{secret_ns}/{secret_name}")
        started.append(replica)
        return replica

    def diagnose() -> str:
        return "\n".join(r.report() for r in started)

    def active(replica: OperatorProcess) -> bool:
        replica.check_alive()
        return RESUMING in replica.log()

    pair_: Pair | None = None
    try:
        older = start("older")
        # kopf peers only after the start-up handlers (webhooks registered) have run
        poll(lambda: active(older), "the first replica active", diagnose=diagnose)
        younger = start("younger")
        pair_ = Pair(cp, redis_server.url, peering,
                     secret_ns, secret_name, older, younger, namespaces)
        pair_.wait(lambda: younger.check_alive() or set(peers(cp, peering)) == {
            older.identity, younger.identity}, "both replicas in the ClusterKopfPeering")
        wait_webhooks_called(pair_)
        yield pair_
    finally:
        # before the operators stop (failurePolicy Fail)
        delete_webhook_configurations(cp, check=False)
        for ns in namespaces:  # policies go while an operator can remove their finalizers
            cp.kubectl("delete", "rlp", "--all", "-n", ns, "--timeout=20s", check=False)
        for replica in started:
            replica.stop()
        for ns in namespaces:  # a failed test may leave finalizers nobody removes
            with contextlib.suppress(Exception):
                for obj in cp.kubectl_json("get", "rlp", "-n", ns)["items"]:
                    cp.kubectl("patch", "rlp", obj["metadata"]["name"], "-n", ns,
                               "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                               check=False)
            cp.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")
        cp.kubectl("delete", "clusterkopfpeering", peering, "--ignore-not-found", check=False)
        cp.kubectl("delete", "secret", secret_name, "-n", secret_ns, "--ignore-not-found",
                   check=False)


def wait_webhooks_called(pair: Pair) -> None:
    """The younger replica registered last: once the API server's informer has its
    configuration, a bad policy (server-side dry run) is refused with the parser's message."""
    cp, port = pair.cp, pair.younger.webhook_port

    def registered_to_younger() -> bool:
        res = cp.kubectl("get", *WEBHOOK_CONFIGS[0], "-o", "json", check=False)
        return res.returncode == 0 and f":{port}/" in json.loads(res.stdout)["webhooks"][0][
            "clientConfig"].get("url", "")

    def refused() -> bool:
        res = cp.kubectl("create", "--dry-run=server", "-n", "default", "-f", str(BAD_REGEX),
                         check=False)
        return res.returncode != 0 and expectation(BAD_REGEX) in res.stderr

    pair.wait(registered_to_younger, "the webhook configurations registered by both replicas")
    pair.wait(refused, "the API server calling the validating webhook")


# ---------------------------------------------------------------------------------------------
# (a) one active replica, one paused


def test_one_replica_reconciles_the_other_waits(pair: Pair) -> None:
    older, younger = pair.older, pair.younger
    entries = peers(pair.cp, pair.peering)
    assert set(entries) == {older.identity, younger.identity}, entries
    # the older replica leads: a higher priority; both announce the same lifetime
    assert entries[older.identity]["priority"] > entries[younger.identity]["priority"], entries
    assert {p["lifetime"] for p in entries.values()} == {LIFETIME_S}, entries

    ns = pair.namespace()
    pair.cp.kubectl("apply", "-f", "-", input=policy_manifest("api", ns))
    pair.wait(lambda: programmed(pair.cp, "rlp", "api", ns), f"rlp {ns}/api Programmed")
    # programmed once: one config version in Redis, written by the older replica only; the
    # resync (1 s) keeps running in the older replica and never in the younger one
    start = older.counter("sluice_operator_resyncs")
    pair.wait(lambda: older.counter("sluice_operator_resyncs") >= start + 2,
              "two more resyncs by the active replica")
    cfg = store_call(pair.redis_url, configstore.read, ns)
    assert cfg is not None and cfg.version == 1, cfg
    assert older.counter("sluice_operator_config_pushes") >= 1
    for replica in pair.replicas:
        replica.check_alive()
    assert younger.counter("sluice_operator_reconciles") == 0, pair.diagnose()
    assert younger.counter("sluice_operator_config_pushes") == 0, pair.diagnose()
    assert younger.counter("sluice_operator_resyncs") == 0, pair.diagnose()
    assert RESUMING not in younger.log(), pair.diagnose()
    assert "Handler 'policy'" not in younger.log(), pair.diagnose()


# ---------------------------------------------------------------------------------------------
# (c) both replicas serve the webhooks with one certificate


def test_every_replica_serves_the_webhooks_with_the_shared_certificate(pair: Pair) -> None:
    secret = pair.secret()
    ca_pem, cert_pem = secret["ca.crt"], secret["tls.crt"]
    served_der = x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER)
    ctx = ssl.create_default_context(cadata=ca_pem.decode())  # the Secret's CA, nothing else
    bad = yaml.safe_load(BAD_REGEX.read_text())
    for replica in pair.replicas:
        body = json.dumps({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": str(uuid.uuid4()), "operation": "CREATE", "namespace": "default",
                        "name": bad["metadata"]["name"], "object": bad,
                        "kind": {"group": "sluice.dev", "version": "v1alpha1",
                                 "kind": "RateLimitPolicy"}}})
        conn = http.client.HTTPSConnection("127.0.0.1", replica.webhook_port, context=ctx,
                                           timeout=10)
        try:
            conn.request("POST", "/validate-policy", body=body,
                         headers={"Content-Type": "application/json"})
            answer = json.loads(conn.getresponse().read())
            assert conn.sock is not None
            peer = conn.sock.getpeercert(binary_form=True)
        finally:
            conn.close()
        assert peer == served_der, f"{replica.identity} serves another certificate"
        assert answer["response"]["allowed"] is False, answer
        assert expectation(BAD_REGEX) in answer["response"]["status"]["message"], answer
    # the configurations carry that CA (both replicas patched the same bundle)
    for kind, name in WEBHOOK_CONFIGS:
        hooks = pair.cp.kubectl_json("get", kind, name)["webhooks"]
        assert base64.b64decode(hooks[0]["clientConfig"]["caBundle"]) == ca_pem, name


# ---------------------------------------------------------------------------------------------
# (b) the active replica is killed: the other takes over


def test_takeover_after_sigkill(pair: Pair) -> None:
    older, younger = pair.older, pair.younger
    assert RESUMING not in younger.log()
    t0 = time.monotonic()
    older.kill()  # no goodbye: its entry stays until its keep-alive expires
    pair.wait(lambda: younger.check_alive() or RESUMING in younger.log(),
              "the younger replica resumes", timeout=LIFETIME_S + 15)
    resumed = time.monotonic() - t0
    ns = pair.namespace()
    pair.cp.kubectl("apply", "-f", "-", input=policy_manifest("after", ns))  # webhook: younger
    pair.wait(lambda: programmed(pair.cp, "rlp", "after", ns), f"rlp {ns}/after Programmed")
    programmed_after = time.monotonic() - t0
    assert store_call(pair.redis_url, configstore.read, ns) is not None
    assert younger.counter("sluice_operator_reconciles") > 0
    pair.wait(lambda: set(peers(pair.cp, pair.peering)) == {younger.identity},
              "the dead replica removed from the ClusterKopfPeering")
    sys.stderr.write(f"\ntakeover: resumed {resumed:.1f} s after SIGKILL, new policy "
                     f"programmed after {programmed_after:.1f} s (lifetime {LIFETIME_S} s)\n")
    # kopf resumes once the dead entry's lifetime has passed, then a PATCH, a watch event and
    # the log line: slack for a slow CI machine
    assert resumed <= LIFETIME_S + 10, f"took over after {resumed:.1f} s"


def test_missing_peering_object_is_reported(pair: Pair, tmp_path: Path) -> None:
    """kopf waits paused, logging nothing above DEBUG, for a peering object that does not
    exist: the operator says so."""
    name = f"sluice-ha-missing-{uuid.uuid4().hex[:6]}"
    replica = start_replica(f"lost-{name}", pair.cp, pair.redis_url, tmp_path, name, None)
    try:
        poll(lambda: replica.check_alive() or "the ClusterKopfPeering object does not exist"
             in replica.log(), "the error about the missing peering object",
             diagnose=replica.report)
        assert f"peering {name!r}" in replica.log()
        assert RESUMING not in replica.log()
    finally:
        replica.stop()


# ---------------------------------------------------------------------------------------------
# the certificate Secret under races (in-process replicas, the real API server)


def test_shared_certificate_created_and_renewed_once_under_races(
        k8s: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    n, ns, name = 4, "default", f"sluice-ha-race-{uuid.uuid4().hex[:6]}"
    read = certstore._read

    def run(dns: list[str], **kw: Any) -> list[bytes]:
        """n replicas at once; each one's first read waits for all: all see the same state."""
        barrier, first = threading.Barrier(n, timeout=30), threading.local()

        def racing_read(api: Any, namespace: str, secret: str) -> Any:
            got = read(api, namespace, secret)
            if not getattr(first, "done", False):
                first.done = True
                barrier.wait()
            return got

        monkeypatch.setattr(certstore, "_read", racing_read)
        results: list[bytes | BaseException] = [b""] * n

        def replica(i: int) -> None:
            api = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=str(k8s.kubeconfig))
            try:
                bundle = ensure_shared_certificates(api, f"{ns}/{name}", tmp_path / str(i), dns,
                                                    ["127.0.0.1"], **kw)
                results[i] = bundle.ca_pem + bundle.cert_path.read_bytes()
            except BaseException as exc:
                results[i] = exc
            finally:
                api.close()

        threads = [threading.Thread(target=replica, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors
        return [r for r in results if isinstance(r, bytes)]

    def stored() -> tuple[bytes, bytes, str]:
        obj = k8s.kubectl_json("get", "secret", name, "-n", ns)
        data = {k: base64.b64decode(v) for k, v in obj["data"].items()}
        return data["ca.crt"], data["tls.crt"], obj["metadata"]["resourceVersion"]

    def messages(text: str) -> int:
        return sum(text in r.getMessage() for r in caplog.records)

    caplog.set_level(logging.INFO, logger="sluice.operator")
    try:
        # all find it absent: one create wins, the others get 409 AlreadyExists and use it
        created = run(["localhost"])
        ca, cert, version = stored()
        assert created == [ca + cert] * n
        assert messages("created in Secret") == 1
        assert messages("wrote Secret") == n - 1
        assert k8s.kubectl_json("get", "secret", name, "-n", ns)["type"] == "kubernetes.io/tls"

        # all find it stale (a name it lacks): one replace wins, the others get 409 Conflict,
        # read again and use the winner's; the CA stays, the names grow
        caplog.clear()
        renewed = run(["localhost", "extra.example"])
        ca2, cert2, version2 = stored()
        assert renewed == [ca2 + cert2] * n
        assert ca2 == ca and cert2 != cert and version2 != version
        assert messages("renewed") == 1 and messages("wrote Secret") == n - 1
        san = x509.load_pem_x509_certificate(cert2).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "extra.example"}

        # a replica that wants only "localhost" uses the wider certificate as it is
        caplog.clear()
        assert run(["localhost"]) == [ca2 + cert2] * n and stored()[2] == version2
        assert messages("renewed") == 0

        # near expiry (renew 400 days before a 365-day certificate's end): renewed once, same CA
        caplog.clear()
        again = run(["localhost"], renew_before=dt.timedelta(days=400),
                    validity=dt.timedelta(days=500))
        ca3, cert3, _ = stored()
        assert again == [ca3 + cert3] * n and ca3 == ca and cert3 != cert2
        assert messages("renewed") == 1
    finally:
        k8s.kubectl("delete", "secret", name, "-n", ns, "--ignore-not-found", check=False)
