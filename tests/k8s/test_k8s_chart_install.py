"""The Helm chart in charts/sluice installed into the real control plane, and the operator
running under the chart's RBAC (tests/support/control_plane.py).

- ``helm install`` (``--wait=false``: there is no kubelet) creates the ServiceAccount,
  ClusterRole(Binding), Role(Binding) for the webhook certificate Secret, Deployment (two
  replicas, peering), PodDisruptionBudget, ClusterKopfPeering, webhook Service, the webhook
  configurations (Helm's, no caBundle) and CRDs.
- RBAC: with a token minted for the chart's ServiceAccount, SelfSubjectAccessReviews show the
  verbs the operator needs are allowed and the dangerous ones (secret get/writes, pod creation,
  RBAC escalation, deleting policies or CRDs, ...) are denied.
- ``sluice operator`` runs as a local process authenticated with that token only (a kubeconfig
  with the token, the server and the CA), with the chart's peering and certificate Secret,
  against a real Redis: it keeps its entry in the release's ClusterKopfPeering, a policy reaches
  Redis and its status, a key Secret's hash reaches Redis, an invalid policy gets an Event, the
  webhook certificate Secret is created, the chart's webhook configurations (refusing policies
  until then) get its CA and URL by a merge patch that keeps Helm's ownership (again on
  restart) and refuse a bad policy, sidecar injection reads the namespace's labels, a restart
  renews a damaged certificate Secret (update) with the same CA, deletion clears the finalizer,
  and ``webhook.enabled=false`` then removes the patched configurations.
  Any ``Forbidden`` in its log fails the test.
- A release of its own: the operator's create-or-patch keeps Helm's ownership, ``helm upgrade``
  keeps the caBundle, ``helm uninstall`` removes both configurations; ones an operator created
  without the chart are refused by ``helm install`` until adopted (charts/sluice/README.md).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from sluice_operator.webhook_config import Endpoint
from support.chart import CHART, helm, operator_webhook_configurations
from support.control_plane import ControlPlane, bin_dir
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


# ---------------------------------------------------------------------------------------------
# installed into the control plane


@dataclass
class Release:
    name: str
    namespace: str
    fullname: str
    service_account: str
    kubeconfig: Path  # the service account's token, server and CA: nothing else
    cp: ControlPlane

    def as_operator(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """kubectl authenticated as the chart's ServiceAccount."""
        res = subprocess.run([str(bin_dir() / "kubectl"), f"--kubeconfig={self.kubeconfig}",
                              f"--cache-dir={self.kubeconfig.parent / 'sa-cache'}", *args],
                             capture_output=True, text=True, timeout=60, check=False,
                             stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            pytest.fail(f"kubectl (as the operator) {' '.join(args)}: {res.stderr}")
        return res


def helm_on(cp: ControlPlane, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """helm against the control plane (admin credentials)."""
    return helm(*args, "--kubeconfig", str(cp.kubeconfig), check=check)


def set_webhooks(release: Release, enabled: bool, *, check: bool = True) -> None:
    helm_on(release.cp, "upgrade", release.name, str(CHART), "--namespace", release.namespace,
            "--reuse-values", "--wait=false", "--set", f"webhook.enabled={str(enabled).lower()}",
            check=check)


def webhook_configuration(cp: ControlPlane, kind: str, name: str) -> dict[str, Any] | None:
    res = cp.kubectl("get", kind, name, "-o", "json", check=False)
    if res.returncode != 0:
        assert "NotFound" in res.stderr, res.stderr
        return None
    return dict(json.loads(res.stdout))


def assert_helm_owned(obj: dict[str, Any] | None, release_name: str, namespace: str) -> None:
    """Helm's ownership metadata: without it ``helm upgrade`` refuses the object ("invalid
    ownership metadata") and the release no longer removes it."""
    assert obj is not None, "no such object"
    meta = obj["metadata"]
    assert meta["labels"].get("app.kubernetes.io/managed-by") == "Helm", meta
    assert meta.get("annotations", {}).get("meta.helm.sh/release-name") == release_name, meta
    assert meta["annotations"].get("meta.helm.sh/release-namespace") == namespace, meta


def assert_the_charts(cp: ControlPlane, release_name: str, namespace: str, fullname: str) -> None:
    """Both configurations as the chart creates them: Helm's, the release's webhook Service,
    no caBundle (until the operator patches it in)."""
    for kind, name in WEBHOOK_CONFIGS:
        obj = webhook_configuration(cp, kind, name)
        assert obj is not None, f"{kind} {name} missing"
        assert_helm_owned(obj, release_name, namespace)
        (hook,) = obj["webhooks"]
        assert "caBundle" not in hook["clientConfig"], name
        assert hook["clientConfig"]["service"]["namespace"] == namespace
        assert hook["clientConfig"]["service"]["name"] == f"{fullname}-webhook"


def assert_gone(cp: ControlPlane, what: str) -> None:
    left = [name for kind, name in WEBHOOK_CONFIGS if webhook_configuration(cp, kind, name)]
    assert not left, f"{what} left {left} behind"


@pytest.fixture(scope="module")
def release(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Release]:
    cp = control_plane
    suffix = uuid.uuid4().hex[:6]
    name, ns = f"sl-{suffix}", f"sluice-chart-{suffix}"
    cp.kubectl("create", "namespace", ns)
    helm("install", name, str(CHART), "--kubeconfig", str(cp.kubeconfig), "--namespace", ns,
         "--wait=false", "--set", "redis.enabled=false",
         "--set", "externalRedis.url=redis://redis.example:6379",
         "--set", "analytics.enabled=false")  # the operator's objects only (its own test file)
    fullname = f"{name}-sluice"
    try:
        token = cp.kubectl("create", "token", fullname, "-n", ns, "--duration=1h").stdout.strip()
        kubeconfig = tmp_path_factory.mktemp("sa") / "operator.kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "sluice", "cluster": {
                "server": cp.server, "certificate-authority": str(cp.ca_cert)}}],
            "users": [{"name": "operator", "user": {"token": token}}],
            "contexts": [{"name": "sluice", "context": {"cluster": "sluice", "user": "operator"}}],
            "current-context": "sluice"}))
        kubeconfig.chmod(0o600)
        yield Release(name, ns, fullname, fullname, kubeconfig, cp)
    finally:
        helm("uninstall", name, "--kubeconfig", str(cp.kubeconfig), "--namespace", ns,
             check=False)
        # the release's sluice-policies (failurePolicy Fail, a Service nobody serves) must not
        # outlive this module, whatever happened to the release
        delete_webhook_configurations(cp, check=False)
        cp.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


def test_install_creates_the_objects(release: Release) -> None:
    cp, ns, full = release.cp, release.namespace, release.fullname
    status = json.loads(helm("status", release.name, "--kubeconfig", str(cp.kubeconfig),
                             "--namespace", ns, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    assert cp.kubectl_json("get", "serviceaccount", full, "-n", ns)["metadata"]["name"] == full
    role = cp.kubectl_json("get", "clusterrole", f"{full}-operator")
    binding = cp.kubectl_json("get", "clusterrolebinding", f"{full}-operator")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": full, "namespace": ns}]
    dep = cp.kubectl_json("get", "deployment", f"{full}-operator", "-n", ns)
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert f"--webhook-service={ns}/{full}-webhook:443" in c["args"]
    svc = cp.kubectl_json("get", "service", f"{full}-webhook", "-n", ns)
    assert svc["spec"]["ports"][0]["port"] == 443 and svc["spec"]["clusterIP"]
    # high availability: the peering object, the certificate Secret's Role, the PDB
    assert dep["spec"]["replicas"] == 2
    assert f"--peering={full}" in c["args"]
    assert cp.kubectl_json("get", "clusterkopfpeering", full)["metadata"]["name"] == full
    role = cp.kubectl_json("get", "role", f"{full}-operator", "-n", ns)
    assert role["rules"][1]["resourceNames"] == [f"{full}-webhook-tls"]
    assert cp.kubectl_json("get", "rolebinding", f"{full}-operator", "-n", ns)["subjects"] == [
        {"kind": "ServiceAccount", "name": full, "namespace": ns}]
    pdb = cp.kubectl_json("get", "poddisruptionbudget", f"{full}-operator", "-n", ns)
    assert pdb["spec"]["maxUnavailable"] == 1
    # the webhook configurations are the release's (no caBundle until the operator runs)
    assert_the_charts(cp, release.name, ns, full)
    for crd in ("ratelimitpolicies.sluice.dev", "clusterratelimitpolicies.sluice.dev",
                "clusterkopfpeerings.kopf.dev"):
        poll(lambda crd=crd: any(
            c["type"] == "Established" and c["status"] == "True"
            for c in cp.kubectl_json("get", "crd", crd).get("status", {}).get("conditions", [])),
            f"CRD {crd} Established")
    # the controller-manager turns the Deployment into a ReplicaSet and a (Pending) Pod that
    # runs as the chart's ServiceAccount
    pods = poll(lambda: cp.kubectl_json("get", "pods", "-n", ns)["items"], "the operator pod")
    assert pods[0]["spec"]["serviceAccountName"] == full


# (verb, group, resource, subresource, namespace, name)
Access = tuple[str, str, str, str, str, str]
ALLOWED: list[Access] = [
    ("list", "sluice.dev", "ratelimitpolicies", "", "", ""),
    ("watch", "sluice.dev", "ratelimitpolicies", "", "", ""),
    ("patch", "sluice.dev", "ratelimitpolicies", "", "team-a", "p"),
    ("patch", "sluice.dev", "ratelimitpolicies", "status", "team-a", "p"),
    ("list", "", "secrets", "", "", ""),
    ("watch", "", "secrets", "", "", ""),
    ("create", "", "events", "", "team-a", ""),
    ("list", "sluice.dev", "clusterratelimitpolicies", "", "", ""),
    ("watch", "sluice.dev", "clusterratelimitpolicies", "", "", ""),
    ("patch", "sluice.dev", "clusterratelimitpolicies", "", "", "shared"),
    ("patch", "sluice.dev", "clusterratelimitpolicies", "status", "", "shared"),
    ("list", "apiextensions.k8s.io", "customresourcedefinitions", "", "", ""),
    ("watch", "apiextensions.k8s.io", "customresourcedefinitions", "", "", ""),
    ("get", "", "namespaces", "", "", "team-a"),
    ("list", "", "namespaces", "", "", ""),
    ("watch", "", "namespaces", "", "", ""),
    ("list", "kopf.dev", "clusterkopfpeerings", "", "", ""),
    ("watch", "kopf.dev", "clusterkopfpeerings", "", "", ""),
    ("patch", "admissionregistration.k8s.io", "validatingwebhookconfigurations", "", "",
     "sluice-policies"),
    ("patch", "admissionregistration.k8s.io", "mutatingwebhookconfigurations", "", "",
     "sluice-injector"),
]
DENIED: list[Access] = [
    ("*", "*", "*", "", "", ""),  # not cluster-admin
    ("get", "", "secrets", "", "team-a", "db-password"),  # list/watch only, see the ClusterRole
    ("create", "", "secrets", "", "team-a", ""),
    ("update", "", "secrets", "", "team-a", "k"),
    ("patch", "", "secrets", "", "team-a", "k"),
    ("delete", "", "secrets", "", "team-a", "k"),
    ("deletecollection", "", "secrets", "", "team-a", ""),
    ("create", "", "pods", "", "team-a", ""),
    ("create", "", "pods", "exec", "team-a", "p"),
    ("delete", "", "pods", "", "team-a", "p"),
    ("list", "", "pods", "", "", ""),
    ("create", "apps", "deployments", "", "team-a", ""),
    ("create", "", "serviceaccounts", "token", "team-a", "default"),
    ("list", "", "configmaps", "", "", ""),
    ("update", "", "namespaces", "", "", "team-a"),
    ("create", "", "namespaces", "", "", ""),
    ("create", "sluice.dev", "ratelimitpolicies", "", "team-a", ""),
    ("update", "sluice.dev", "ratelimitpolicies", "", "team-a", "p"),
    ("delete", "sluice.dev", "ratelimitpolicies", "", "team-a", "p"),
    ("get", "sluice.dev", "ratelimitpolicies", "", "team-a", "p"),
    ("create", "sluice.dev", "clusterratelimitpolicies", "", "", ""),
    ("update", "sluice.dev", "clusterratelimitpolicies", "", "", "shared"),
    ("delete", "sluice.dev", "clusterratelimitpolicies", "", "", "shared"),
    ("update", "sluice.dev", "clusterratelimitpolicies", "status", "", "shared"),
    ("create", "apiextensions.k8s.io", "customresourcedefinitions", "", "", ""),
    ("update", "apiextensions.k8s.io", "customresourcedefinitions", "", "",
     "ratelimitpolicies.sluice.dev"),
    ("delete", "apiextensions.k8s.io", "customresourcedefinitions", "", "",
     "ratelimitpolicies.sluice.dev"),
    # --webhook-configurations=patch: Helm creates them (create cannot be limited by name, and a
    # mutating webhook of one's own would see every Pod)
    ("create", "admissionregistration.k8s.io", "validatingwebhookconfigurations", "", "", ""),
    ("create", "admissionregistration.k8s.io", "mutatingwebhookconfigurations", "", "", ""),
    ("patch", "admissionregistration.k8s.io", "validatingwebhookconfigurations", "", "",
     "someone-elses"),
    ("delete", "admissionregistration.k8s.io", "validatingwebhookconfigurations", "", "",
     "sluice-policies"),
    ("update", "admissionregistration.k8s.io", "mutatingwebhookconfigurations", "", "",
     "sluice-injector"),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings", "", "", ""),
    ("create", "rbac.authorization.k8s.io", "rolebindings", "", "team-a", ""),
    ("escalate", "rbac.authorization.k8s.io", "clusterroles", "", "", ""),
    ("bind", "rbac.authorization.k8s.io", "clusterroles", "", "", "cluster-admin"),
    ("impersonate", "", "users", "", "", "admin"),
    # kopf peering: list/watch, and patch of the release's own object only (release_accesses)
    ("create", "kopf.dev", "clusterkopfpeerings", "", "", ""),
    ("get", "kopf.dev", "clusterkopfpeerings", "", "", "default"),
    ("patch", "kopf.dev", "clusterkopfpeerings", "", "", "default"),
    ("update", "kopf.dev", "clusterkopfpeerings", "", "", "default"),
    ("delete", "kopf.dev", "clusterkopfpeerings", "", "", "default"),
    ("create", "kopf.dev", "kopfpeerings", "", "team-a", ""),
    ("patch", "kopf.dev", "kopfpeerings", "", "team-a", "default"),
]


def release_accesses(release: Release) -> tuple[list[Access], list[Access]]:
    """(allowed, denied) for the objects named after the release: its peering object and the
    webhook certificate Secret in its namespace (a Role there, nowhere else)."""
    ns, peering, secret = release.namespace, release.fullname, f"{release.fullname}-webhook-tls"
    allowed: list[Access] = [
        ("patch", "kopf.dev", "clusterkopfpeerings", "", "", peering),
        ("create", "", "secrets", "", ns, ""),
        ("get", "", "secrets", "", ns, secret),
        ("update", "", "secrets", "", ns, secret),
    ]
    denied: list[Access] = [
        ("get", "kopf.dev", "clusterkopfpeerings", "", "", peering),
        ("delete", "kopf.dev", "clusterkopfpeerings", "", "", peering),
        ("patch", "", "secrets", "", ns, secret),
        ("delete", "", "secrets", "", ns, secret),
        ("get", "", "secrets", "", ns, "other"),
        ("update", "", "secrets", "", ns, "other"),
        ("delete", "", "secrets", "", ns, "other"),
        ("get", "", "secrets", "", "team-a", secret),  # same name, another namespace
        ("update", "", "secrets", "", "team-a", secret),
        ("create", "", "secrets", "", "team-a", ""),
        ("create", "", "configmaps", "", ns, ""),
        ("create", "", "pods", "", ns, ""),
        ("create", "rbac.authorization.k8s.io", "rolebindings", "", ns, ""),
    ]
    return allowed, denied


def access_reviews(release: Release, accesses: list[Access]) -> list[bool]:
    """One ``kubectl create`` of a List of SelfSubjectAccessReviews, as the ServiceAccount."""
    items = []
    for verb, group, resource, sub, ns, name in accesses:
        attrs = {"verb": verb, "group": group, "resource": resource}
        attrs.update({k: v for k, v in (("subresource", sub), ("namespace", ns), ("name", name))
                      if v})
        items.append({"apiVersion": "authorization.k8s.io/v1",
                      "kind": "SelfSubjectAccessReview", "spec": {"resourceAttributes": attrs}})
    path = release.kubeconfig.parent / f"ssar-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    text = release.as_operator("create", "-f", str(path), "-o", "json").stdout
    results: list[dict[str, Any]] = []  # kubectl prints one JSON object per review
    decoder, pos = json.JSONDecoder(), 0
    while pos < len(text.rstrip()):
        obj, end = decoder.raw_decode(text, pos)
        results.extend(obj["items"] if obj.get("kind") == "List" else [obj])
        pos = end + len(text[end:]) - len(text[end:].lstrip())
    assert len(results) == len(accesses)
    return [bool(r["status"].get("allowed")) for r in results]


def test_token_is_the_chart_service_account(release: Release) -> None:
    who = json.loads(release.as_operator("auth", "whoami", "-o", "json").stdout)
    assert who["status"]["userInfo"]["username"] == (
        f"system:serviceaccount:{release.namespace}:{release.service_account}")


def test_rbac_allows_what_the_operator_needs(release: Release) -> None:
    allowed = ALLOWED + release_accesses(release)[0]
    results = access_reviews(release, allowed)
    missing = [a for a, ok in zip(allowed, results, strict=True) if not ok]
    assert not missing, f"the chart's ServiceAccount lacks: {missing}"


def test_rbac_denies_the_dangerous(release: Release) -> None:
    denied = DENIED + release_accesses(release)[1]
    results = access_reviews(release, denied)
    granted = [a for a, ok in zip(denied, results, strict=True) if ok]
    assert not granted, f"the chart's ServiceAccount may: {granted}"
    # and kubectl says the same for the headline ones
    assert release.as_operator("auth", "can-i", "delete", "secrets", "-A",
                               check=False).stdout.strip() == "no"
    assert release.as_operator("auth", "can-i", "create", "pods", "-n", "default",
                               check=False).stdout.strip() == "no"
    assert release.as_operator("auth", "can-i", "watch", "secrets", "-A").stdout.strip() == "yes"


# ---------------------------------------------------------------------------------------------
# the operator itself, under the chart's RBAC


def chart_operator(release: Release, redis_url: str, workdir: Path, tag: str, *,
                   service: bool = False) -> OperatorProcess:
    """``sluice operator`` with the release's token as its only credentials, run as the chart
    runs it: peering, the shared certificate Secret, cluster keys. The API server calls its
    webhooks at its loopback URL; with ``service``, the configurations name the release's
    Service as the chart's do (``helm upgrade`` then merges Helm's and the operator's
    ``clientConfig`` into a valid one; nothing can call the webhooks, no Pod serves them)."""
    port = pick_port()
    endpoint = (["--webhook-service", f"{release.namespace}/{release.fullname}-webhook:443"]
                if service else ["--webhook-url", f"https://127.0.0.1:{port}"])
    return OperatorProcess(
        f"operator-{tag}", release.kubeconfig, redis_url, workdir,
        ["--resync-interval-s", "2",
         "--webhook-listen", f"127.0.0.1:{port}", *endpoint,
         "--webhook-configurations", "patch",
         "--webhook-cert-dir", str(workdir / f"certs-{tag}"),
         "--webhook-provided-cert-dir", str(workdir / "no-cert-manager"),
         "--peering", release.fullname,
         "--webhook-cert-secret", f"{release.namespace}/{release.fullname}-webhook-tls",
         "--cluster-keys-namespace", release.namespace], webhook_port=port)


# HTTP status codes only where they stand as codes (not inside a log timestamp's milliseconds).
FORBIDDEN = re.compile(r"forbidden|unauthorized|(?<![\d,.:])\b40[13]\b(?![\d,.])", re.I)


def assert_no_permission_errors(op: OperatorProcess) -> None:
    bad = [line for line in op.log().splitlines() if FORBIDDEN.search(line)]
    assert not bad, "the operator hit missing permissions:\n" + "\n".join(bad[:20])


def test_operator_runs_under_the_chart_rbac(release: Release, redis_server: Any,
                                            tmp_path: Path) -> None:
    from sluice_core import configstore, keyschema

    cp = release.cp
    redis = redis_server.client()
    suffix = uuid.uuid4().hex[:6]
    ns, bad_ns = f"chart-op-{suffix}", f"chart-op-bad-{suffix}"
    cp.kubectl("create", "namespace", ns)
    cp.kubectl("create", "namespace", bad_ns)
    cp.kubectl("label", "namespace", ns, "sluice.dev/inject=true")
    bad = (ROOT / "crds" / "examples" / "bad" / "bad-regex.yaml").read_text()
    ops: list[OperatorProcess] = []

    def diagnose() -> str:
        return ops[-1].report() if ops else ""

    def wait(predicate: Callable[[], Any], what: str) -> Any:
        def probe() -> Any:
            ops[-1].check_alive()
            return predicate()
        return poll(probe, what, diagnose=diagnose)

    def rlp(name: str, namespace: str) -> dict[str, Any] | None:
        res = cp.kubectl("get", "rlp", name, "-n", namespace, "-o", "json", check=False)
        return json.loads(res.stdout) if res.returncode == 0 else None

    def ca_bundle(kind: str, name: str) -> str | None:
        res = cp.kubectl("get", kind, name, "-o", "json", check=False)
        if res.returncode != 0:
            return None
        hooks = json.loads(res.stdout)["webhooks"]
        return str(hooks[0]["clientConfig"].get("caBundle") or "") or None

    def cert_secret() -> dict[str, str]:
        res = cp.kubectl("get", "secret", f"{release.fullname}-webhook-tls", "-n",
                         release.namespace, "-o", "json", check=False)
        return dict(json.loads(res.stdout)["data"]) if res.returncode == 0 else {}

    def assert_patched_by_the_operator(op: OperatorProcess, ca_b64: str) -> None:
        """The chart's objects, merge patched: still Helm's, the operator's label added, and
        the webhooks exactly the operator's (its URL replacing the chart's Service, the CA)."""
        ca = base64.b64decode(ca_b64)
        want = operator_webhook_configurations(
            Endpoint(url=f"https://127.0.0.1:{op.webhook_port}"), ca)
        for (kind, name), manifest in zip(WEBHOOK_CONFIGS, want.values(), strict=True):
            obj = webhook_configuration(cp, kind, name)
            assert obj is not None and obj["kind"] == manifest["kind"], (kind, name)
            assert_helm_owned(obj, release.name, release.namespace)
            assert obj["metadata"]["labels"]["sluice.dev/managed-by"] == "operator"
            (hook,), (wanted,) = obj["webhooks"], manifest["webhooks"]
            # the API server's defaults for what the operator leaves out: empty selectors
            assert {k: v for k, v in hook.items() if k not in wanted} == {
                k: {} for k in ("namespaceSelector", "objectSelector") if k not in wanted}, hook
            assert {k: hook.get(k) for k in wanted} == wanted

    try:
        # before any operator: the chart's configurations, without a caBundle, are live: the
        # API server cannot call the validating webhook, so policies are refused (fail closed)
        assert_the_charts(cp, release.name, release.namespace, release.fullname)
        res = cp.kubectl("apply", "-n", bad_ns, "-f", "-", input=bad, check=False)
        assert res.returncode != 0 and "policies.sluice.dev" in res.stderr, res
        # an invalid policy (only the webhook could refuse it) that exists before the operator
        # starts: let it in past a namespaceSelector added by hand (the operator's merge patch
        # replaces the webhooks: the selector goes again)
        cp.kubectl("patch", *WEBHOOK_CONFIGS[0], "--type=json", "-p", json.dumps([{
            "op": "add", "path": "/webhooks/0/namespaceSelector", "value": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [bad_ns]}]}}]))
        poll(lambda: cp.kubectl("apply", "-n", bad_ns, "-f", "-", input=bad,
                                check=False).returncode == 0,
             "the invalid policy admitted past the narrowed webhook")

        ops.append(chart_operator(release, redis_server.url, tmp_path, "first"))
        # its keep-alive in the release's peering object (list/watch/patch under the chart RBAC)
        wait(lambda: len(peers(cp, release.fullname)) == 1,
             "the operator's entry in the ClusterKopfPeering")
        # webhook configurations created with the CA of the certificate Secret it created
        first_ca = wait(lambda: ca_bundle(*WEBHOOK_CONFIGS[0]), "sluice-policies registered")
        wait(lambda: ca_bundle(*WEBHOOK_CONFIGS[1]), "sluice-injector registered")
        first_secret = cert_secret()
        assert first_secret["ca.crt"] == first_ca, "caBundle is not the Secret's CA"
        assert_patched_by_the_operator(ops[-1], first_ca)

        # policy -> Redis (list/watch) -> status (status patch); no finalizer (#12, defect 4)
        cp.kubectl("apply", "-f", "-", input=policy_manifest("api", ns, tiers=("free", "pro")))
        wait(lambda: store_call(redis_server.url, configstore.read, ns), f"config of {ns} in Redis")
        wait(lambda: programmed(cp, "rlp", "api", ns), "status Programmed=True")
        assert "sluice.dev/config" not in ((rlp("api", ns) or {})["metadata"].get("finalizers") or [])

        # API-key Secret (list/watch secrets) -> its grant in Redis, never the key
        key = f"sk-chart-{uuid.uuid4().hex}"
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "client-1", "namespace": ns,
                         "labels": {"sluice.dev/policy": "api"}},
            "data": {"key": base64.b64encode(key.encode()).decode(),
                     "tier": base64.b64encode(b"pro").decode()}}))
        digest = keyschema.hash_api_key(key)

        def doc() -> str:
            raw = redis.hget(keyschema.config_key(ns), "doc")
            return raw.decode() if raw else ""
        stored = wait(lambda: store_call(redis_server.url, configstore.get_grant, f"{ns}/api",
                                         bytes.fromhex(digest)), "the key's grant in Redis")
        assert stored.key_id == f"{ns}/client-1" and stored.grant.tier == "pro"
        assert key not in doc() and digest not in doc()  # a grant, not embedded in the document
        # ... and the policy's status follows through the operator's own client (status patch
        # under the chart RBAC; a 403 would be logged and fail assert_no_permission_errors)
        wait(lambda: ((rlp("api", ns) or {}).get("status") or {}).get("keys") == 1, "status keys: 1")

        # the invalid policy: an InvalidPolicy Event (events create)
        wait(lambda: cp.kubectl_json("get", "events", "-n", bad_ns,
                                     "--field-selector", "reason=InvalidPolicy")["items"],
             "the InvalidPolicy Event")

        # the validating webhook, served by the operator, refuses a bad policy
        res = cp.kubectl("apply", "-n", ns, "-f", "-", input=bad, check=False)
        assert res.returncode != 0 and "is not a valid regular expression" in res.stderr, res

        # injection into a pod of a namespace labelled sluice.dev/inject=true (namespaces get)
        wait(lambda: cp.kubectl("get", "serviceaccount", "default", "-n", ns,
                                check=False).returncode == 0, "default ServiceAccount")
        pod = json.loads(cp.kubectl("create", "-o", "json", "-f", "-", input=yaml.safe_dump({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app", "namespace": ns},
            "spec": {"containers": [{"name": "app", "image": "app:1",
                                     "ports": [{"name": "http", "containerPort": 8000}]}]}
        })).stdout)
        names = [c["name"] for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", [])]
        assert "sluice-sidecar" in names, f"not injected: {names}\n{diagnose()}"  # a native sidecar on 1.34

        # a graceful stop hands over: the replica removes its entry from the peering object
        ops[-1].stop()
        poll(lambda: not peers(cp, release.fullname), "the stopped operator's entry removed")
        # restart after damage: a Secret whose certificate is unreadable is renewed (update by
        # name, with its resourceVersion) from the same CA, and the configurations' caBundle,
        # removed meanwhile, is patched back (patch by resourceName)
        garbage = base64.b64encode(b"not a certificate").decode()
        cp.kubectl("patch", "secret", f"{release.fullname}-webhook-tls", "-n", release.namespace,
                   "--type=json", "-p", json.dumps(
                       [{"op": "replace", "path": "/data/tls.crt", "value": garbage}]))
        cp.kubectl("patch", *WEBHOOK_CONFIGS[0], "--type=json",
                   "-p", '[{"op": "remove", "path": "/webhooks/0/clientConfig/caBundle"}]')
        assert ca_bundle(*WEBHOOK_CONFIGS[0]) is None
        ops.append(chart_operator(release, redis_server.url, tmp_path, "second"))
        wait(lambda: ca_bundle(*WEBHOOK_CONFIGS[0]) == first_ca,
             "sluice-policies patched with the Secret's CA again")
        assert_patched_by_the_operator(ops[-1], first_ca)
        renewed = cert_secret()
        assert renewed["ca.crt"] == first_secret["ca.crt"]
        assert renewed["tls.crt"] not in (garbage, first_secret["tls.crt"])
        wait(lambda: len(peers(cp, release.fullname)) == 1,
             "the new operator's entry in the ClusterKopfPeering")

        # deletion: gone at once; the operator takes it out of Redis
        cp.kubectl("delete", "rlp", "api", "-n", ns, "--wait=false")
        cp.kubectl("delete", "rlp", "bad-regex", "-n", bad_ns, "--wait=false")
        wait(lambda: rlp("api", ns) is None and rlp("bad-regex", bad_ns) is None,
             "the policies deleted (finalizers removed)")
        wait(lambda: (c := store_call(redis_server.url, configstore.read, ns)) is not None and not c.policies,
             "an empty config (the policy gone) in Redis")
        ops[-1].check_alive()
        for op in ops:
            assert_no_permission_errors(op)

        # the patched configurations are still the release's: webhook.enabled=false (an
        # upgrade) removes them
        ops[-1].stop()
        set_webhooks(release, False)
        assert_gone(cp, "helm upgrade --set webhook.enabled=false")
    finally:
        for op in ops:
            op.stop()
        delete_webhook_configurations(cp)  # failurePolicy Fail on a dead URL: never leave it
        for n in (ns, bad_ns):  # a failed test may leave finalizers nobody will remove
            with contextlib.suppress(Exception):
                for obj in cp.kubectl_json("get", "rlp", "-n", n)["items"]:
                    cp.kubectl("patch", "rlp", obj["metadata"]["name"], "-n", n, "--type=merge",
                               "-p", '{"metadata":{"finalizers":null}}', check=False)
            cp.kubectl("delete", "namespace", n, "--wait=false", "--ignore-not-found")


@pytest.mark.parametrize("deleted", [WEBHOOK_CONFIGS, WEBHOOK_CONFIGS[1:]], ids=["both", "injector"])
def test_the_charts_operator_leaves_creating_the_webhook_configurations_to_helm(
        release: Release, redis_server: Any, tmp_path: Path,
        deleted: tuple[tuple[str, str], ...]) -> None:
    """The chart runs the operator with ``--webhook-configurations=patch``: it patches its CA
    into the configurations Helm creates and never creates them. One that did raced ``helm
    install``, which creates the Deployment before the configurations and failed with "already
    exists" when the operator was quicker (a CI run of the e2e suite, and 1 install in 12 on the
    one-node cluster). With one of them there, that one gets the CA (and owns the certificate
    Secret) at once while the operator waits for the other."""
    cp = release.cp
    set_webhooks(release, True)  # the chart's RBAC for the certificate Secret comes with them
    for kind, name in deleted:  # as before `helm install` (or a partial upgrade) has created them
        cp.kubectl("delete", kind, name)
    op = chart_operator(release, redis_server.url, tmp_path, "patch-only", service=True)

    def ca_bundles() -> list[str | None]:
        objs = [webhook_configuration(cp, kind, n) for kind, n in WEBHOOK_CONFIGS]
        return [o["webhooks"][0]["clientConfig"].get("caBundle") if o else None for o in objs]

    try:
        # it has looked for them (and found some missing), or, as before, created them
        poll(lambda: op.check_alive() or "missing: waiting for the Helm release" in op.log()
             or all(ca_bundles()), "the operator's webhook registration", diagnose=op.report)
        assert [b is None for b in ca_bundles()] == [c in deleted for c in WEBHOOK_CONFIGS], (
            "an operator started with --webhook-configurations=patch created what Helm creates")
        if len(deleted) == 1:  # the validating one is there: patched, and owns the Secret
            secret = cp.kubectl_json("get", "secret", f"{release.fullname}-webhook-tls",
                                     "-n", release.namespace)
            owners = secret["metadata"].get("ownerReferences") or []
            assert [o["name"] for o in owners] == [WEBHOOK_CONFIGS[0][1]], owners
        set_webhooks(release, True)  # Helm creates the missing ones (no "already exists")
        poll(lambda: op.check_alive() or all(ca_bundles()),
             "the operator's CA patched into the configurations Helm created", diagnose=op.report)
        for kind, n in WEBHOOK_CONFIGS:
            assert_helm_owned(webhook_configuration(cp, kind, n), release.name, release.namespace)
    finally:
        op.stop()
        set_webhooks(release, False, check=False)  # as the test before this one leaves it
        delete_webhook_configurations(cp, check=False)


# ---------------------------------------------------------------------------------------------
# the release owns the webhook configurations


def test_helm_owns_the_webhook_configurations(release: Release) -> None:
    """A release of its own (the module's disables its webhooks meanwhile: the names are
    cluster-wide): the operator's create-or-patch (webhook_config.apply, the admin's client)
    leaves Helm's ownership alone, ``helm upgrade`` keeps the caBundle, and ``helm uninstall``
    removes both configurations. Configurations an operator created without the chart (an
    install from before the chart owned them) are refused by ``helm install`` until adopted as
    charts/sluice/README.md says."""
    from kubernetes import config as k8s_config
    from sluice_operator import webhook_config

    cp = release.cp
    suffix = uuid.uuid4().hex[:6]
    name, ns = f"own-{suffix}", f"sluice-own-{suffix}"
    full = f"{name}-sluice"
    endpoint = Endpoint(service_namespace=ns, service_name=f"{full}-webhook", service_port=443)
    api = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(cp.kubeconfig))
    install = ("install", name, str(CHART), "--namespace", ns, "--wait=false")

    def operator_apply(ca: bytes) -> None:
        webhook_config.apply(api, list(operator_webhook_configurations(endpoint, ca).values()))

    def ca_bundles() -> list[str | None]:
        objs = [webhook_configuration(cp, kind, n) for kind, n in WEBHOOK_CONFIGS]
        return [o["webhooks"][0]["clientConfig"].get("caBundle") if o else None for o in objs]

    cp.kubectl("create", "namespace", ns)
    try:
        set_webhooks(release, False)
        assert_gone(cp, "the module's release with webhook.enabled=false")
        helm_on(cp, *install)
        assert_the_charts(cp, name, ns, full)

        # the operator's start-up: create -> 409 -> merge patch with the CA
        operator_apply(b"first CA")
        ca = base64.b64encode(b"first CA").decode()
        assert ca_bundles() == [ca, ca]
        for kind, n in WEBHOOK_CONFIGS:
            obj = webhook_configuration(cp, kind, n)
            assert_helm_owned(obj, name, ns)
            assert obj is not None
            assert obj["metadata"]["labels"]["sluice.dev/managed-by"] == "operator"
            assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == name  # Helm's kept

        # an upgrade neither fights the operator's patch nor drops the caBundle Helm never set
        helm_on(cp, "upgrade", name, str(CHART), "--namespace", ns, "--reuse-values",
                "--wait=false", "--set", "operator.logLevel=debug")
        assert ca_bundles() == [ca, ca]
        assert_helm_owned(webhook_configuration(cp, *WEBHOOK_CONFIGS[0]), name, ns)

        helm_on(cp, "uninstall", name, "--namespace", ns)
        assert_gone(cp, "helm uninstall")

        # configurations an operator created without the chart (as earlier versions did, with
        # their managed-by label): helm install refuses to take them over
        operator_apply(b"old CA")
        for kind, n in WEBHOOK_CONFIGS:
            cp.kubectl("label", kind, n, "app.kubernetes.io/managed-by=sluice-operator")
        res = helm_on(cp, *install, check=False)
        assert res.returncode != 0 and "invalid ownership metadata" in res.stderr, res.stderr
        # ... until adopted (charts/sluice/README.md): then they are the release's
        for kind, n in WEBHOOK_CONFIGS:
            cp.kubectl("label", kind, n, "app.kubernetes.io/managed-by=Helm", "--overwrite")
            cp.kubectl("annotate", kind, n, f"meta.helm.sh/release-name={name}",
                       f"meta.helm.sh/release-namespace={ns}", "--overwrite")
        helm_on(cp, "uninstall", name, "--namespace", ns, check=False)  # the failed attempt
        helm_on(cp, *install)
        for kind, n in WEBHOOK_CONFIGS:
            assert_helm_owned(webhook_configuration(cp, kind, n), name, ns)
        helm_on(cp, "uninstall", name, "--namespace", ns)
        assert_gone(cp, "helm uninstall of the adopting release")
    finally:
        helm_on(cp, "uninstall", name, "--namespace", ns, check=False)
        delete_webhook_configurations(cp, check=False)
        cp.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")
        set_webhooks(release, True, check=False)  # the module's release as installed
        api.close()
