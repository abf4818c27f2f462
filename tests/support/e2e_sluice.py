"""Sluice installed on the one-node cluster (tests/support/node.py) the way a user installs it:
``helm install`` of charts/sluice with the images `make image` built (imported by
hack/node/up.sh, ``imagePullPolicy: Never``), then the example app of ``examples/``.

:func:`install` brings the release up and fails (never skips) naming what is missing: an image
not imported, a Pod not Ready (with ``kubectl describe`` and the logs of Sluice's Pods).
:class:`Release` is what the e2e tests drive: requests from the host (``get``) and from a
client Pod (``pod_requests``), the sidecars' metrics through the API server's Pod proxy, and a
diagnosis for failures.
"""

from __future__ import annotations

import http.client as httpclient
import inspect
import json
import subprocess
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.chart import CHART, helm
from support.node import Node
from support.paths import ROOT
from support.polling import poll

RELEASE = "sluice"
SYSTEM_NS = "sluice-system"
IMAGES = ("docker.io/library/sluice:0.1.0", "docker.io/library/sluice-redis:0.1.0")
APP = "hello"
SIDECAR = "sluice-sidecar"
SIDECAR_PORT = 15080
ADMIN_PORT = 15090
EXAMPLE_KEY = "sk-example-not-a-secret-0123456789abcdef"  # examples/key-secret.yaml (public)
CLIENT_IMAGE = "sluice:0.1.0"  # its python3 is the client Pod's HTTP client
INSTALL_TIMEOUT = 240.0


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def get(host: str, port: int, path: str = "/", headers: Mapping[str, str] | None = None,
         timeout: float = 5.0) -> Response:
    """One request on a new connection (kube-proxy picks a backend per connection)."""
    conn = httpclient.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close", **(headers or {})})
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def get_or_none(host: str, port: int, path: str = "/",
                 headers: Mapping[str, str] | None = None) -> Response | None:
    try:
        return get(host, port, path, headers, timeout=3.0)
    except OSError:
        return None


def burst(host: str, port: int, count: int, path: str = "/",
          headers: dict[str, str] | None = None, pace: float = 0.0) -> dict[str, Any]:
    """``count`` requests one after the other, each on a new connection, ``pace`` seconds apart
    (so that the buckets refill during the burst): their statuses (0: no
    answer), ``elapsed`` (from the first send to the last answer: an upper bound on the time
    the decisions spanned) and ``inner`` (from the first answer to the last send: a lower
    bound). Self-contained: the client Pod runs this function's source too."""
    import http.client
    import time
    statuses = []
    t0 = first = last = time.monotonic()
    for i in range(count):
        last = time.monotonic()
        conn = http.client.HTTPConnection(host, port, timeout=5)
        try:
            conn.request("GET", path, headers={"Connection": "close", **(headers or {})})
            statuses.append(conn.getresponse().status)
        except OSError:
            statuses.append(0)
        finally:
            conn.close()
        if i == 0:
            first = time.monotonic()
        time.sleep(pace)  # pacing the load, not waiting for anything
    return {"statuses": statuses, "elapsed": time.monotonic() - t0,
            "inner": max(0.0, last - first)}


# The long diagnosis of an install that failed, for tests/e2e/conftest.py to report once (a
# module fixture's failure is re-raised for each of the module's tests).
FAILURE_DETAILS: list[str] = []


def _pod_state(pod: Mapping[str, Any]) -> str:
    status = pod.get("status", {})
    statuses = [*status.get("initContainerStatuses", []), *status.get("containerStatuses", [])]
    parts = [status.get("phase", "?"),
             f"ready {sum(bool(c.get('ready')) for c in statuses)}/{len(statuses)}",
             f"restarts {sum(int(c.get('restartCount', 0)) for c in statuses)}"]
    for c in statuses:
        waiting = c.get("state", {}).get("waiting")
        ended = c.get("lastState", {}).get("terminated")
        if waiting:
            parts.append(f"{c['name']} waiting: {waiting.get('reason')} "
                         f"{waiting.get('message', '')[:120]}".rstrip())
        if ended:
            parts.append(f"{c['name']} last ended: {ended.get('reason')} "
                         f"(exit {ended.get('exitCode')})")
    for cond in status.get("conditions", []):
        if cond.get("status") != "True" and cond.get("message"):
            parts.append(f"{cond['type']}: {cond['message'][:120]}")
    return ", ".join(parts)


def decision_counts(text: str) -> Counter[str]:
    """A sidecar's ``sluice_decisions_total`` by outcome (allowed, limited, failed_open, ...)."""
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "sluice_decisions_total":
                counts[s.labels["decision"]] += int(s.value)
    return counts


@dataclass
class Release:
    node: Node
    shop: str  # labelled namespace holding the example app, its policy and key
    bare: str  # labelled namespace without a policy
    installed: bool = True
    timings: dict[str, float] = field(default_factory=dict)
    client_pod: str = "client"

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.node.kubectl(*args, **kw)

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def app_pods(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """The example app's Pods that are not terminating, oldest first."""
        items = self.get_json("pods", "-n", namespace or self.shop, "-l", f"app={APP}")["items"]
        live = [p for p in items if not p["metadata"].get("deletionTimestamp")]
        return sorted(live, key=lambda p: p["metadata"]["creationTimestamp"])

    def service_ip(self, name: str = APP, namespace: str | None = None) -> str:
        return str(self.get_json("service", "-n", namespace or self.shop, name)["spec"]["clusterIP"])

    def sidecar_metrics(self, pod: str, namespace: str | None = None) -> str:
        """The sidecar's /metrics through the API server's Pod proxy (as Prometheus would)."""
        path = f"/api/v1/namespaces/{namespace or self.shop}/pods/{pod}:{ADMIN_PORT}/proxy/metrics"
        return self.kubectl("get", "--raw", path).stdout

    def pod_burst(self, host: str, count: int, pace: float, port: int = 80) -> dict[str, Any]:
        """:func:`burst` run in the client Pod (Python from the Sluice image: its own clock, its
        own IP as the client). Busybox's nc cannot be the client: it half-closes after the
        request, and the sidecar (like nginx) takes a half-close for a client gone and drops the
        proxied answer."""
        script = (f"from typing import Any\n{inspect.getsource(burst)}\nimport json\n"
                  f"print(json.dumps(burst({host!r}, {port}, {count}, pace={pace!r})))")
        out = self.kubectl("exec", "-n", self.shop, self.client_pod, "--", "python3", "-c",
                           script, timeout=120).stdout
        return dict(json.loads(out))

    def brief(self) -> str:
        """A few lines that say what is wrong: the newest Warning events, then each Pod of
        Sluice's and the app's that is not Ready (phase, ready containers, restarts, why a
        container waits or last ended), then how many are Ready. It goes into the failure's
        headline, of which CI's short summary keeps 12 lines (``diagnose`` is the long form)."""
        lines = []
        res = self.kubectl("get", "events", "-A", "--field-selector", "type=Warning", "-o", "json",
                           check=False)
        if res.returncode == 0:
            events = sorted(json.loads(res.stdout)["items"],
                            key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
            for e in events[-4:]:
                obj = e.get("involvedObject", {})
                lines.append(f"event {obj.get('namespace', '')}/{obj.get('name', '')}: "
                             f"{e.get('reason')} x{e.get('count') or 1}: {e.get('message', '')[:200]}")
        ready = 0
        for ns in (SYSTEM_NS, self.shop, self.bare):
            res = self.kubectl("get", "pods", "-n", ns, "-o", "json", check=False)
            if res.returncode != 0:
                lines.append(f"{ns}: kubectl get pods failed: {res.stderr.strip()[:200]}")
                continue
            for pod in json.loads(res.stdout)["items"]:
                if pod_ready(pod):
                    ready += 1
                else:
                    lines.append(f"{ns}/{pod['metadata']['name']}: {_pod_state(pod)}")
        lines.append(f"{ready} other Pod(s) Ready")
        return "\n".join(lines)

    def fail(self, headline: str) -> NoReturn:
        """Fail with ``headline`` and :meth:`brief` as the message (what CI's summary shows) and
        the whole :meth:`diagnose` in the report (tests/e2e/conftest.py adds it once)."""
        FAILURE_DETAILS.append(self.diagnose())
        pytest.fail(f"{headline.strip()}\n{self.brief()}", pytrace=False)

    def diagnose(self) -> str:
        """``kubectl get``/``describe`` and the logs of Sluice's Pods and the app's."""
        parts = []
        for ns in (SYSTEM_NS, self.shop, self.bare):
            for args in (("get", "pods,events", "-n", ns, "-o", "wide"),
                         ("describe", "pods", "-n", ns)):
                parts.append(f"$ kubectl {' '.join(args)}\n"
                             + self.kubectl(*args, check=False).stdout[-6000:])
            pods = self.kubectl("get", "pods", "-n", ns, "-o", "name", check=False).stdout.split()
            for pod in pods:
                logs = self.kubectl("logs", "-n", ns, pod, "--all-containers", "--tail=40",
                                    "--prefix", check=False)
                parts.append(f"$ kubectl logs -n {ns} {pod}\n{logs.stdout}{logs.stderr}")
        return "\n".join(parts)


def _missing_images(node: Node) -> list[str]:
    out = subprocess.run(["ctr", "--address", str(node.dir / "run/containerd/containerd.sock"),
                          "-n", "k8s.io", "images", "ls", "-q"], capture_output=True, text=True,
                         check=False).stdout.split()
    return [i for i in IMAGES if i not in out]


def _helm_node(node: Node, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return helm(*args, f"--kubeconfig={node.kubeconfig}", check=check)


def install_values(shop: str, bare: str) -> list[str]:
    """The chart's values for a cluster without a registry or a volume provisioner."""
    return [
        "--set", "image.repository=sluice", "--set", "image.tag=0.1.0",
        "--set", "image.pullPolicy=Never",
        "--set", "redis.image.repository=sluice-redis", "--set", "redis.image.tag=0.1.0",
        "--set", "redis.image.pullPolicy=Never", "--set", "sidecar.imagePullPolicy=Never",
        "--set", "analytics.persistence.enabled=false",
        "--set", f"sidecar.redisSecret.namespaces={{{shop},{bare}}}",
        # A resync re-pushes what a restarted (empty) Redis lost: the tests wait for it.
        "--set", "operator.resyncIntervalSeconds=5",
        # A decision slower than the sidecar's Redis timeout fails open (50 ms by default): on
        # two cores shared with other test sessions Redis is sometimes slower, and the tests
        # count exactly what the shared bucket admits.
        "--set", "sidecar.redisTimeoutMs=1000",
        # Usage windows of 1 s so the collector sees the tests' clients within seconds.
        "--set", "sidecar.usage.windowSeconds=1",
    ]


def install(node: Node) -> Release:
    """helm install + the example app in a labelled namespace, everything Ready; or fail with
    what is missing and the Pods' state and logs."""
    missing = _missing_images(node)
    if missing:
        pytest.fail(f"images not in the node's containerd: {missing}; hack/node/up.sh imports "
                    f"~/.cache/sluice/images/sluice.oci.tar and sluice-redis.oci.tar: run "
                    f"`make image` (hack/image/build.sh) before the e2e tests", pytrace=False)
    shop, bare = (node.make_namespace() for _ in range(2))
    for ns in (shop, bare):
        node.kubectl("label", "namespace", ns, "sluice.dev/inject=true")
    release = Release(node, shop, bare)
    t = time.monotonic()
    res = _helm_node(node, "install", RELEASE, str(CHART), "-n", SYSTEM_NS, "--create-namespace",
                     *install_values(shop, bare), "--wait", f"--timeout={INSTALL_TIMEOUT:.0f}s",
                     check=False)
    if res.returncode != 0:
        release.fail(f"helm install failed ({res.returncode}): {res.stderr}")
    # helm --wait covers the Deployments and the StatefulSet; say which Pod is not Ready.
    for selector in ("app.kubernetes.io/component=operator", "app.kubernetes.io/component=redis",
                     "app.kubernetes.io/component=analytics"):
        waited = node.kubectl("wait", "-n", SYSTEM_NS, "--for=condition=Ready", "pod",
                              "-l", selector, "--timeout=120s", check=False, timeout=150)
        if waited.returncode != 0:
            release.fail(f"{selector} not Ready: {waited.stderr}")
    release.timings["install"] = time.monotonic() - t
    t = time.monotonic()
    node.kubectl("apply", "-n", shop, "-f", str(ROOT / "examples"))
    client = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": release.client_pod},
              "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                  "name": "client", "image": CLIENT_IMAGE, "imagePullPolicy": "Never",
                  "command": ["python3", "-c", "import time; time.sleep(3600)"]}]}}
    node.kubectl("apply", "-n", shop, "-f", "-", input=json.dumps(client))
    done = node.kubectl("rollout", "status", "-n", shop, f"deployment/{APP}", "--timeout=120s",
                        check=False, timeout=150)
    ready = node.kubectl("wait", "-n", shop, "--for=condition=Ready", f"pod/{release.client_pod}",
                         "--timeout=60s", check=False, timeout=90)
    if done.returncode or ready.returncode:
        release.fail(f"the example app did not come up: {done.stderr}{ready.stderr}")
    _wait_service_forwards(release)
    release.timings["app"] = time.monotonic() - t
    return release


# A TCP connection through the ClusterIP and closed without a request: no token is taken.
_CONNECT = """
import socket, sys, time
end = time.monotonic() + {timeout}
while True:
    try:
        socket.create_connection(({ip!r}, 80), timeout=1).close()
        sys.exit(0)
    except OSError:
        if time.monotonic() > end:
            sys.exit(1)
        time.sleep(0.1)
"""


def _wait_service_forwards(release: Release, timeout: float = 60.0) -> None:
    """Until the app's EndpointSlice lists both replicas ready and a connection from the client
    Pod through the ClusterIP is accepted: Pods Ready is not yet kube-proxy's rules (a burst sent
    right after the rollout once got no answer at all)."""
    def both_ready() -> bool:
        slices = release.get_json("endpointslices", "-n", release.shop, "-l",
                                  f"kubernetes.io/service-name={APP}")["items"]
        return sum(bool(e.get("conditions", {}).get("ready")) for s in slices
                   for e in s.get("endpoints") or []) == 2
    try:
        poll(both_ready, "the app's EndpointSlice to list both replicas ready", timeout)
    except AssertionError as exc:
        release.fail(str(exc))
    res = release.kubectl("exec", "-n", release.shop, release.client_pod, "--", "python3", "-c",
                          _CONNECT.format(ip=release.service_ip(), timeout=timeout), check=False,
                          timeout=timeout + 30)
    if res.returncode != 0:
        release.fail(f"no connection through the app's ClusterIP from the client Pod within "
                     f"{timeout:.0f}s: {res.stderr}")


def uninstall(release: Release) -> subprocess.CompletedProcess[str]:
    release.installed = False
    return _helm_node(release.node, "uninstall", RELEASE, "-n", SYSTEM_NS, "--wait",
                      "--timeout=120s", check=False)


def component_pods(release: Release, component: str) -> list[dict[str, Any]]:
    items = release.get_json("pods", "-n", SYSTEM_NS, "-l",
                             f"app.kubernetes.io/component={component}")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def pod_ready(pod: Mapping[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in pod.get("status", {}).get("conditions", []))
