"""The Helm chart in charts/sluice, rendered (no API server): lint, values schema, every
manifest validated, and the wiring of values to the operator.

- ``helm lint --strict`` passes, the values schema refuses bad values, and every manifest
  ``helm template`` renders (CRDs included) validates with ``kubernetes-validate`` at the
  Kubernetes version of hack/k8s/versions.env; the chart's CRD copies are the repo's crds/
  (plus kopf's ClusterKopfPeering CRD, which is not Sluice's API).
- ``sidecar.*`` values render as ``--sidecar-*`` operator args that the operator's own parser
  turns into the InjectionSettings they describe; the chart's defaults are the operator's.
- The rendered webhook configurations are ``webhook_config.validating()``/``mutating()`` for the
  chart's Service, without the caBundle (they cannot drift apart).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from sluice_operator.webhook_config import Endpoint
from support.chart import CHART, KOPF_CRD, helm, operator_webhook_configurations, render
from support.examples import k8s_version
from support.paths import ROOT

pytestmark = pytest.mark.k8s


# ---------------------------------------------------------------------------------------------
# offline: lint, schema, render + kubernetes-validate


def test_chart_crds_are_the_repo_crds() -> None:
    repo = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_text() for p in (CHART / "crds").glob("*.yaml") if p.name != KOPF_CRD}
    assert repo, "no CRDs in crds/"
    assert chart == repo, "charts/sluice/crds/ must be exact copies of crds/*.yaml (cp them)"
    kopf = yaml.safe_load((CHART / "crds" / KOPF_CRD).read_text())
    assert kopf["metadata"]["name"] == "clusterkopfpeerings.kopf.dev"
    assert kopf["spec"]["scope"] == "Cluster"
    assert kopf["spec"]["names"]["kind"] == "ClusterKopfPeering"


@pytest.mark.parametrize("values", [[], ["--set", "webhook.enabled=false"],
                                    ["--set", "replicaCount=1"]],
                         ids=["default", "no-webhook", "one-replica"])
def test_helm_lint(values: list[str]) -> None:
    res = helm("lint", "--strict", str(CHART), *values)
    assert "0 chart(s) failed" in res.stdout, res.stdout


@pytest.mark.parametrize(("setting", "complaint"), [
    ("externalRedis.url=http://redis:6379", "/externalRedis/url"),
    ("operator.resyncIntervalSeconds=0", "/operator/resyncIntervalSeconds"),
    ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
    ("webhook.enabld=true", "enabld"),
    ("replicaCount=0", "/replicaCount"),
    ("peering.lifetimeSeconds=0", "/peering/lifetimeSeconds"),
    ("peering.name=Not_A_Name", "/peering/name"),
    ("sidecar.imagePullPolicy=Sometimes", "/sidecar/imagePullPolicy"),
    ("sidecar.resources.requests.cpu=lots", "/sidecar/resources/requests/cpu"),
    ("sidecar.resources.claims[0].name=x", "claims"),
    ("sidecar.redisTimeoutMs=0", "/sidecar/redisTimeoutMs"),
    ("sidecar.breakerThreshold=-1", "/sidecar/breakerThreshold"),
    ("sidecar.grantCacheSize=0", "/sidecar/grantCacheSize"),
    ("sidecar.grantCacheMaxAgeSeconds=0", "/sidecar/grantCacheMaxAgeSeconds"),
    ("sidecar.maxKeyResolves=1.5", "/sidecar/maxKeyResolves"),
    ("sidecar.usage.mode=maybe", "/sidecar/usage/mode"),
    ("sidecar.usage.windowSeconds=0", "/sidecar/usage/windowSeconds"),
    ("sidecar.usage.colour=red", "colour"),
    ("sidecar.env.SLUICE_GRANT_CACHE_SIZE=5", "SLUICE_GRANT_CACHE_SIZE"),
    ("sidecar.logLevel=trace", "/sidecar/logLevel"),
    ("sidecar.port=65536", "/sidecar/port"),
    ("sidecar.defaultPortName=Web", "/sidecar/defaultPortName"),
    ("sidecar.runAsUser=0", "/sidecar/runAsUser"),
    ("sidecar.env.1BAD=x", "1BAD"),
    ("sidecar.env.SLUICE_LOG_LEVEL=debug", "SLUICE_LOG_LEVEL"),
    ("sidecar.env.POD_NAME=x", "POD_NAME"),
])
def test_values_schema_refuses_bad_values(setting: str, complaint: str) -> None:
    res = helm("template", "sluice", str(CHART), "--set", setting, check=False)
    assert res.returncode != 0, f"--set {setting} was accepted"
    assert "schema" in res.stderr and complaint in res.stderr, res.stderr


def test_a_redis_password_never_lands_in_injected_pod_specs() -> None:
    """With the operator's URL from a Secret, the chart will not hand that URL (password and all)
    to the injector, which would write it into every pod spec: it asks for a Secret of the
    sidecars' own, or an explicit URL."""
    external = ("--set", "redis.enabled=false", "--set", "externalRedis.existingSecret=redis-url")
    res = helm("template", "sluice", str(CHART), *external, check=False)
    assert res.returncode != 0 and "sidecar.redisSecret.name" in res.stderr, res.stderr
    docs = render(*external, "--set", "sidecar.redisSecret.name=sluice-redis")
    args = operator_container(docs)["args"]
    assert "--sidecar-redis-secret=sluice-redis/url" in args
    assert not any(a.startswith("--sidecar-redis=") for a in args)


# ---------------------------------------------------------------------------------------------
# sidecar.* values -> --sidecar-* operator args -> the operator's own parser


EXTERNAL_REDIS = ("--set", "redis.enabled=false", "--set", "externalRedis.url=redis://redis:6379")
"""The operator's Redis URL as a plain value (the in-chart Redis's comes from its Secret)."""


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = [d for d in docs if d["kind"] == "Deployment"
              and d["metadata"]["name"].endswith("-operator")]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return dict(c)


def injection_from_chart(docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> Any:
    """What the operator makes of the rendered args: the real ``sluice operator`` parser, with
    the container's env (and nothing from this process's) -> InjectionSettings."""
    import argparse

    from sluice_operator import cli as operator_cli

    c = operator_container(docs)
    for name in list(os.environ):
        if name.startswith("SLUICE_OPERATOR_"):
            monkeypatch.delenv(name)
    for e in c["env"]:
        if "value" in e:
            monkeypatch.setenv(e["name"], e["value"])
    assert c["args"][0] == "operator"
    parser = argparse.ArgumentParser()
    operator_cli.add_arguments(parser)
    return operator_cli.settings_from_args(parser.parse_args(c["args"][1:])).injection


def test_sidecar_values_reach_the_operator_as_flags_it_accepts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sluice_operator.injection.container import sidecar_container
    from sluice_operator.injection.settings import InjectionSettings

    tricky = 'http://proxy:3128, "quoted" # not a comment: {x}\n\'single\' é'
    values = {"sidecar": {
        "image": "reg.example/sluice-sidecar:2", "imagePullPolicy": "Always",
        "resources": {"requests": {"cpu": "100m", "memory": "96Mi"},
                      "limits": {"cpu": "1", "memory": "256Mi"}},
        "redisTimeoutMs": 20, "redisConnectTimeoutMs": 1_000_000,  # not 1e+06
        "breakerThreshold": 3, "breakerCooldownSeconds": 0.5, "logLevel": "warning",
        "grantCacheSize": 2_000_000, "grantCacheMaxAgeSeconds": 0.25, "maxKeyResolves": 16,
        "usage": {"mode": "off", "windowSeconds": 2.5, "maxClients": 5000, "maxEndpoints": 20,
                  "streamMaxLen": 1_000_000, "retries": 3},
        "maxRequestHeaderBytes": 32768, "maxHeaders": 50, "headerTimeoutSeconds": 2.5,
        "keepaliveTimeoutSeconds": 30, "clientTimeoutSeconds": 20, "maxConnections": 4096,
        "maxConnectionsPerClient": 128, "maxInflightRequests": 1_000_000,
        "port": 16080, "adminPort": 16090, "defaultPortName": "web", "runAsUser": 1_000_000_000,
        "env": {"SLUICE_UPSTREAM_TIMEOUT_S": "30", "HTTP_PROXY": tricky}}}
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    docs = render("-f", str(path), *EXTERNAL_REDIS)
    args = operator_container(docs)["args"]
    sidecar_args = [a for a in args if a.startswith("--sidecar-")]
    assert sidecar_args == [
        "--sidecar-image=reg.example/sluice-sidecar:2",
        "--sidecar-image-pull-policy=Always",
        '--sidecar-resources={"limits":{"cpu":"1","memory":"256Mi"},'
        '"requests":{"cpu":"100m","memory":"96Mi"}}',
        "--sidecar-redis-timeout-ms=20",
        "--sidecar-redis-connect-timeout-ms=1000000",
        "--sidecar-breaker-threshold=3",
        "--sidecar-breaker-cooldown-s=0.5",
        "--sidecar-log-level=warning",
        "--sidecar-grant-cache-size=2000000",
        "--sidecar-grant-cache-max-age-s=0.25",
        "--sidecar-max-key-resolves=16",
        "--sidecar-usage=off",
        "--sidecar-usage-window-s=2.5",
        "--sidecar-usage-max-clients=5000",
        "--sidecar-usage-max-endpoints=20",
        "--sidecar-usage-stream-maxlen=1000000",
        "--sidecar-usage-retries=3",
        "--sidecar-max-request-header-bytes=32768",
        "--sidecar-max-headers=50",
        "--sidecar-header-timeout-s=2.5",
        "--sidecar-keepalive-timeout-s=30",
        "--sidecar-client-timeout-s=20",
        "--sidecar-max-connections=4096",
        "--sidecar-max-connections-per-client=128",
        "--sidecar-max-inflight-requests=1000000",
        "--sidecar-port=16080",
        "--sidecar-admin-port=16090",
        "--sidecar-default-port-name=web",
        "--sidecar-run-as-user=1000000000",
        f"--sidecar-env=HTTP_PROXY={tricky}",
        "--sidecar-env=SLUICE_UPSTREAM_TIMEOUT_S=30",
    ]
    settings = injection_from_chart(docs, monkeypatch)
    assert settings == InjectionSettings(
        image="reg.example/sluice-sidecar:2", image_pull_policy="Always",
        redis_url="redis://redis:6379", redis_timeout_ms=20, redis_connect_timeout_ms=1_000_000,
        breaker_threshold=3, breaker_cooldown_s=0.5, log_level="warning",
        grant_cache_size=2_000_000, grant_cache_max_age_s=0.25, max_key_resolves=16,
        usage="off", usage_window_s=2.5, usage_max_clients=5000, usage_max_endpoints=20,
        usage_stream_maxlen=1_000_000, usage_retries=3,
        client_limits={"max_request_header_bytes": 32768, "max_headers": 50,
                       "header_timeout_s": 2.5, "keepalive_timeout_s": 30.0, "client_timeout_s": 20.0,
                       "max_connections": 4096, "max_connections_per_client": 128,
                       "max_inflight_requests": 1_000_000},
        extra_env={"HTTP_PROXY": tricky, "SLUICE_UPSTREAM_TIMEOUT_S": "30"},
        sidecar_port=16080, admin_port=16090, default_port_name="web",
        resources=values["sidecar"]["resources"], run_as_user=1_000_000_000)
    c = sidecar_container(settings, "web", 16080, 16090, 8000)
    assert c["resources"] == values["sidecar"]["resources"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["SLUICE_REDIS_CONNECT_TIMEOUT_MS"] == "1000000"
    assert env["SLUICE_MAX_INFLIGHT_REQUESTS"] == "1000000"
    assert env["SLUICE_HEADER_TIMEOUT_S"] == "2.5"
    assert env["SLUICE_GRANT_CACHE_SIZE"] == "2000000"
    assert env["SLUICE_GRANT_CACHE_MAX_AGE_S"] == "0.25"
    assert env["HTTP_PROXY"] == tricky


def test_default_sidecar_values_are_the_operator_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart's defaults (resources etc.) are InjectionSettings' defaults; and a value set to
    null leaves its flag out, so the operator's default applies."""
    from dataclasses import replace

    from sluice_operator.injection.settings import InjectionSettings

    image = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    expected = replace(InjectionSettings(), image=f"sluice:{image}", redis_url="redis://redis:6379")
    assert injection_from_chart(render(*EXTERNAL_REDIS), monkeypatch) == expected
    keys = ("imagePullPolicy", "resources", "redisTimeoutMs", "port", "adminPort",
            "defaultPortName", "runAsUser")
    docs = render(*EXTERNAL_REDIS, *[a for k in keys for a in ("--set", f"sidecar.{k}=null")])
    sidecar_args = [a for a in operator_container(docs)["args"] if a.startswith("--sidecar-")]
    assert sidecar_args == [f"--sidecar-image=sluice:{image}"]
    assert injection_from_chart(docs, monkeypatch) == expected
    # requests and limits dropped: an explicit "no resources"
    docs = render("--set", "sidecar.resources.requests=null", "--set", "sidecar.resources.limits=null",
                  "--set", "sidecar.runAsUser=image", *EXTERNAL_REDIS)
    assert "--sidecar-resources={}" in operator_container(docs)["args"]
    settings = injection_from_chart(docs, monkeypatch)
    assert settings.resources == {} and settings.run_as_user is None


def test_a_value_the_schema_passes_but_the_operator_refuses_fails_at_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A request above its limit passes the schema (it has no arithmetic); the operator then
    exits at start naming the flag, before it injects a single pod."""
    docs = render("--set", "sidecar.resources.limits.memory=32Mi", *EXTERNAL_REDIS)
    with pytest.raises(SystemExit, match=r"^sluice operator: --sidecar-resources: requests.memory "
                                         r"\(64Mi\) is above limits.memory \(32Mi\)"):
        injection_from_chart(docs, monkeypatch)


def test_the_schema_refuses_the_env_vars_the_operator_refuses() -> None:
    from sluice_operator.injection import settings as injection

    schema = json.loads((CHART / "values.schema.json").read_text())
    names = schema["properties"]["sidecar"]["properties"]["env"]["propertyNames"]
    assert sorted(names["not"]["enum"]) == sorted(injection.RESERVED_ENV)


@pytest.mark.parametrize("values", [[], ["--set", "webhook.enabled=false"],
                                    ["--set", "redis.enabled=false",
                                     "--set", "externalRedis.existingSecret=redis-url",
                                     "--set", "sidecar.image=reg/sidecar:1",
                                     "--set", "sidecar.redisUrl=redis://other:6379"],
                                    ["--set", "replicaCount=1"],
                                    ["--set", "analytics.enabled=false",
                                     "--set", "networkPolicy.enabled=false",
                                     "--set", "redis.persistence.enabled=true",
                                     "--set", "sidecar.redisSecret.namespaces={shop,web}"]],
                         ids=["default", "no-webhook", "secret-url", "one-replica", "operator-only"])
def test_rendered_manifests_validate(values: list[str]) -> None:
    docs = render(*values)
    version = k8s_version()
    for doc in docs:
        if doc["apiVersion"] == "kopf.dev/v1":  # a custom resource: its CRD's schema is open
            assert doc["kind"] == "ClusterKopfPeering" and set(doc) == {
                "apiVersion", "kind", "metadata"}, doc
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} is invalid for Kubernetes "
                        f"{version}: {exc}")
    kinds = sorted(d["kind"] for d in docs)
    expected = ["ClusterRole", "ClusterRole", "ClusterRole",  # the operator's; usage viewer and admin
                "ClusterRoleBinding", "CustomResourceDefinition",
                "CustomResourceDefinition", "CustomResourceDefinition", "Deployment",
                "ServiceAccount", "ClusterKopfPeering"]
    if "webhook.enabled=false" not in values:
        expected += ["Service", "Role", "RoleBinding",  # the webhook certificate Secret
                     "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"]
    if "replicaCount=1" not in values:
        expected.append("PodDisruptionBudget")
    if "networkPolicy.enabled=false" not in values:
        expected.append("NetworkPolicy")  # the operator's
    if "redis.enabled=false" not in values:  # its password Secret, + one per sidecar namespace
        expected += ["StatefulSet", "Service", "ConfigMap", "Secret"]
        expected += ["Secret"] * (2 if "sidecar.redisSecret.namespaces={shop,web}" in values else 0)
        expected += [] if "networkPolicy.enabled=false" in values else ["NetworkPolicy"]
    if "analytics.enabled=false" not in values:  # + its ServiceAccount's ClusterRole(Binding)
        expected += ["Deployment", "Service", "ServiceAccount", "ClusterRole",
                     "ClusterRoleBinding", "PersistentVolumeClaim", "NetworkPolicy"]
    assert kinds == sorted(expected)


def test_deployment_wiring() -> None:
    docs = render("--set", "redis.enabled=false", "--set", "externalRedis.url=redis://r.example:6379",
                  "--set", "operator.resyncIntervalSeconds=7", namespace="ops")
    by_kind = operator_objects(docs)
    dep, svc = by_kind["Deployment"], by_kind["Service"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"][0] == "operator"
    assert "--resync-interval-s=7" in c["args"]
    assert "--webhook-listen=0.0.0.0:8443" in c["args"]
    assert f"--webhook-service=ops/{svc['metadata']['name']}:443" in c["args"]
    assert "--metrics-listen=0.0.0.0:9091" in c["args"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in c["args"]
    assert "--cluster-keys-namespace=ops" in c["args"]
    assert {"name": "SLUICE_OPERATOR_REDIS", "value": "redis://r.example:6379"} in c["env"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "healthz": 8080, "metrics": 9091, "webhook": 8443}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsUser"] == 65532 and pod["securityContext"]["runAsNonRoot"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/var/run/sluice/webhook-certs" in mounts
    cert_dir = next(a for a in c["args"] if a.startswith("--webhook-cert-dir="))
    assert cert_dir.split("=", 1)[1] in mounts
    assert svc["spec"]["ports"] == [{"name": "https-webhook", "port": 443,
                                     "targetPort": "webhook", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert pod["serviceAccountName"] == by_kind["ServiceAccount"]["metadata"]["name"]
    role = by_kind["ClusterRole"]
    for rule in [*role["rules"], *by_kind["Role"]["rules"]]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {rule}"


def operator_objects(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The operator's objects by kind: not the usage ClusterRoles (for people), not Redis's or the
    collector's (their component label)."""
    return {d["kind"]: d for d in docs if not d["metadata"]["name"].endswith(USAGE_ROLES)
            and (d["metadata"].get("labels") or {}).get("app.kubernetes.io/component",
                                                          "operator") == "operator"}


USAGE_ROLES = ("-usage-viewer", "-usage-admin")


def test_usage_cluster_roles() -> None:
    """The analytics API's SubjectAccessReviews: reads ``get`` ``…/usage``, resets ``update``
    ``…/buckets``; the viewer may not reset."""
    roles = {d["metadata"]["name"]: d for d in render() if d["kind"] == "ClusterRole"}
    viewer, admin = roles["sluice-usage-viewer"]["rules"], roles["sluice-usage-admin"]["rules"]
    assert [(r["resources"], r["verbs"]) for r in viewer] == [
        (["ratelimitpolicies/usage", "clusterratelimitpolicies/usage"], ["get"])]
    assert (["ratelimitpolicies/buckets", "clusterratelimitpolicies/buckets"], ["update"]) in [
        (r["resources"], r["verbs"]) for r in admin]


WEBHOOK_KINDS = ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration")


def without_labels(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "metadata": {k: v for k, v in doc["metadata"].items() if k != "labels"}}


def test_rendered_webhook_configurations_are_the_operators() -> None:
    """The chart owns the webhook configurations (so ``helm uninstall`` removes them); they are
    exactly what the operator builds for the chart's Service (webhook_config.validating() and
    mutating()), but for the caBundle the operator fills in and the labels: they cannot drift."""
    docs = render(namespace="ops")
    by_kind = operator_objects(docs)
    svc = by_kind["Service"]
    name, (port,) = svc["metadata"]["name"], svc["spec"]["ports"]
    # the Service the operator is told about (--webhook-service NS/NAME:PORT) is this one
    assert f"--webhook-service=ops/{name}:{port['port']}" in operator_container(docs)["args"]
    endpoint = Endpoint(service_namespace="ops", service_name=name, service_port=port["port"])
    for kind, want in operator_webhook_configurations(endpoint, b"").items():
        got = by_kind[kind]
        assert without_labels(got) == without_labels(want), kind
        assert "caBundle" not in got["webhooks"][0]["clientConfig"]
        # Helm's labels; the operator's own label key is not Helm's managed-by
        assert got["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert "app.kubernetes.io/managed-by" not in want["metadata"]["labels"]
    # with the operator's CA, its manifests differ from the chart's in the caBundle only
    ca = b"-----BEGIN CERTIFICATE-----\n"
    for kind, want in operator_webhook_configurations(endpoint, ca).items():
        (hook,) = want["webhooks"]
        assert base64.b64decode(hook["clientConfig"].pop("caBundle")) == ca
        assert without_labels(by_kind[kind]) == without_labels(want)
    assert not set(WEBHOOK_KINDS) & {d["kind"] for d in render("--set", "webhook.enabled=false")}


def test_high_availability_wiring() -> None:
    """Two replicas peering through the chart's ClusterKopfPeering, sharing the certificate
    Secret, spread over nodes, a PodDisruptionBudget; RBAC names the same objects."""
    docs = render("--set", "peering.lifetimeSeconds=15", namespace="ops")
    by_kind = operator_objects(docs)
    dep, full = by_kind["Deployment"], "sluice"  # release "sluice" contains the chart name
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate",
                                       "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    peering = by_kind["ClusterKopfPeering"]["metadata"]["name"]
    assert peering == full
    assert f"--peering={peering}" in c["args"]
    assert "--peering-lifetime-s=15" in c["args"]
    secret = f"{full}-webhook-tls"
    assert f"--webhook-cert-secret=ops/{secret}" in c["args"]
    assert {"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in c["env"]
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    selector = dep["spec"]["selector"]["matchLabels"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    pdb = by_kind["PodDisruptionBudget"]
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}
    assert pdb["metadata"]["namespace"] == "ops"

    peering_rules = [r for r in by_kind["ClusterRole"]["rules"] if r["apiGroups"] == ["kopf.dev"]]
    assert peering_rules == [
        {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"],
         "verbs": ["list", "watch"]},
        {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"],
         "resourceNames": [peering], "verbs": ["patch"]}]
    role, binding = by_kind["Role"], by_kind["RoleBinding"]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "ops"
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret],
         "verbs": ["get", "update"]}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "namespace": "ops",
                                    "name": by_kind["ServiceAccount"]["metadata"]["name"]}]

    # a name of one's own; an affinity of one's own replaces the default one
    docs = render("--set", "peering.name=team-sluice", "--set", "replicaCount=1",
                  "--set", "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
                  ".nodeSelectorTerms[0].matchExpressions[0].key=pool",
                  "--set", "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
                  ".nodeSelectorTerms[0].matchExpressions[0].operator=Exists")
    by_kind = operator_objects(docs)
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    assert "--peering=team-sluice" in pod["containers"][0]["args"]
    assert by_kind["ClusterKopfPeering"]["metadata"]["name"] == "team-sluice"
    assert set(pod["affinity"]) == {"nodeAffinity"}
    assert "PodDisruptionBudget" not in by_kind
