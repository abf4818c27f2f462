"""With the operator away (uninstalled, being reinstalled, restarting) nothing may get stuck
(#12, defect 4), against the real API server:

- the validating webhook configuration, as the operator writes it (failing closed), is not
  called for updates that change no spec: labels, finalizer removals and the deletion of a
  policy go through while nobody serves it; a spec change is still refused;
- policies carry no finalizer of the operator: after it is gone, deleting a policy or its
  namespace is not held up;
- a policy deleted while no operator ran leaves Redis when one returns;
- the operator's certificate Secret goes with the webhook configuration Helm deletes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sluice_operator.handlers import FINALIZER
from sluice_operator.webhook_config import VALIDATING_NAME, Endpoint, validating
from support.control_plane import ControlPlane
from support.crds import apply_crds
from support.operator_thread import running_operator
from support.polling import poll
from support.processes import SidecarProcess, UpstreamProcess, http_get
from support.redis_servers import pick_port
from support.sluice_objects import delete_webhook_configurations, policy_manifest, programmed

pytestmark = pytest.mark.k8s
NO_POLICIES = SimpleNamespace(policies=())


@pytest.fixture(scope="module")
def k8s(control_plane: ControlPlane) -> ControlPlane:
    return apply_crds(control_plane)


@pytest.fixture
def namespace(k8s: ControlPlane) -> Iterator[str]:
    ns = f"sluice-away-{uuid.uuid4().hex[:6]}"
    k8s.kubectl("create", "namespace", ns)
    try:
        yield ns
    finally:
        k8s.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


@pytest.fixture
def webhook_cleanup(k8s: ControlPlane) -> Iterator[None]:
    """Whatever the test leaves, the validating configuration goes (failing closed, nobody
    serving it, it would refuse every later policy write of the session)."""
    try:
        yield
    finally:
        k8s.kubectl("delete", "validatingwebhookconfiguration", VALIDATING_NAME, "--ignore-not-found")


def test_updates_that_change_no_spec_pass_while_no_operator_serves_the_webhook(
        k8s: ControlPlane, namespace: str, webhook_cleanup: None) -> None:
    ns = namespace
    # Stored with the operator's finalizer, as a policy is when `helm uninstall` takes the
    # operator away; then the configuration the operator writes, pointing at nobody.
    k8s.kubectl("apply", "-f", "-", input=policy_manifest("kept", ns))
    k8s.kubectl("patch", "rlp", "kept", "-n", ns, "--type=merge",
                "-p", json.dumps({"metadata": {"finalizers": [FINALIZER]}}))
    manifest = validating(Endpoint(url=f"https://127.0.0.1:{pick_port()}"), b"")
    k8s.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    # The API server takes a configuration up a moment after it is written: a spec change
    # refused (nobody serves the webhook, which fails closed) says it is in force.
    def spec_change_refused() -> bool:
        res = k8s.kubectl("patch", "rlp", "kept", "-n", ns, "--type=merge", "-p", json.dumps(
            {"spec": {"tiers": [{"name": "free", "requests": 11, "period": "1m"}]}}), check=False)
        return res.returncode != 0 and "policies.sluice.dev" in res.stderr

    poll(spec_change_refused, "the webhook configuration in force")

    res = k8s.kubectl("label", "rlp", "kept", "-n", ns, "team=payments", check=False)
    assert res.returncode == 0, res.stderr
    # deleted: the object waits for its finalizer; removing it is a metadata-only update
    k8s.kubectl("delete", "rlp", "kept", "-n", ns, "--wait=false")
    res = k8s.kubectl("patch", "rlp", "kept", "-n", ns, "--type=json",
                      "-p", json.dumps([{"op": "remove", "path": "/metadata/finalizers"}]), check=False)
    assert res.returncode == 0, res.stderr
    poll(lambda: k8s.kubectl("get", "rlp", "kept", "-n", ns, check=False).returncode != 0, "the policy gone")


def test_uninstall_leaves_no_namespace_stuck(k8s: ControlPlane, redis_server: Any) -> None:
    """The operator served a policy, then went (helm uninstall): its namespace, and a policy
    deleted meanwhile, go at once; nothing waits for a finalizer nobody will remove."""
    ns = f"sluice-away-{uuid.uuid4().hex[:6]}"
    k8s.kubectl("create", "namespace", ns)
    try:
        with running_operator(k8s, redis_server, ns) as op:
            for name in ("api", "other"):
                k8s.kubectl("apply", "-f", "-", input=policy_manifest(name, ns))
                poll(lambda name=name: programmed(k8s, "rlp", name, ns), f"{name} Programmed")
            poll(lambda: {p.name for p in (op.config(ns) or NO_POLICIES).policies} == {"api", "other"},
                 "both in Redis")
            # kopf has removed the finalizer of an earlier release's policies by now, or never added it
            assert not any(FINALIZER in (op.rlp(ns, n) or {})["metadata"].get("finalizers", []) for n in ("api", "other"))
        res = k8s.kubectl("delete", "rlp", "other", "-n", ns, "--timeout=20s", check=False)
        assert res.returncode == 0, res.stderr
        k8s.kubectl("delete", "namespace", ns, "--wait=false")
        poll(lambda: k8s.kubectl("get", "namespace", ns, check=False).returncode != 0,
             f"namespace {ns} gone", timeout=60)
    finally:
        k8s.kubectl("patch", "rlp", "api", "-n", ns, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                    check=False)
        k8s.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


def test_the_webhook_certificate_secret_goes_with_the_webhook_configuration(
        k8s: ControlPlane, redis_server: Any, tmp_path: Path) -> None:
    """The operator's shared certificate Secret (Helm does not know it) is owned by the
    validating configuration (which Helm deletes): the garbage collector removes it too."""
    ns = f"sluice-away-{uuid.uuid4().hex[:6]}"
    k8s.kubectl("create", "namespace", ns)
    port = pick_port()
    try:
        with running_operator(k8s, redis_server, ns, webhook_listen=f"127.0.0.1:{port}",
                              webhook_endpoint=Endpoint(url=f"https://127.0.0.1:{port}"),
                              webhook_dns_names=("localhost",), webhook_ips=("127.0.0.1",),
                              webhook_cert_dir=str(tmp_path / "certs"), webhook_provided_cert_dir=None,
                              webhook_cert_secret=f"{ns}/sluice-webhook-tls"):
            uid = poll(lambda: k8s.kubectl_json("get", "validatingwebhookconfiguration", VALIDATING_NAME)
                       ["metadata"]["uid"], "the validating configuration")

            def owners() -> list[dict[str, Any]]:
                res = k8s.kubectl("get", "secret", "sluice-webhook-tls", "-n", ns, "-o", "json", check=False)
                return list(json.loads(res.stdout)["metadata"].get("ownerReferences") or []) if res.returncode == 0 else []

            (owner,) = poll(owners, "the Secret owned")
            assert (owner["kind"], owner["name"], owner["uid"]) == ("ValidatingWebhookConfiguration", VALIDATING_NAME, uid)
        # helm uninstall: the chart's configurations go, and with them the Secret
        delete_webhook_configurations(k8s)
        poll(lambda: k8s.kubectl("get", "secret", "sluice-webhook-tls", "-n", ns, check=False).returncode != 0,
             "the Secret garbage-collected", timeout=60)
    finally:
        delete_webhook_configurations(k8s, check=False)
        k8s.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


def test_a_policy_deleted_while_no_operator_ran_leaves_redis_when_one_returns(
        k8s: ControlPlane, redis_server: Any, tmp_path: Path) -> None:
    """Nothing holds a deletion now, so one can happen while no operator runs. A sidecar still
    enforcing the policy says so in its heartbeat; the returning operator, whose index lacks
    the policy, asks the API server and takes it out of Redis on its 404."""
    ns = f"sluice-away-{uuid.uuid4().hex[:6]}"
    k8s.kubectl("create", "namespace", ns)
    labels = tmp_path / "labels"
    labels.write_text('app="web"\n')
    up = UpstreamProcess()
    sidecar = SidecarProcess(up.url, "--redis", redis_server.url, "--namespace", ns, "--pod-labels", str(labels),
                             "--pod-name", "web-1", "--poll-interval-s", "0.5", wait_ready=False)

    def enforcing() -> Any:
        try:
            return json.loads(http_get(sidecar.admin + "/readyz")[1])["config"]["policyRef"]
        except OSError:
            return "(not up yet)"

    try:
        with running_operator(k8s, redis_server, ns, resync_interval_s=1.0):
            k8s.kubectl("apply", "-f", "-", input=policy_manifest("api", ns))
            poll(lambda: enforcing() == f"{ns}/api", "the sidecar enforcing api")
        k8s.kubectl("delete", "rlp", "api", "-n", ns, "--timeout=20s")  # no operator: nothing to wait for
        assert enforcing() == f"{ns}/api"  # Redis still serves it
        with running_operator(k8s, redis_server, ns, resync_interval_s=1.0) as op:
            poll(lambda: (c := op.config(ns)) is not None and not c.policies, "the policy out of Redis")
            poll(lambda: enforcing() is None, "the sidecar enforcing nothing")
    finally:
        sidecar.close()
        up.close()
        k8s.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")
