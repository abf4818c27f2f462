"""What the injector does to a pod beyond adding the sidecar, against the real API server (the
operator's webhooks registered with it, pods created with ``kubectl`` and by the real
controller-manager):

- a private Redis CA (``--sidecar-redis-ca-file``): a namespace created after the operator
  started gets ConfigMap ``sluice-redis-ca`` with its first injected pod (not with a dry run),
  and the pod mounts it into the sidecar, whose ``SLUICE_REDIS_CA_FILE`` names the file
  (tests/operator/test_redis_ca.py runs a sidecar against a private-CA TLS Redis with it);
- the grace period: a pod that sets none gets Kubernetes' 30 s plus the sidecar's drain; one
  whose own period is too short keeps it, with an admission warning (``kubectl`` prints it)
  and, for a Deployment's pods, one Event on their ReplicaSet.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from sluice_operator.injection.grace import DEFAULT_GRACE_S, sidecar_stop_s
from sluice_operator.injection.names import REDIS_CA_CONFIGMAP, SIDECAR_NAME
from sluice_operator.injection.settings import InjectionSettings
from sluice_operator.webhook_config import MUTATING_NAME, Endpoint
from support.control_plane import ControlPlane
from support.crds import apply_crds
from support.operator_thread import Operator, running_operator
from support.polling import poll
from support.redis_servers import pick_port
from support.sluice_objects import delete_webhook_configurations

pytestmark = pytest.mark.k8s
INJECTION = InjectionSettings()  # the grace period's arithmetic: the sidecar's defaults


def pod(name: str, ns: str, grace: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app", "image": "registry.invalid/demo:1",
                                             "ports": [{"name": "http", "containerPort": 8080}]}]}
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    return {"apiVersion": "v1", "kind": "Pod", "spec": spec,
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name, "sluice.dev/inject": "true"}}}


def injected(p: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in p["spec"].get("initContainers", []) if c["name"] == SIDECAR_NAME), None)


@pytest.fixture(scope="module")
def operator(control_plane: ControlPlane, redis_server: Any,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """The operator serving its webhooks on loopback, with the control plane's CA certificate
    as the Redis CA bundle it hands the sidecars (any PEM bundle does)."""
    k8s = apply_crds(control_plane)
    port = pick_port()
    injection = InjectionSettings(redis_ca_file=str(k8s.ca_cert))
    try:
        with running_operator(
                k8s, redis_server, "sluice-inj-*", webhook_listen=f"127.0.0.1:{port}",
                webhook_endpoint=Endpoint(url=f"https://127.0.0.1:{port}"),
                webhook_dns_names=("localhost",), webhook_ips=("127.0.0.1",),
                webhook_cert_dir=str(tmp_path_factory.mktemp("webhook-certs")),
                webhook_provided_cert_dir=None, injection=injection) as op:
            poll(lambda: k8s.kubectl("get", "mutatingwebhookconfiguration", MUTATING_NAME,
                                     check=False).returncode == 0, "mutating configuration")
            probe = pod("sluice-webhook-probe", "default")
            poll(lambda: injected(json.loads(k8s.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-",
                                                         input=json.dumps(probe)).stdout)),
                 "the API server calling the mutating webhook")
            try:
                yield op
            finally:
                delete_webhook_configurations(k8s)
    finally:
        delete_webhook_configurations(k8s, check=False)


@pytest.fixture
def namespace(operator: Operator) -> Iterator[str]:
    """A namespace created now, after the operator started."""
    ns = f"app-{uuid.uuid4().hex[:6]}"
    operator.cp.kubectl("create", "namespace", ns)
    try:
        yield ns
    finally:
        operator.cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def configmap(cp: ControlPlane, ns: str) -> dict[str, Any] | None:
    res = cp.kubectl("-n", ns, "get", "configmap", REDIS_CA_CONFIGMAP, "-o", "json", check=False)
    return json.loads(res.stdout) if res.returncode == 0 else None


def test_a_new_namespace_gets_the_redis_ca_with_its_first_injected_pod(operator: Operator, namespace: str) -> None:
    cp, ns = operator.cp, namespace
    dry = json.loads(cp.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-",
                                input=json.dumps(pod("dry", ns))).stdout)
    assert injected(dry) is not None
    assert configmap(cp, ns) is None  # a dry run writes nothing

    cp.kubectl("create", "-f", "-", input=json.dumps(pod("web", ns)))
    made = poll(lambda: configmap(cp, ns), "the ConfigMap (written when the pod was admitted)")
    assert made["data"] == {"ca.crt": operator.cp.ca_cert.read_text()}
    stored = cp.kubectl_json("-n", ns, "get", "pod", "web")
    volumes = {v["name"]: v for v in stored["spec"]["volumes"]}
    sidecar = injected(stored)
    assert sidecar is not None
    (mount,) = [m for m in sidecar["volumeMounts"] if m["name"] in volumes and "configMap" in volumes[m["name"]]]
    assert volumes[mount["name"]]["configMap"]["name"] == REDIS_CA_CONFIGMAP and mount["readOnly"] is True
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["SLUICE_REDIS_CA_FILE"] == f"{mount['mountPath']}/ca.crt"
    app = stored["spec"]["containers"][0]
    assert all(v.get("configMap") is None for v in volumes.values()
               if v["name"] in {m["name"] for m in app.get("volumeMounts", [])})  # the app gets nothing


def test_a_pod_without_a_grace_period_gets_room_for_the_drain(operator: Operator, namespace: str) -> None:
    cp, ns = operator.cp, namespace
    res = cp.kubectl("create", "-f", "-", input=json.dumps(pod("web", ns)))
    assert "terminationGracePeriodSeconds" not in res.stderr
    stored = cp.kubectl_json("-n", ns, "get", "pod", "web")
    assert stored["spec"]["terminationGracePeriodSeconds"] == DEFAULT_GRACE_S + sidecar_stop_s(INJECTION) == 65


def test_a_too_short_grace_period_is_kept_with_a_warning_and_an_event(operator: Operator, namespace: str) -> None:
    cp, ns = operator.cp, namespace
    res = cp.kubectl("create", "-f", "-", input=json.dumps(pod("quick", ns, grace=10)))
    assert "Warning: sluice: terminationGracePeriodSeconds 10 is too short" in res.stderr, res.stderr
    assert cp.kubectl_json("-n", ns, "get", "pod", "quick")["spec"]["terminationGracePeriodSeconds"] == 10
    roomy = cp.kubectl("create", "-f", "-", input=json.dumps(pod("roomy", ns, grace=60)))
    assert "terminationGracePeriodSeconds" not in roomy.stderr

    # A Deployment's pods: the ReplicaSet controller creates them and drops the warning; its
    # ReplicaSet gets one Event for both pods.
    template = pod("api", ns, grace=10)
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "api", "namespace": ns},
              "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "api"}},
                       "template": {"metadata": {"labels": template["metadata"]["labels"]},
                                    "spec": template["spec"]}}}
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(deploy))
    poll(lambda: len(cp.kubectl_json("-n", ns, "get", "pods", "-l", "app=api")["items"]) == 2, "2 pods of api")

    def events(kind: str = "ReplicaSet") -> list[dict[str, Any]]:
        return [e for e in cp.kubectl_json("-n", ns, "get", "events")["items"]
                if e["reason"] == "GracePeriodTooShort" and e["involvedObject"]["kind"] == kind]

    assert [e["involvedObject"]["name"] for e in events("Pod")] == ["quick"]  # a pod of no owner: on itself

    (event,) = poll(events, "the Event on the ReplicaSet")
    assert event["involvedObject"]["kind"] == "ReplicaSet" and event["involvedObject"]["name"].startswith("api-")
    assert event["type"] == "Warning" and "is too short" in event["message"]
    assert len(events()) == 1  # both pods admitted already: one Event, not one per pod
