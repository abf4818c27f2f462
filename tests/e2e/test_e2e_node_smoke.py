"""The one-node cluster works as a cluster: a Pod runs from a locally built image (no registry),
a ClusterIP Service answers from the host and from another Pod, and CoreDNS resolves Service
names. The ground every other e2e test stands on."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from support.node import Node, NodeSession, node_up
from support.polling import poll

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

IMAGE = "localhost/sluice-e2e-busybox:1"
SECURE = {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
          "capabilities": {"drop": ["ALL"]}}


def _pod(name: str, command: str, **extra: object) -> dict[str, object]:
    container: dict[str, object] = {
        "name": name, "image": IMAGE, "imagePullPolicy": "Never",
        "command": ["sh", "-c", command], "securityContext": SECURE, **extra}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"containers": [container], "terminationGracePeriodSeconds": 1}}


@dataclass
class Workload:
    node: Node
    namespace: str
    cluster_ip: str

    def exec(self, pod: str, *cmd: str) -> str:
        return self.node.kubectl("exec", "-n", self.namespace, pod, "--", *cmd).stdout

    def http_get(self, pod: str, host: str, port: int = 80) -> str:
        """The body of GET / from inside ``pod`` ('' when it does not answer). With busybox's
        nc: the wget of Debian's busybox-static 1.35 crashes (SIGSEGV) on any URL."""
        out = self.node.kubectl(
            "exec", "-n", self.namespace, pod, "--", "sh", "-c",
            f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port}", check=False).stdout
        head, _, body = out.replace("\r\n", "\n").partition("\n\n")
        return body if head.startswith("HTTP/1.") else ""


@pytest.fixture(scope="module")
def workload(node_session: NodeSession) -> Iterator[Workload]:
    """A web Pod (busybox httpd answering its own name) behind the Service 'web', and a client
    Pod, both Ready."""
    node = node_up(node_session)
    ns = node.make_namespace()
    web = _pod("web", "mkdir -p /tmp/www && hostname > /tmp/www/index.html && "
                      "exec httpd -f -p 8080 -h /tmp/www",
               ports=[{"containerPort": 8080}],
               readinessProbe={"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1})
    client = _pod("client", "exec sleep 3600")
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": {"app": "web"},
                        "ports": [{"port": 80, "targetPort": 8080}]}}
    items = {"apiVersion": "v1", "kind": "List", "items": [web, client, service]}
    node.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(items))
    node.kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/web", "pod/client",
                 "--timeout=120s", timeout=150)
    ip = node.kubectl("get", "-n", ns, "service", "web", "-o",
                      "jsonpath={.spec.clusterIP}").stdout
    yield Workload(node, ns, ip)
    node.kubectl("delete", "namespace", ns, "--wait=false")


def test_pod_runs_from_a_locally_built_image(workload: Workload) -> None:
    pod = json.loads(workload.node.kubectl("get", "-n", workload.namespace, "pod", "web",
                                           "-o", "json").stdout)
    status = pod["status"]["containerStatuses"][0]
    assert status["image"] == IMAGE
    assert "running" in status["state"] and status["ready"] is True
    assert status["restartCount"] == 0
    assert pod["spec"]["nodeName"] == workload.node.env["NODE_NAME"]
    assert pod["status"]["podIP"].startswith(workload.node.env["POD_SUBNET"].rsplit(".", 1)[0])


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return ""


def test_cluster_ip_service_answers_from_the_host(workload: Workload) -> None:
    # kube-proxy programs the Service's iptables rules within a sync period: poll.
    body = poll(lambda: _get(f"http://{workload.cluster_ip}/"), "the ClusterIP from the host",
                timeout=30)
    assert body == "web\n"


def test_cluster_ip_service_answers_from_another_pod(workload: Workload) -> None:
    body = poll(lambda: workload.http_get("client", workload.cluster_ip),
                "the ClusterIP from the client Pod", timeout=30)
    assert body == "web\n"


def test_dns_resolves_service_names(workload: Workload) -> None:
    fqdn = f"web.{workload.namespace}.svc.cluster.local"
    out = workload.exec("client", "nslookup", fqdn)
    assert workload.cluster_ip in out, out
    # The short name through the Pod's search path, and the API server's own Service.
    assert workload.http_get("client", "web") == "web\n"
    assert "10.0.0.1" in workload.exec("client", "nslookup", "kubernetes.default.svc.cluster.local")
