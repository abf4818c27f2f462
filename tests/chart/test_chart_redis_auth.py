"""The in-chart Redis's password for GitOps installs (REVIEW15 M9), rendered with ``helm
template`` as Argo CD and Flux post-renderers do: ``redis.auth.existingSecret`` brings the
password, no Secret of the chart carries it, every client builds its URL from it, and the pods
that read a password carry a checksum of it so a new one restarts them. The init container
that turns the password into redis.conf's ``requirepass`` runs here for real (sh, then
redis-server with the line it wrote)."""

from __future__ import annotations

import base64
import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
from sluice_core.redisurl import Topology, parse_redis_url
from support.chart import CHART, container, env_of, find, helm, render, secret_ref
from support.polling import poll
from support.redis_servers import RedisServer

pytestmark = pytest.mark.k8s  # helm is one of the k8s tools (hack/k8s/build.sh)

NS = "sluice-system"
GITOPS = ("--set", "redis.auth.existingSecret=redis-pass", "--set", "redis.auth.existingSecretKey=pw")
CLIENTS = [("Deployment", "sluice-operator", "SLUICE_OPERATOR_REDIS"),
           ("Deployment", "sluice-analytics", "SLUICE_ANALYTICS_REDIS")]


def annotations(workload: dict[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"].get("annotations") or {})


def init_script(docs: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    (init,) = find(docs, "StatefulSet", "sluice-redis")["spec"]["template"]["spec"]["initContainers"]
    return list(init["command"]), dict(init)


def test_an_existing_secret_brings_the_password_and_no_chart_secret_holds_it() -> None:
    docs = render(*GITOPS, namespace=NS)
    assert not [d for d in docs if d["kind"] == "Secret"], "the chart rendered a Secret with a password"
    sts = find(docs, "StatefulSet", "sluice-redis")
    assert env_of(container(sts))["REDISCLI_AUTH"] == secret_ref("redis-pass", "pw")
    _, init = init_script(docs)
    assert env_of(init)["REDISCLI_AUTH"] == secret_ref("redis-pass", "pw")
    pod = sts["spec"]["template"]["spec"]
    (auth,) = [v for v in pod["volumes"] if v["name"] == "auth"]
    assert auth["emptyDir"]["medium"] == "Memory"  # the requirepass line never reaches a disk
    assert {"name": "auth", "mountPath": "/etc/redis-auth"} in init["volumeMounts"]
    assert init["securityContext"] == container(sts)["securityContext"]
    for kind, name, var in CLIENTS:
        c = container(find(docs, kind, name))
        names = [e["name"] for e in c["env"]]
        # $(REDIS_PASSWORD) expands only from an entry defined before the one that uses it
        assert names.index("REDIS_PASSWORD") < names.index(var)
        env = env_of(c)
        assert env["REDIS_PASSWORD"] == secret_ref("redis-pass", "pw")
        url = env[var]
        assert url == f"redis://:$(REDIS_PASSWORD)@sluice-redis.{NS}.svc:6379"
        target = parse_redis_url(url.replace("$(REDIS_PASSWORD)", "s3cret"))
        assert target.topology is Topology.SINGLE and target.password == "s3cret"


def test_the_chart_refuses_sidecar_secrets_it_cannot_fill() -> None:
    res = helm("template", "sluice", str(CHART), "--namespace", NS, *GITOPS,
               "--set", "sidecar.redisSecret.namespaces={shop}", check=False)
    assert res.returncode != 0
    assert "redis.auth.existingSecret" in res.stderr and "sluice-redis-url" in res.stderr


def test_every_pod_that_reads_the_password_carries_its_checksum() -> None:
    docs = render(namespace=NS)
    password = base64.b64decode(find(docs, "Secret", "sluice-redis")["data"]["password"]).decode()
    digest = hashlib.sha256(password.encode()).hexdigest()
    for kind, name in [("StatefulSet", "sluice-redis"), *[(k, n) for k, n, _ in CLIENTS]]:
        assert annotations(find(docs, kind, name))["checksum/redis-auth"] == digest, name
    # from an existing Secret: its resourceVersion once looked up; helm template cannot
    gitops = render(*GITOPS, namespace=NS)
    for kind, name in [("StatefulSet", "sluice-redis"), *[(k, n) for k, n, _ in CLIENTS]]:
        assert annotations(find(gitops, kind, name))["checksum/redis-auth"] == "unknown", name
    external = render("--set", "redis.enabled=false", "--set", "externalRedis.url=redis://r:6379")
    assert "checksum/redis-auth" not in annotations(find(external, "Deployment", "sluice-operator"))


def run_init(command: list[str], password: str, out: Path) -> subprocess.CompletedProcess[str]:
    """The init container's command as the kubelet runs it, writing to ``out``."""
    return subprocess.run([*command, str(out)], env={"REDISCLI_AUTH": password, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("bad", ["", "two words", "p@ss:word", "new\nline", "quo\"te", "50%"])
def test_the_init_container_refuses_a_password_that_breaks_a_url(bad: str, tmp_path: Path) -> None:
    command, _ = init_script(render(*GITOPS, namespace=NS))
    res = run_init(command, bad, tmp_path / "auth.conf")
    assert res.returncode == 1
    assert "Secret redis-pass key pw" in res.stderr and "A-Z a-z 0-9" in res.stderr
    assert not (tmp_path / "auth.conf").exists()


def test_the_init_container_line_is_what_redis_takes(tmp_path: Path) -> None:
    command, _ = init_script(render(*GITOPS, namespace=NS))
    password = "Az09._~-" + "x" * 24
    res = run_init(command, password, tmp_path / "auth.conf")
    assert res.returncode == 0, res.stderr
    conf = tmp_path / "auth.conf"
    assert conf.read_text() == f"requirepass {password}\n"
    assert conf.stat().st_mode & 0o077 == 0  # only Redis's own user reads it
    server = RedisServer(start=False, extra_args=["--include", str(conf)])
    try:
        server._spawn()
        anonymous = redis.Redis(host=server.host, port=server.port, socket_timeout=1)

        def refuses_anonymous() -> bool:
            try:
                anonymous.ping()
            except redis.AuthenticationError:
                return True
            except redis.ConnectionError:
                return False
            return False

        poll(refuses_anonymous, "redis-server up and asking for the password", timeout=20)
        authed = redis.Redis(host=server.host, port=server.port, password=password, socket_timeout=1)
        assert authed.ping() is True
        # the URL the operator's and the collector's environment builds from it
        url = f"redis://:{password}@{server.host}:{server.port}"
        assert redis.Redis.from_url(url, socket_timeout=1).ping() is True
    finally:
        server.close()
