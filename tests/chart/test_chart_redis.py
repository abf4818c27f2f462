"""The chart's Redis, rendered (``helm template``): the in-chart StatefulSet (redis.enabled, the
default) and the wiring of its URL, or of an external one, into the operator, the collector and
the injected sidecars. The password's survival across upgrades needs an API server:
tests/k8s/test_k8s_chart_release.py."""

from __future__ import annotations

import argparse
import base64
import os
import re
from typing import Any

import pytest
import yaml
from sluice_core.redisurl import Topology, parse_redis_url
from support.chart import CHART, container, env_of, find, helm, render, secret_ref

pytestmark = pytest.mark.k8s  # helm is one of the k8s tools (hack/k8s/build.sh)

NS = "sluice-system"
EXTERNAL = ("--set", "redis.enabled=false")


def secret_data(doc: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in doc["data"].items()}


def operator_args_and_env(docs: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    c = container(find(docs, "Deployment", "sluice-operator"))
    return list(c["args"]), env_of(c)


def megabytes(text: str) -> float:
    """A Redis size (200mb) or a Kubernetes quantity (256Mi) in MiB-ish units."""
    m = re.fullmatch(r"(\d+)([a-zA-Z]*)", text)
    assert m, text
    unit = m[2].lower().rstrip("b").rstrip("i")
    return int(m[1]) * {"": 1 / 2**20, "k": 1 / 1024, "m": 1, "g": 1024}[unit]


def test_redis_is_installed_as_sluice_needs_it() -> None:
    docs = render(namespace=NS)
    sts = find(docs, "StatefulSet", "sluice-redis")
    assert sts["spec"]["replicas"] == 1
    pod = sts["spec"]["template"]["spec"]
    c = container(sts)
    conf = find(docs, "ConfigMap", "sluice-redis")["data"]["redis.conf"]
    settings = dict(line.split(" ", 1) for line in conf.splitlines()
                    if line.strip() and not line.startswith("#"))
    # only keys with a TTL (buckets, heartbeats) may be evicted, and Redis fills up before the
    # kernel kills it
    assert settings["maxmemory-policy"] == "volatile-ttl"
    assert megabytes(settings["maxmemory"]) < megabytes(c["resources"]["limits"]["memory"])
    assert settings["include"] == "/etc/redis-auth/auth.conf"
    assert settings["appendonly"] == "no" and settings["save"] == '""'
    # non-root, read-only, nothing to escalate; no API token in a pod that needs none
    sec = c["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] > 0
    assert sec["readOnlyRootFilesystem"] and not sec["allowPrivilegeEscalation"]
    assert sec["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    # probes that want PONG (redis-cli exits 0 on NOAUTH or LOADING), authenticated
    for probe in ("readinessProbe", "livenessProbe"):
        assert "grep -qx PONG" in c[probe]["exec"]["command"][-1], probe
    assert env_of(c)["REDISCLI_AUTH"] == secret_ref("sluice-redis", "password")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/data"] == "data" and mounts["/etc/redis"] == "config"
    auth = next(v for v in pod["volumes"] if v["name"] == mounts["/etc/redis-auth"])
    assert auth["secret"]["items"] == [{"key": "auth.conf", "path": "auth.conf"}]
    # the Service in front of it
    svc = find(docs, "Service", "sluice-redis")
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [{"name": "redis", "port": 6379, "targetPort": "redis",
                                     "protocol": "TCP"}]


def test_one_generated_password_reaches_every_client_and_no_pod_spec() -> None:
    """The password is generated once per render: the URL the operator and the collector read,
    redis.conf's requirepass and the sidecars' Secret in each listed namespace carry that one;
    the URL names the Service from any namespace. No pod spec holds it."""
    docs = render("--set", "sidecar.redisSecret.namespaces={shop,web}", namespace=NS)
    data = secret_data(find(docs, "Secret", "sluice-redis"))
    password = data["password"]
    assert len(password) >= 32 and password.isalnum()
    assert data["auth.conf"] == f"requirepass {password}\n"
    target = parse_redis_url(data["url"])
    assert target.topology is Topology.SINGLE and target.password == password
    assert target.hosts == (("sluice-redis.sluice-system.svc", 6379),)
    for ns in ("shop", "web"):
        (copy,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["namespace"] == ns]
        assert copy["metadata"]["name"] == "sluice-redis-url"
        assert secret_data(copy) == {"url": data["url"]}
    args, env = operator_args_and_env(docs)
    assert env["SLUICE_OPERATOR_REDIS"] == secret_ref("sluice-redis", "url")
    assert "--sidecar-redis-secret=sluice-redis-url/url" in args
    assert not any(a.startswith("--sidecar-redis=") for a in args)
    analytics = env_of(container(find(docs, "Deployment", "sluice-analytics")))
    assert analytics["SLUICE_ANALYTICS_REDIS"] == secret_ref("sluice-redis", "url")
    for doc in docs:
        if doc["kind"] != "Secret":
            assert password not in yaml.safe_dump(doc), f"{doc['kind']} {doc['metadata']['name']}"
    # another render, another password (an API server's lookup keeps it: the k8s test)
    again = secret_data(find(render(namespace=NS), "Secret", "sluice-redis"))["password"]
    assert again != password


def test_redis_persistence_is_optional() -> None:
    docs = render("--set", "redis.persistence.enabled=true", "--set", "redis.persistence.size=5Gi",
                  "--set", "redis.persistence.storageClass=fast", namespace=NS)
    sts = find(docs, "StatefulSet", "sluice-redis")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    assert "data" not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
    conf = find(docs, "ConfigMap", "sluice-redis")["data"]["redis.conf"]
    assert "appendonly yes" in conf and "appendfsync everysec" in conf
    # off (the default): an emptyDir, no claim
    sts = find(render(namespace=NS), "StatefulSet", "sluice-redis")
    assert "volumeClaimTemplates" not in sts["spec"]
    assert {"name": "data", "emptyDir": {"sizeLimit": "64Mi"}} in sts["spec"]["template"]["spec"]["volumes"]


@pytest.mark.parametrize(("setting", "complaint"), [
    ("redis.maxmemoryPolicy=allkeys-lru", "/redis/maxmemoryPolicy"),  # may evict config
    ("redis.maxmemoryPolicy=noeviction", "/redis/maxmemoryPolicy"),  # refuses every decision when full
    ("redis.maxmemory=lots", "/redis/maxmemory"),
    ("redis.runAsUser=0", "/redis/runAsUser"),
    ("redis.persistence.size=big", "/redis/persistence/size"),
    ("redis.colour=red", "colour"),
    ("externalRedis.url=http://r:6379", "/externalRedis/url"),
    ("sidecar.redisSecret.namespaces[0]=Not_A_Namespace", "/sidecar/redisSecret/namespaces/0"),
])
def test_the_schema_refuses_unsafe_redis_values(setting: str, complaint: str) -> None:
    res = helm("template", "sluice", str(CHART), "--set", setting, check=False)
    assert res.returncode != 0, f"--set {setting} was accepted"
    assert "schema" in res.stderr and complaint in res.stderr, res.stderr


@pytest.mark.parametrize(("url", "topology"), [
    ("rediss://:pw@redis.example:6380?ssl_ca_certs=/etc/sluice/redis-tls/ca.crt", Topology.SINGLE),
    ("redis+sentinel://s1:26379,s2:26379/mymaster", Topology.SENTINEL),
    ("redis+cluster://c1:7000,c2:7001", Topology.CLUSTER),
])
def test_external_redis_urls_reach_the_operator_and_the_collector(
        url: str, topology: Topology, monkeypatch: pytest.MonkeyPatch) -> None:
    """TLS, Sentinel and Cluster are URL schemes: the operator's and the collector's own parsers
    take what the chart renders; no Redis of the chart's is rendered."""
    from sluice_analytics import cli as analytics_cli
    from sluice_operator import cli as operator_cli

    docs = render(*EXTERNAL, "--set", f"externalRedis.url={url.replace(',', chr(92) + ',')}",
                  "--set", "externalRedis.tls.caSecret=redis-ca", namespace=NS)
    assert not [d for d in docs if d["metadata"]["name"].startswith("sluice-redis")]
    for name, var in (("sluice-operator", "SLUICE_OPERATOR_REDIS"),
                      ("sluice-analytics", "SLUICE_ANALYTICS_REDIS")):
        dep = find(docs, "Deployment", name)
        c = container(dep)
        assert env_of(c)[var] == url
        mount = next(m for m in c["volumeMounts"] if m["name"] == "redis-tls")
        assert mount["mountPath"] == "/etc/sluice/redis-tls" and mount["readOnly"]
        assert {"name": "redis-tls", "secret": {"secretName": "redis-ca"}} in \
            dep["spec"]["template"]["spec"]["volumes"]
    for name in list(os.environ):
        if name.startswith(("SLUICE_OPERATOR_", "SLUICE_ANALYTICS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SLUICE_OPERATOR_REDIS", url)
    parser = argparse.ArgumentParser()
    operator_cli.add_arguments(parser)
    args, _ = operator_args_and_env(docs)
    settings = operator_cli.settings_from_args(parser.parse_args(args[1:]))
    assert parse_redis_url(settings.redis).topology is topology
    assert settings.injection.redis_url == url  # the sidecars get it too (no password here)
    monkeypatch.setenv("SLUICE_ANALYTICS_REDIS", url)
    parser = argparse.ArgumentParser()
    analytics_cli.add_arguments(parser)
    c = container(find(docs, "Deployment", "sluice-analytics"))
    assert analytics_cli.settings_from_args(parser.parse_args(c["args"][1:])).redis == url


def test_external_redis_from_a_secret() -> None:
    docs = render(*EXTERNAL, "--set", "externalRedis.existingSecret=my-redis",
                  "--set", "externalRedis.existingSecretKey=uri",
                  "--set", "sidecar.redisSecret.name=app-redis", namespace=NS)
    args, env = operator_args_and_env(docs)
    assert env["SLUICE_OPERATOR_REDIS"] == secret_ref("my-redis", "uri")
    assert "--sidecar-redis-secret=app-redis/url" in args
    analytics = env_of(container(find(docs, "Deployment", "sluice-analytics")))
    assert analytics["SLUICE_ANALYTICS_REDIS"] == secret_ref("my-redis", "uri")
    res = helm("template", "sluice", str(CHART), *EXTERNAL, check=False)
    assert res.returncode != 0 and "externalRedis.url is required" in res.stderr, res.stderr


def test_a_long_release_name_still_makes_a_valid_statefulset() -> None:
    """A StatefulSet's name leaves room for the controller-revision-hash label (52 characters);
    the sidecars' Secret name follows it."""
    name = "a" * 53
    out = helm("template", name, str(CHART), "--namespace", NS,
               "--set", "sidecar.redisSecret.namespaces={shop}").stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    assert len(sts["metadata"]["name"]) <= 52
    assert find(docs, "Service", sts["metadata"]["name"])
    args = container(next(d for d in docs if d["kind"] == "Deployment"
                          and d["metadata"]["name"].endswith("-operator")))["args"]
    (copy,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["namespace"] == "shop"]
    assert f"--sidecar-redis-secret={copy['metadata']['name']}/url" in args
