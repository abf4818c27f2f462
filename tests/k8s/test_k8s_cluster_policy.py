"""ClusterRateLimitPolicy through the real API server: the operator resolves namespaceSelector
from real Namespaces (and follows their labels), takes cluster keys only from its cluster-keys
namespace, writes the ``_cluster`` document, and reports status a real sidecar process confirms.

The operator serves the namespaced policies of ``sluice-cp-*`` only, and cluster policies (on
explicitly: a namespace-restricted operator leaves them alone by default). Its
namespaceSelector names a label value unique to this run, so the other namespaces of the
session never match.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sluice_core import configstore, keyschema
from sluice_core.model import CLUSTER_SCOPE
from sluice_operator.handlers import FINALIZER
from support.control_plane import ControlPlane, table
from support.crds import apply_crds
from support.operator_thread import Operator, running_operator
from support.polling import poll
from support.processes import SidecarProcess, UpstreamProcess, http_get
from support.sluice_objects import condition, policy_manifest, programmed
from support.store_calls import store_call

pytestmark = pytest.mark.k8s

NS_PREFIX = "sluice-cp"
# a letter first: a bare hex run such as "784e59" is a number to kubectl's YAML (not to
# PyYAML, which leaves it unquoted), and label values must be strings
RUN = "r" + uuid.uuid4().hex[:6]
LABEL = "sluice.test/partner"


def crlp_yaml(name: str, *, requests: int = 4, regex: str | None = None) -> str:
    spec: dict[str, Any] = {
        "namespaceSelector": {"matchLabels": {LABEL: RUN}},
        "selector": {"matchLabels": {"app": "web"}},
        "identify": {"order": ["apiKey"]},
        "apiKeys": {"header": "X-Partner-Key", "required": True},
        "tiers": [{"name": "partner", "requests": requests, "period": "1h"}],
    }
    if regex is not None:
        spec["rules"] = [{"name": "export", "match": {"path": {"regex": regex}}, "cost": 1}]
    return yaml.safe_dump({"apiVersion": "sluice.dev/v1alpha1", "kind": "ClusterRateLimitPolicy",
                           "metadata": {"name": name}, "spec": spec})


def key_secret_yaml(name: str, ns: str, policy: str, key: str) -> str:
    data = {"key": key, "tier": "partner"}
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Secret",
                           "metadata": {"name": name, "namespace": ns,
                                        "labels": {"sluice.dev/cluster-policy": policy}},
                           "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})


@pytest.fixture(scope="module")
def k8s(control_plane: ControlPlane) -> ControlPlane:
    return apply_crds(control_plane)


@pytest.fixture(scope="module")
def namespaces(k8s: ControlPlane) -> Iterator[dict[str, str]]:
    """a and b carry the label the policy selects, c does not (yet); keys is the operator's
    cluster-keys namespace."""
    names = {role: f"{NS_PREFIX}-{role}-{RUN}" for role in ("a", "b", "c", "keys")}
    for role, ns in names.items():
        k8s.kubectl("create", "namespace", ns)
        if role in ("a", "b"):
            k8s.kubectl("label", "namespace", ns, f"{LABEL}={RUN}")
    yield names
    for ns in names.values():
        k8s.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


@pytest.fixture(scope="module")
def operator(k8s: ControlPlane, redis_server: Any, namespaces: dict[str, str]) -> Iterator[Operator]:
    with running_operator(k8s, redis_server, f"{NS_PREFIX}-*", cluster_policies=True,
                          cluster_keys_namespace=namespaces["keys"]) as op:
        yield op
        # while the operator runs, so that the finalizers are removed
        k8s.kubectl("delete", "crlp", "-l", f"{LABEL}-run={RUN}", "--timeout=30s", check=False)


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamProcess]:
    up = UpstreamProcess()
    yield up
    up.close()


def apply(cp: ControlPlane, text: str) -> None:
    doc = yaml.safe_load(text)
    if doc["kind"] == "ClusterRateLimitPolicy":  # so the fixture can find what to clean up
        doc["metadata"]["labels"] = {f"{LABEL}-run": RUN}
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))


def crlp_status(op: Operator, name: str) -> dict[str, Any]:
    return dict((op.get("crlp", name) or {}).get("status") or {})


def test_cluster_policy_lifecycle(operator: Operator, namespaces: dict[str, str],
                                  upstream: UpstreamProcess, tmp_path: Path) -> None:
    cp, a, b, c = operator.cp, namespaces["a"], namespaces["b"], namespaces["c"]
    name = f"partners-{RUN}"
    key = "partner-" + uuid.uuid4().hex
    apply(cp, crlp_yaml(name))

    # Resolved to the labelled namespaces; Programmed; the printer columns say so.
    cfg = poll(lambda: (cfg := operator.config(CLUSTER_SCOPE)) and name in cfg.scopes and cfg,
               "the _cluster document")
    assert cfg.scopes[name] == frozenset({a, b})
    obj = poll(lambda: programmed(cp, "crlp", name), "Programmed=True")
    assert obj["status"]["namespaces"] == 2 and obj["status"]["configVersion"] == cfg.version
    assert FINALIZER not in (obj["metadata"].get("finalizers") or [])  # nothing held past the operator
    row = {r["NAME"]: r for r in table(cp.kubectl("get", "crlp").stdout)}[name]
    assert (row["NAMESPACES"], row["PROGRAMMED"], row["TIERS"]) == ("2", "True", "1"), row

    # Keys: only Secrets in the cluster-keys namespace grant; the same Secret elsewhere does not.
    apply(cp, key_secret_yaml("partner-key", namespaces["keys"], name, key))
    sneaky = "sneaky-" + uuid.uuid4().hex
    apply(cp, key_secret_yaml("sneaky-key", a, name, sneaky))
    ref = f"{CLUSTER_SCOPE}/{name}"

    def granted(api_key: str) -> Any:
        return store_call(operator.settings.redis, configstore.get_grant, ref,
                          bytes.fromhex(keyschema.hash_api_key(api_key)))

    stored = poll(lambda: granted(key), "the key grant in Redis")
    assert stored.key_id == f"{namespaces['keys']}/partner-key"
    assert granted(sneaky) is None
    assert name not in operator.config(CLUSTER_SCOPE).grants  # no sidecar lacks grants: none embedded

    # A real sidecar in a: enforces the shared budget with the key, and the status counts it.
    labels = tmp_path / "labels"
    labels.write_text('app="web"\n')
    sidecar = SidecarProcess(upstream.url, "--redis", operator.settings.redis, "--namespace", a,
                             "--pod-labels", str(labels), "--pod-name", "web-0")
    try:
        def call(with_key: bool) -> int:
            req = urllib.request.Request(sidecar.url + "/api",
                                         headers={"X-Partner-Key": key} if with_key else {})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return int(r.status)
            except urllib.error.HTTPError as e:
                return int(e.code)

        assert [call(True) for _ in range(5)] == [200, 200, 200, 200, 429]
        assert call(False) == 401
        status = poll(lambda: (s := crlp_status(operator, name)).get("enforcedSidecars") == 1 and s,
                      "Enforced: 1")
        enforced = next(c for c in status["conditions"] if c["type"] == "Enforced")
        assert enforced["status"] == "True", enforced
        admin = json.loads(http_get(sidecar.admin + "/admin/config")[1])
        assert admin["config"]["clusterPolicyRef"] == name
    finally:
        sidecar.close()

    # c gets the label: it joins the scope within seconds (no policy change needed).
    cp.kubectl("label", "namespace", c, f"{LABEL}={RUN}")
    poll(lambda: (cfg := operator.config(CLUSTER_SCOPE)) and cfg.scopes.get(name) == frozenset({a, b, c}),
         "c in the scope")
    poll(lambda: crlp_status(operator, name).get("namespaces") == 3, "status.namespaces 3")
    # Reconciled again since both Secrets exist: still only the keys namespace's key.
    assert granted(key) is not None and granted(sneaky) is None

    # An update only the parser refuses (a Python regex): the last good version keeps serving.
    good = operator.config(CLUSTER_SCOPE)
    apply(cp, crlp_yaml(name, regex="/export/(["))
    refused = poll(lambda: (cond := condition(operator.get("crlp", name) or {}, "Accepted"))
                   and cond["status"] == "False" and cond, "Accepted=False")
    assert "spec.rules[0].match.path.regex" in refused["message"], refused
    assert operator.config(CLUSTER_SCOPE).version == good.version

    # Delete: gone at once; the operator takes it out of Redis from the watch event.
    cp.kubectl("delete", "crlp", name, "--timeout=30s")
    assert operator.get("crlp", name) is None
    poll(lambda: (cfg := operator.config(CLUSTER_SCOPE)) is None or name not in {p.name for p in cfg.policies},
         "the policy gone from the _cluster document")


def test_a_deleted_namespace_leaves_no_config_behind(operator: Operator) -> None:
    """Kubernetes deletes the namespace's policy (the operator writes the empty document and
    lets the finalizer go), then the namespace; the operator, which watches namespaces for its
    cluster policies, then removes that empty document."""
    cp, ns = operator.cp, f"{NS_PREFIX}-gone-{RUN}"
    cp.kubectl("create", "namespace", ns)
    try:
        cp.kubectl("apply", "-f", "-", input=policy_manifest("api", ns))
        poll(lambda: programmed(cp, "rlp", "api", ns), f"rlp {ns}/api Programmed")
        assert operator.redis.exists(keyschema.config_key(ns))
        cp.kubectl("delete", "namespace", ns, "--wait=false")
        poll(lambda: not operator.redis.exists(keyschema.config_key(ns)),
             "the namespace's config gone from Redis", timeout=90)
        assert cp.kubectl("get", "namespace", ns, check=False).returncode != 0
    finally:
        cp.kubectl("delete", "namespace", ns, "--ignore-not-found", "--wait=false")
