"""Admission webhooks as pure functions: policy validation and sidecar injection on real manifests.

The JSONPatch of the mutating webhook is applied with a small RFC 6902 applier below and the
resulting pod is checked field by field, as the API server would store it.
"""

from __future__ import annotations

import base64
import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from sluice_operator.admission_review import ReviewError
from sluice_operator.injection.names import INJECTED_ANNOTATION, SIDECAR_NAME
from sluice_operator.injection.ports import app_port_name
from sluice_operator.injection.settings import InjectionSettings
from sluice_operator.pod_admission import mutate_pod
from sluice_operator.policy_admission import review_policy
from support.jsonpatch import apply_patch
from support.paths import ROOT

EXAMPLES = ROOT / "crds" / "examples"

# ------------------------------------------------------------------------------------------
# The suite's RFC 6902 applier (tests/support/jsonpatch.py) applies the webhook's patches.


def test_patch_applier_follows_rfc6902() -> None:
    doc = {"a": {"b~/c": [1, 2]}, "l": [1]}
    out = apply_patch(doc, [
        {"op": "add", "path": "/a/b~0~1c/-", "value": 3},
        {"op": "add", "path": "/l/0", "value": 0},
        {"op": "replace", "path": "/a/b~0~1c/0", "value": 9},
        {"op": "remove", "path": "/l/1"},
        {"op": "test", "path": "/l/0", "value": 0},
    ])
    assert out == {"a": {"b~/c": [9, 2, 3]}, "l": [0]}
    assert doc == {"a": {"b~/c": [1, 2]}, "l": [1]}
    with pytest.raises(AssertionError):
        apply_patch(doc, [{"op": "replace", "path": "/missing", "value": 1}])


# ------------------------------------------------------------------------------------------
# Manifests

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: shop-api, namespace: shop}
spec:
  replicas: 3
  selector: {matchLabels: {app: shop-api}}
  template:
    metadata:
      labels: {app: shop-api, sluice.dev/inject: "true"}
      annotations: {prometheus.io/scrape: "true"}
    spec:
      containers:
        - name: api
          image: ghcr.io/example/shop-api:1.4.2
          args: [serve, --port, "8000"]
          ports:
            - {name: http, containerPort: 8000, protocol: TCP}
            - {name: metrics, containerPort: 9102}
          readinessProbe:
            httpGet: {path: /ready, port: http}
            periodSeconds: 5
          livenessProbe:
            httpGet: {path: /live, port: http}
          startupProbe:
            tcpSocket: {port: http}
          volumeMounts: [{name: tmp, mountPath: /tmp}]
        - name: log-shipper
          image: fluent/fluent-bit:3.0
          livenessProbe:
            httpGet: {path: /api/v1/health, port: 2020}
      volumes:
        - {name: tmp, emptyDir: {}}
"""


def pod_from(deployment_yaml: str, **changes: Any) -> dict[str, Any]:
    """The Pod the API server sends for CREATE when a ReplicaSet creates one from the template."""
    dep = yaml.safe_load(deployment_yaml)
    template = dep["spec"]["template"]
    meta = copy.deepcopy(template.get("metadata") or {})
    meta["generateName"] = f"{dep['metadata']['name']}-7d9c8f6b5-"
    meta["namespace"] = dep["metadata"].get("namespace", "default")
    meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                "name": f"{dep['metadata']['name']}-7d9c8f6b5",
                                "uid": str(uuid.uuid4()), "controller": True}]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
           "spec": copy.deepcopy(template["spec"])}
    for key, value in changes.items():
        pod[key] = value
    return pod


def pod_review(pod: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
    ns = namespace or pod["metadata"].get("namespace", "default")
    return {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": ns, "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod, "oldObject": None, "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


SETTINGS = InjectionSettings(image="registry.example/sluice:0.1.0",
                             redis_url="redis://redis.sluice-system:6379")


def mutate(pod: dict[str, Any], settings: InjectionSettings = SETTINGS,
           ns_labels: dict[str, dict[str, str]] | None = None
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the webhook; return (response, pod after applying its patch)."""
    review = pod_review(pod)
    lookup = (lambda ns: (ns_labels or {}).get(ns)) if ns_labels is not None else None
    answer = mutate_pod(review, settings, lookup)
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == review["request"]["uid"]
    assert response["allowed"] is True  # the mutating webhook never blocks a pod
    if "patch" not in response:
        return response, pod
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    return response, apply_patch(pod, patch)


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [c for c in pod["spec"]["containers"] if c["name"] == name]
    assert len(matches) == 1, [c["name"] for c in pod["spec"]["containers"]]
    return matches[0]


def arg(c: dict[str, Any], flag: str) -> str:
    args = c["args"]
    return str(args[args.index(flag) + 1])


# ------------------------------------------------------------------------------------------
# Injection


def test_injects_sidecar_in_front_of_named_port_and_repoints_probes() -> None:
    pod = pod_from(DEPLOYMENT)
    response, out = mutate(pod)
    assert "warnings" not in response

    assert [c["name"] for c in out["spec"]["containers"]] == ["api", "log-shipper", SIDECAR_NAME]
    assert out["metadata"]["annotations"] == {"prometheus.io/scrape": "true",
                                              INJECTED_ANNOTATION: "true"}
    assert out["metadata"]["labels"] == pod["metadata"]["labels"]

    app = container(out, "api")
    assert app["ports"] == [{"name": "http-app", "containerPort": 8000, "protocol": "TCP"},
                            {"name": "metrics", "containerPort": 9102}]
    # kubelet's checks go straight to the app's own port, never through the sidecar
    assert app["readinessProbe"] == {"httpGet": {"path": "/ready", "port": 8000}, "periodSeconds": 5}
    assert app["livenessProbe"]["httpGet"] == {"path": "/live", "port": 8000}
    assert app["startupProbe"]["tcpSocket"] == {"port": 8000}
    assert {k: v for k, v in app.items() if "Probe" not in k and k not in ("ports", "lifecycle")} == \
        {k: v for k, v in pod["spec"]["containers"][0].items() if "Probe" not in k and k != "ports"}
    assert container(out, "log-shipper") == pod["spec"]["containers"][1]
    # the app stops only once the sidecar has drained (GET /drain with this pod's token)
    hook = app["lifecycle"]["preStop"]["httpGet"]
    assert (hook["path"], hook["port"]) == ("/drain", 15090)

    side = container(out, SIDECAR_NAME)
    assert side["image"] == "registry.example/sluice:0.1.0"
    assert side["imagePullPolicy"] == "IfNotPresent"
    assert side["args"][0] == "sidecar"
    assert arg(side, "--upstream") == "http://127.0.0.1:8000"
    assert arg(side, "--listen") == "0.0.0.0:15080"
    assert arg(side, "--admin-listen") == "0.0.0.0:15090"
    assert arg(side, "--redis") == "redis://redis.sluice-system:6379"
    assert arg(side, "--namespace") == "$(POD_NAMESPACE)"
    assert arg(side, "--pod-name") == "$(POD_NAME)"
    assert arg(side, "--pod-labels") == "/etc/sluice/podinfo/labels"
    # a Service's targetPort: http now lands on the sidecar
    assert side["ports"] == [{"name": "http", "containerPort": 15080, "protocol": "TCP"},
                             {"name": "sluice-admin", "containerPort": 15090, "protocol": "TCP"}]
    env = {e["name"]: e for e in side["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["SLUICE_REDIS_TIMEOUT_MS"]["value"] == "50"
    assert hook["httpHeaders"] == [{"name": "X-Sluice-Drain-Token", "value": env["SLUICE_DRAIN_TOKEN"]["value"]}]
    assert len(env["SLUICE_DRAIN_TOKEN"]["value"]) >= 24
    assert env["SLUICE_WITHOUT_CONFIG"]["value"] == "refuse"  # no policy lookup given here
    assert side["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "sluice-admin"}
    assert side["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "sluice-admin"}
    assert side["volumeMounts"] == [{"name": "sluice-podinfo", "mountPath": "/etc/sluice/podinfo",
                                     "readOnly": True}]
    sc = side["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert side["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"},
                                 "limits": {"memory": "128Mi"}}
    assert out["spec"]["volumes"] == [
        {"name": "tmp", "emptyDir": {}},
        {"name": "sluice-podinfo", "downwardAPI": {"items": [
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
    ]
    # port names in the pod stay valid IANA service names
    for c in out["spec"]["containers"]:
        for p in c.get("ports", []):
            assert len(p["name"]) <= 15


def test_injecting_twice_changes_nothing() -> None:
    _, once = mutate(pod_from(DEPLOYMENT))
    response, twice = mutate(once)
    assert "patch" not in response and "warnings" not in response and twice == once
    # a pod carrying the sidecar but not the annotation (injected by hand) is also left alone
    by_hand = copy.deepcopy(once)
    del by_hand["metadata"]["annotations"][INJECTED_ANNOTATION]
    response, out = mutate(by_hand)
    assert "patch" not in response and "warnings" not in response and out == by_hand


def test_only_numbered_port_is_admitted_unchanged_with_warning() -> None:
    dep = DEPLOYMENT.replace("- {name: http, containerPort: 8000, protocol: TCP}",
                             "- {containerPort: 8000}").replace("port: http", "port: 8000")
    dep = dep.replace("- {name: metrics, containerPort: 9102}", "")
    pod = pod_from(dep)
    response, out = mutate(pod)
    assert out == pod and "patch" not in response
    (warning,) = response["warnings"]
    assert "sidecar not injected" in warning and "no container port named 'http'" in warning
    assert "give the app's port a name" in warning


def test_other_named_ports_are_listed_in_the_warning() -> None:
    pod = pod_from(DEPLOYMENT.replace("name: http,", "name: web,").replace("port: http", "port: web"))
    response, out = mutate(pod)
    assert out == pod
    assert "named ports are metrics, web" in response["warnings"][0]
    assert "sluice.dev/port" in response["warnings"][0]


def test_opt_out_label_wins_over_namespace_label() -> None:
    pod = pod_from(DEPLOYMENT.replace('sluice.dev/inject: "true"', 'sluice.dev/inject: "false"'))
    response, out = mutate(pod, ns_labels={"shop": {"sluice.dev/inject": "true"}})
    assert out == pod and "patch" not in response and "warnings" not in response


def test_namespace_label_injects_unlabelled_pod() -> None:
    pod = pod_from(DEPLOYMENT.replace(', sluice.dev/inject: "true"', ""))
    assert "sluice.dev/inject" not in pod["metadata"]["labels"]
    response, out = mutate(pod, ns_labels={"shop": {"sluice.dev/inject": "true"}})
    assert SIDECAR_NAME in [c["name"] for c in out["spec"]["containers"]]
    # not labelled anywhere: untouched, silently
    response, out = mutate(pod, ns_labels={"shop": {"team": "payments"}})
    assert out == pod and "warnings" not in response
    response, out = mutate(pod)  # no lookup at all
    assert out == pod


def test_namespace_lookup_failure_is_a_warning_not_a_refusal() -> None:
    pod = pod_from(DEPLOYMENT.replace(', sluice.dev/inject: "true"', ""))

    def broken(ns: str) -> dict[str, str]:
        raise RuntimeError("apiserver timeout")

    answer = mutate_pod(pod_review(pod), SETTINGS, broken)["response"]
    assert answer["allowed"] is True and "patch" not in answer
    assert "apiserver timeout" in answer["warnings"][0]


def test_port_chosen_by_annotation() -> None:
    dep = DEPLOYMENT.replace("{prometheus.io/scrape: \"true\"}",
                             "{prometheus.io/scrape: \"true\", sluice.dev/port: api}")
    dep = dep.replace("- {name: metrics, containerPort: 9102}",
                      "- {name: metrics, containerPort: 9102}\n            - {name: api, containerPort: 8081}")
    pod = pod_from(dep)
    _, out = mutate(pod)
    app = container(out, "api")
    assert {p["name"]: p["containerPort"] for p in app["ports"]} == \
        {"http": 8000, "metrics": 9102, "api-app": 8081}
    assert app["readinessProbe"]["httpGet"]["port"] == "http"  # probes on other ports untouched
    side = container(out, SIDECAR_NAME)
    assert arg(side, "--upstream") == "http://127.0.0.1:8081"
    assert side["ports"][0] == {"name": "api", "containerPort": 15080, "protocol": "TCP"}


def test_fifteen_character_port_names() -> None:
    long_name = "public-http-api"  # 15 characters, the maximum
    assert len(long_name) == 15
    pod = pod_from(DEPLOYMENT.replace("name: http,", f"name: {long_name},")
                   .replace("port: http", f"port: {long_name}")
                   .replace("{prometheus.io/scrape: \"true\"}", f"{{sluice.dev/port: {long_name}}}"))
    _, out = mutate(pod)
    app = container(out, "api")
    renamed = app["ports"][0]["name"]
    assert renamed == "public-http-app" and len(renamed) <= 15  # no trailing or doubled '-'
    assert container(out, SIDECAR_NAME)["ports"][0]["name"] == long_name
    assert app["livenessProbe"]["httpGet"]["port"] == 8000
    # name helper: unique, valid, never longer than 15
    assert app_port_name("http", set()) == "http-app"
    assert app_port_name("http", {"http-app"}) == "http-app2"
    assert app_port_name("abcdefghij-lmno", set()) == "abcdefghij-app"
    assert app_port_name("abcdefghijk-mno", {"abcdefghijk-app"}) == "abcdefghij-app2"


def test_default_sidecar_port_collision_picks_next_free_port() -> None:
    dep = DEPLOYMENT.replace("- {name: metrics, containerPort: 9102}",
                             "- {name: metrics, containerPort: 15080}\n"
                             "            - {name: debug, containerPort: 15090}")
    _, out = mutate(pod_from(dep))
    side = container(out, SIDECAR_NAME)
    numbers = [p["containerPort"] for c in out["spec"]["containers"] for p in c.get("ports", [])]
    assert len(numbers) == len(set(numbers))  # no two containers listen on one port
    assert arg(side, "--listen") == "0.0.0.0:15081"
    assert arg(side, "--admin-listen") == "0.0.0.0:15091"
    assert side["ports"][0]["containerPort"] == 15081


def test_sidecar_port_annotation_and_its_collision() -> None:
    dep = DEPLOYMENT.replace("{prometheus.io/scrape: \"true\"}", "{sluice.dev/sidecar-port: \"8080\"}")
    _, out = mutate(pod_from(dep))
    assert arg(container(out, SIDECAR_NAME), "--listen") == "0.0.0.0:8080"
    dep = DEPLOYMENT.replace("{prometheus.io/scrape: \"true\"}", "{sluice.dev/sidecar-port: \"9102\"}")
    pod = pod_from(dep)
    response, out = mutate(pod)
    assert out == pod and "9102 is already a container port" in response["warnings"][0]


def test_pod_without_annotations_or_volumes() -> None:
    pod = pod_from(DEPLOYMENT)
    del pod["metadata"]["annotations"]
    del pod["spec"]["volumes"]
    del pod["spec"]["containers"][0]["volumeMounts"]
    _, out = mutate(pod)
    assert out["metadata"]["annotations"] == {INJECTED_ANNOTATION: "true"}
    assert [v["name"] for v in out["spec"]["volumes"]] == ["sluice-podinfo"]
    _, again = mutate(out)
    assert again == out


def test_redis_url_from_secret_and_tuning_env() -> None:
    settings = InjectionSettings(redis_url=None, redis_url_secret=("sluice-redis", "url"),
                                 breaker_threshold=3, log_level="debug", grant_cache_size=500,
                                 grant_cache_max_age_s=0.5, max_key_resolves=8,
                                 extra_env={"SLUICE_DRAIN_S": "2"})
    _, out = mutate(pod_from(DEPLOYMENT), settings)
    side = container(out, SIDECAR_NAME)
    assert "--redis" not in side["args"]
    env = {e["name"]: e for e in side["env"]}
    assert env["SLUICE_REDIS"]["valueFrom"] == {"secretKeyRef": {"name": "sluice-redis", "key": "url"}}
    assert env["SLUICE_BREAKER_THRESHOLD"]["value"] == "3"
    assert env["SLUICE_LOG_LEVEL"]["value"] == "debug"
    assert env["SLUICE_GRANT_CACHE_SIZE"]["value"] == "500"
    assert env["SLUICE_GRANT_CACHE_MAX_AGE_S"]["value"] == "0.5"
    assert env["SLUICE_MAX_KEY_RESOLVES"]["value"] == "8"
    assert env["SLUICE_DRAIN_S"]["value"] == "2"


def test_not_a_create_or_not_a_review() -> None:
    review = pod_review(pod_from(DEPLOYMENT))
    review["request"]["operation"] = "UPDATE"
    assert "patch" not in mutate_pod(review, SETTINGS)["response"]
    with pytest.raises(ReviewError):
        mutate_pod({"kind": "Pod"}, SETTINGS)
    with pytest.raises(ReviewError):
        review_policy([1, 2])


def test_odd_manifest_never_blocks_the_pod() -> None:
    pod = pod_from(DEPLOYMENT)
    pod["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    response, out = mutate(pod)
    assert out == pod and "no valid containerPort" in response["warnings"][0]
    pod = pod_from(DEPLOYMENT)
    pod["spec"]["containers"] = "garbage"
    response, out = mutate(pod)
    assert out == pod and response["warnings"]


# ------------------------------------------------------------------------------------------
# Policy validation


def policy_review(obj: Any, *, operation: str = "CREATE", old: Any = None,
                  namespace: str = "default") -> dict[str, Any]:
    kind = obj.get("kind", "RateLimitPolicy") if isinstance(obj, dict) else "RateLimitPolicy"
    name = (obj.get("metadata") or {}).get("name", "") if isinstance(obj, dict) else ""
    return {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "sluice.dev", "version": "v1alpha1", "kind": kind},
            "resource": {"group": "sluice.dev", "version": "v1alpha1",
                         "resource": "ratelimitpolicies"},
            "name": name, "namespace": namespace, "operation": operation,
            "userInfo": {"username": "alice"}, "object": obj, "oldObject": old, "dryRun": False,
        },
    }


BAD = sorted((EXAMPLES / "bad").glob("*.yaml"))
GOOD = sorted(EXAMPLES.glob("*.yaml"))


def test_there_are_examples() -> None:
    assert len(BAD) >= 5 and len(GOOD) >= 3


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_examples_are_refused_with_field_and_reason(path: Path) -> None:
    text = path.read_text()
    (expect_line,) = [line for line in text.splitlines() if line.startswith("# expect: ")]
    expected = expect_line.removeprefix("# expect: ")
    field, _, reason = expected.partition(": ")
    review = policy_review(yaml.safe_load(text))
    response = review_policy(review)["response"]
    assert response["uid"] == review["request"]["uid"]
    assert response["allowed"] is False
    status = response["status"]
    assert status["code"] == 422 and status["status"] == "Failure" and status["reason"] == "Invalid"
    assert expected in status["message"]
    causes = status["details"]["causes"]
    assert any(c["field"] == field and c["message"].startswith(reason)
               and c["reason"] == "FieldValueInvalid" for c in causes), causes
    # one cause per error, every one of them in the message
    for c in causes:
        assert f"{c['field']}: {c['message']}" in status["message"]


def test_every_error_is_reported_not_just_the_first() -> None:
    obj = yaml.safe_load((EXAMPLES / "public-api.yaml").read_text())
    obj["spec"]["tiers"][1]["requests"] = -1
    obj["spec"]["mode"] = "loud"
    obj["spec"]["rules"][0]["match"] = {"path": {"prefix": "healthz"}}
    status = review_policy(policy_review(obj))["response"]["status"]
    fields = [c["field"] for c in status["details"]["causes"]]
    assert fields == ["spec.tiers[1].requests", "spec.rules[0].match.path.prefix", "spec.mode"]
    assert "spec.mode: must be one of enforce, shadow, got 'loud'" in status["message"]


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_good_examples_are_allowed(path: Path) -> None:
    for op in ("CREATE", "UPDATE"):
        obj = yaml.safe_load(path.read_text())
        old = copy.deepcopy(obj)
        old["spec"]["tiers"][0]["requests"] += 1  # a real spec change: validated again
        review = policy_review(obj, operation=op, old=old if op == "UPDATE" else None)
        response = review_policy(review)["response"]
        assert response["allowed"] is True and response["uid"] == review["request"]["uid"]
        assert "status" not in response


def test_cluster_policy_is_validated_too() -> None:
    obj = yaml.safe_load((EXAMPLES / "public-api.yaml").read_text())
    obj["kind"] = "ClusterRateLimitPolicy"
    del obj["metadata"]["namespace"]
    obj["spec"]["namespaceSelector"] = {"matchLabels": {"tier": "public"}}
    assert review_policy(policy_review(obj, namespace=""))["response"]["allowed"] is True
    obj["spec"]["tiers"][1]["period"] = "soon"
    response = review_policy(policy_review(obj, namespace=""))["response"]
    assert response["allowed"] is False
    assert "spec.tiers[1].period" in response["status"]["message"]


def test_delete_status_and_finalizer_updates_are_allowed() -> None:
    broken = {"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
              "metadata": {"name": "old"}, "spec": {"tiers": "nope"}}
    assert review_policy(policy_review(broken, operation="DELETE"))["response"]["allowed"] is True
    # an object stored before validation got stricter can still lose its finalizer
    deleting = copy.deepcopy(broken)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    r = review_policy(policy_review(deleting, operation="UPDATE", old=broken))["response"]
    assert r["allowed"] is True
    labelled = copy.deepcopy(broken)
    labelled["metadata"]["labels"] = {"team": "x"}
    r = review_policy(policy_review(labelled, operation="UPDATE", old=broken))["response"]
    assert r["allowed"] is True
    review = policy_review(broken, operation="UPDATE", old=broken)
    review["request"]["subResource"] = "status"
    assert review_policy(review)["response"]["allowed"] is True
    # but a spec change is validated
    changed = copy.deepcopy(broken)
    changed["spec"]["tiers"] = "still nope"
    r = review_policy(policy_review(changed, operation="UPDATE", old=broken))["response"]
    assert r["allowed"] is False


SUSPICIOUS = """
apiVersion: sluice.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: suspicious, namespace: shop}
spec:
  identify: {order: [ip]}
  tiers:
    - {name: free, requests: 10, period: 1m, burst: 500}
    - {name: pro, requests: 100, period: 1m, burst: 100}
  rules:
    - name: everything-api
      match: {path: {prefix: /api}}
      cost: 1
    - name: upload
      match: {path: {exact: /api/upload}, methods: [POST]}
      limit: {requests: 1000, period: 1m, burst: 1000}
    - name: search
      match: {path: {prefix: /search}}
      limit: {requests: 50, period: 1m, burst: 600}
  failureMode: closed
  mode: shadow
"""


def test_warnings_for_a_suspicious_but_valid_policy() -> None:
    response = review_policy(policy_review(yaml.safe_load(SUSPICIOUS), namespace="shop"))["response"]
    assert response["allowed"] is True
    warnings = response["warnings"]
    text = "\n".join(warnings)
    assert "spec.tiers[0].burst: 500 is more than 10 × requests (10)" in text
    assert "spec.rules[1].limit: 1000/1m (burst 1000) is at least as generous as any tier" in text
    assert "spec.rules[2].limit: 50/1m (burst 600) is at least as generous as tier free" in text
    assert "spec.rules[1]: never matches, spec.rules[0] (everything-api)" in text
    assert "spec.tiers: 2 tiers but 'apiKey' is not in spec.identify.order" in text
    assert "spec.mode: shadow never refuses" in text
    assert "spec.failureMode: closed has no effect" in text
    assert "spec.selector is empty" in text
    assert all(w.split(":")[0].startswith("spec.") for w in warnings)
    assert all(len(w) <= 256 for w in warnings)


def test_a_regex_mentioning_what_no_matched_path_contains_is_warned_about() -> None:
    rules = [{"name": "esc", "match": {"path": {"regex": "/files/%7E[a-z]+"}}, "cost": 1},
             {"name": "params", "match": {"path": {"regex": "/a;v=[0-9]+//b"}}, "cost": 1},
             {"name": "fine", "match": {"path": {"regex": "/users/[^/]+"}}, "cost": 1}]
    doc = {"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
           "metadata": {"name": "p", "namespace": "default"},
           "spec": {"selector": {"matchLabels": {"app": "web"}},
                    "tiers": [{"name": "free", "requests": 100, "period": "1m"}], "rules": rules}}
    warnings = review_policy(policy_review(doc))["response"]["warnings"]
    assert warnings == [
        "spec.rules[0].match.path.regex: mentions '%', which a path matched against it never "
        "contains (';params' and '//' are dropped, escapes decoded: '~', not '%7E'): that part "
        "never matches",
        "spec.rules[1].match.path.regex: mentions ';' and '//', which a path matched against it "
        "never contains (';params' and '//' are dropped, escapes decoded: '~', not '%7E'): that "
        "part never matches"]
    assert all(len(w) <= 256 for w in warnings)


def test_a_head_request_is_not_covered_by_an_earlier_get_only_skip_rule() -> None:
    """A limiting GET rule also matches HEAD, which an earlier skip rule for GET does not: the
    later rule still matches something, so no "never matches" warning."""
    rules = [{"name": "skip-get", "match": {"methods": ["GET"]}, "skip": True},
             {"name": "get", "match": {"methods": ["GET"]}, "cost": 1},
             {"name": "get-head", "match": {"methods": ["HEAD", "GET"]}, "cost": 1}]
    doc = {"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
           "metadata": {"name": "p", "namespace": "default"},
           "spec": {"selector": {"matchLabels": {"app": "web"}},
                    "tiers": [{"name": "free", "requests": 100, "period": "1m"}], "rules": rules}}
    warnings = review_policy(policy_review(doc))["response"]["warnings"]
    assert warnings == ["spec.rules[2]: never matches, spec.rules[1] (get) comes first and "
                        "matches every request it would"]


def test_cluster_policy_for_every_pod_of_every_namespace_is_warned_about() -> None:
    crlp = {"apiVersion": "sluice.dev/v1alpha1", "kind": "ClusterRateLimitPolicy",
            "metadata": {"name": "everything"},
            "spec": {"tiers": [{"name": "free", "requests": 100, "period": "1m"}]}}
    response = review_policy(policy_review(crlp))["response"]
    assert response["allowed"] is True
    assert response["warnings"] == ["spec.namespaceSelector and spec.selector are empty: every "
                                    "injected pod of every namespace shares this one budget"]
    crlp["spec"]["namespaceSelector"] = {"matchLabels": {"team": "partners"}}
    assert "warnings" not in review_policy(policy_review(crlp))["response"]


def test_a_header_source_nobody_may_set_is_warned_about() -> None:
    doc = yaml.safe_load((EXAMPLES / "internal-service.yaml").read_text())
    assert not any(w.startswith("spec.identify") for w in review_policy(policy_review(doc))["response"]["warnings"])
    del doc["spec"]["identify"]["headerFrom"]  # the default: only trusted proxies, and there are none
    warnings = review_policy(policy_review(doc))["response"]["warnings"]
    assert ("spec.identify.headerFrom: no peer may set X-Caller-Service (spec.identify.trustedProxies is "
            "empty), so the header source never applies; list the proxy that sets it, or use "
            "trustedProxiesOrLoopback") in warnings
    assert all(len(w) <= 256 for w in warnings)
    doc["spec"]["identify"]["trustedProxies"] = ["10.0.0.0/8"]
    assert not any(w.startswith("spec.identify") for w in review_policy(policy_review(doc))["response"]["warnings"])


def test_an_api_key_listed_after_another_source_is_warned_about() -> None:
    """A known key always identifies first (it carries the tier): an order that says otherwise
    is a misunderstanding worth a warning."""
    doc = yaml.safe_load((EXAMPLES / "public-api.yaml").read_text())
    doc["spec"]["identify"]["order"] = ["ip", "apiKey"]
    warnings = review_policy(policy_review(doc))["response"]["warnings"]
    assert any(w.startswith("spec.identify.order: a known API key identifies its client before") for w in warnings)
    assert all(len(w) <= 256 for w in warnings)
    doc["spec"]["identify"]["order"] = ["apiKey", "ip"]
    assert "warnings" not in review_policy(policy_review(doc))["response"]


def test_sensible_policy_has_no_warnings() -> None:
    response = review_policy(policy_review(yaml.safe_load((EXAMPLES / "public-api.yaml").read_text())))
    assert "warnings" not in response["response"]
