"""Sluice end to end on the one-node cluster (issue #12 §3): ``helm install`` with the images
`make image` built, the example app of ``examples/`` injected and limited through its ClusterIP
Service, policies and keys edited live, Redis and the leading operator replica killed, a rollout
under load, the sidecars' metrics and the collector's API, and ``helm uninstall``.

One install for the module (tests/support/e2e_sluice.py); the tests run in file order, the
destructive ones last (Redis down, a Redis Pod killed, an operator replica killed, uninstall).
Limits are asserted the way README promises them: N sidecars sharing a limit admit no more than
``burst + rate × t`` over any interval t (within one token), so the bound uses an upper bound on
the time the requests spanned.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from support.e2e_sluice import (
    APP,
    EXAMPLE_KEY,
    RELEASE,
    SIDECAR,
    SIDECAR_PORT,
    SYSTEM_NS,
    Release,
    burst,
    component_pods,
    decision_counts,
    get,
    get_or_none,
    install,
    pod_ready,
    uninstall,
)
from support.http_calls import metric
from support.node import NodeSession, node_up
from support.polling import poll

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

# examples/policy.yaml's tiers as (burst, tokens per second)
FREE = (5, 5 / 10)  # 5 requests per 10 s (burst = requests)
FREE_PERIOD_S = 10
PRO = (20, 100 / 60)  # burst 20, 100 per minute
FIGURES: dict[str, Any] = {}  # printed at the end of the module (docs/real-node.md)


@pytest.fixture(scope="module")
def release(node_session: NodeSession) -> Iterator[Release]:
    node = node_up(node_session)
    rel = install(node)
    FIGURES["install_s"] = round(rel.timings["install"], 1)
    FIGURES["app_ready_s"] = round(rel.timings["app"], 1)
    yield rel
    print(f"\ne2e figures: {json.dumps(FIGURES)}")
    if rel.installed:
        uninstall(rel)
    for ns in (rel.shop, rel.bare):
        node.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _decisions(rel: Release) -> dict[str, Counter[str]]:
    """Each app Pod's sidecar decisions so far, by outcome (its /metrics)."""
    out: dict[str, Counter[str]] = {}
    for pod in rel.app_pods():
        name = pod["metadata"]["name"]
        out[name] = decision_counts(rel.sidecar_metrics(name))
    return out


def _split(before: dict[str, Counter[str]], after: dict[str, Counter[str]]) -> dict[str, dict[str, int]]:
    return {pod: dict(after[pod] - before.get(pod, Counter())) for pod in after}


def _policy_patch(rel: Release, spec: dict[str, Any]) -> None:
    """``kubectl patch`` of the example policy. Right after an operator Pod is deleted the API
    server's call to the validating webhook may still be routed to it (kube-proxy catching up):
    that refusal is retried, as a user would, for at most 30 s."""
    def patched() -> bool:
        res = rel.kubectl("patch", "rlp", "-n", rel.shop, APP, "--type=merge", "-p",
                          json.dumps({"spec": spec}), check=False)
        assert res.returncode == 0 or "failed calling webhook" in res.stderr, res.stderr
        return res.returncode == 0
    poll(patched, "the policy patch admitted", timeout=30, interval=0.5, diagnose=rel.brief)


def _pod_ip(pod: dict[str, Any]) -> str:
    return str(pod["status"]["podIP"])


def _quota(resp: Any, tier: str) -> str | None:
    """The ``q=N`` of ``tier`` in a RateLimit-Policy header, or None."""
    if resp is None:
        return None
    for item in resp.headers.get("ratelimit-policy", "").split(","):
        name, _, params = item.strip().partition(";")
        if name.strip('"') == tier:
            return dict(p.split("=", 1) for p in params.split(";") if "=" in p).get("q")
    return None


# (a) ------------------------------------------------------------------------------------------

def test_both_replicas_injected_and_running(release: Release) -> None:
    pods = release.app_pods()
    assert len(pods) == 2
    for pod in pods:
        spec, status = pod["spec"], pod["status"]
        # A native sidecar: the last init container, restartPolicy Always (Kubernetes ≥ 1.29).
        sidecar = spec["initContainers"][-1]
        assert sidecar["name"] == SIDECAR and sidecar["restartPolicy"] == "Always"
        init = {s["name"]: s for s in status["initContainerStatuses"]}[SIDECAR]
        assert "running" in init["state"] and init["ready"] and init["started"], init
        assert init["restartCount"] == 0
        app = {s["name"]: s for s in status["containerStatuses"]}["app"]
        assert "running" in app["state"] and app["ready"], app
        assert pod_ready(pod)
        # The Service's named targetPort now leads to the sidecar, which took the name `http`.
        ports = {p["name"]: p["containerPort"] for p in sidecar.get("ports", [])}
        assert ports.get("http") == SIDECAR_PORT, sidecar.get("ports")


# (b) ------------------------------------------------------------------------------------------

def _shared_limit(rel: Release, result: dict[str, Any], tier: tuple[float, float],
                  before: dict[str, Counter[str]]) -> dict[str, Any]:
    """Check a burst of one client against one bucket shared by both replicas: admitted within
    one token of ``burst + rate × t`` (t bounded above and below by the client's clock), both
    replicas decided, and the replicas' own counts add up to what the client saw."""
    burst, rate = tier  # (burst, tokens per second)
    split = _split(before, _decisions(rel))
    statuses = result["statuses"]
    admitted = statuses.count(200)
    upper = burst + rate * result["elapsed"]
    lower = burst + rate * result["inner"]
    figures = {"sent": len(statuses), "admitted": admitted, "upper_bound": round(upper, 2),
               "lower_bound": round(lower, 2), "t_s": round(result["elapsed"], 2),
               "per_replica": split}
    assert set(statuses) <= {200, 429}, statuses
    # Every request decided by the shared bucket in Redis (none failed open: a decision slower
    # than the sidecar's Redis timeout is let through, which the install's timeout prevents).
    assert {d for c in split.values() for d in c} <= {"allowed", "limited"}, split
    assert math.floor(lower) - 1 <= admitted <= upper + 1, figures
    assert all(sum(c.values()) > 0 for c in split.values()), split  # both replicas decided
    assert sum(c.get("allowed", 0) for c in split.values()) == admitted, split
    return figures


def test_per_client_limit_shared_across_replicas_from_a_pod(release: Release) -> None:
    """40 anonymous requests over ~2 s from a client Pod (a fresh IP) through the ClusterIP."""
    before = _decisions(release)
    result = release.pod_burst(APP, 40, pace=0.05)
    FIGURES["pod_anonymous"] = _shared_limit(release, result, FREE, before)


def test_key_tier_limit_shared_across_replicas_from_the_host(release: Release) -> None:
    """60 requests over ~2 s with the example key (tier pro: burst 20, 100/min) from the host."""
    before = _decisions(release)
    result = burst(release.service_ip(), 80, 60, headers={"X-API-Key": EXAMPLE_KEY}, pace=0.03)
    FIGURES["host_pro_key"] = _shared_limit(release, result, PRO, before)


def test_unknown_key_gets_the_default_tier_and_429_is_documented(release: Release) -> None:
    """A key the policy does not know is no identity: the client is its IP, tier free. Its
    429: problem+json, Retry-After = the RateLimit t, the draft's and the legacy headers."""
    ip = release.service_ip()
    headers = {"X-API-Key": "sk-" + uuid.uuid4().hex}
    replies = []
    for _ in range(FREE[0] + 3):
        replies.append(get(ip, 80, "/", headers))
        if replies[-1].status == 429:
            break
    ok = [r for r in replies if r.status == 200]
    assert ok and all(r.headers["ratelimit-policy"] == '"free";q=5;w=10' for r in ok), \
        [r.headers for r in replies]
    r = replies[-1]
    assert r.status == 429, [x.status for x in replies]
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["ratelimit-policy"] == '"free";q=5;w=10'
    retry = int(r.headers["retry-after"])
    assert 1 <= retry <= FREE_PERIOD_S
    assert r.headers["ratelimit"] == f'"free";r=0;t={retry}'
    assert r.headers["x-ratelimit-limit"] == "5" and r.headers["x-ratelimit-remaining"] == "0"
    body = r.json()
    assert body["status"] == 429 and body["title"] == "Too Many Requests"
    assert body["type"] == "https://sluice.dev/problems/rate-limited"
    assert (body["policy"], body["tier"]) == (APP, "free")
    assert EXAMPLE_KEY not in r.body.decode() and headers["X-API-Key"] not in r.body.decode()


# (c) ------------------------------------------------------------------------------------------

def test_kubectl_get_rlp_shows_programmed_and_enforced_by_both(release: Release) -> None:
    def columns() -> dict[str, str] | None:
        lines = release.kubectl("get", "rlp", "-n", release.shop, APP).stdout.splitlines()
        row = dict(zip(lines[0].split(), lines[1].split(), strict=False))
        return row if row.get("PROGRAMMED") == "True" and row.get("ENFORCED") == "2" else None

    poll(columns, "kubectl get rlp: PROGRAMMED True, ENFORCED 2", timeout=60)
    status = release.get_json("rlp", "-n", release.shop, APP)["status"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Accepted": "True", "Programmed": "True", "Enforced": "True"}
    assert status["enforcedSidecars"] == 2


def _edit_free_quota(release: Release, requests: int, what: str, timeout: float) -> None:
    """Set the `free` tier to ``requests``/10 s (keeping `pro` and the rollout's `bulk`) and wait
    until each sidecar, asked on its Pod IP, announces it."""
    _policy_patch(release, {"tiers": [
        {"name": "free", "requests": requests, "period": "10s"},
        {"name": "pro", "requests": 100, "period": "1m", "burst": 20},
        {"name": "bulk", "requests": 100000, "period": "1s"}]})
    for pod in release.app_pods():
        ip = _pod_ip(pod)
        poll(lambda ip=ip: _quota(get_or_none(ip, SIDECAR_PORT), "free") == str(requests),
             f"{pod['metadata']['name']} {what}", timeout=timeout, diagnose=release.brief)


def test_policy_edit_enforced_by_both_replicas(release: Release) -> None:
    """free 5/10 s → 7/10 s, and a tier `bulk` for the rollout test: each sidecar (asked on its
    Pod IP) announces the new quota within seconds, and ENFORCED comes back to 2."""
    t = time.monotonic()
    _edit_free_quota(release, 7, "to enforce free q=7", timeout=30)
    FIGURES["policy_edit_both_s"] = round(time.monotonic() - t, 2)
    poll(lambda: release.get_json("rlp", "-n", release.shop, APP)["status"]
         .get("enforcedSidecars") == 2, "ENFORCED = 2 after the edit", timeout=60)


def _key_secret(rel: Release, name: str, key: str, tier: str) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret",
              "metadata": {"name": name, "labels": {"sluice.dev/policy": APP}},
              "type": "Opaque", "stringData": {"key": key, "tier": tier}}
    rel.kubectl("apply", "-n", rel.shop, "-f", "-", input=json.dumps(secret))


def test_new_key_secret_works_and_a_revoked_one_stops(release: Release) -> None:
    key = "sk-e2e-" + uuid.uuid4().hex
    ip = release.service_ip()
    headers = {"X-API-Key": key}
    assert _quota(get(ip, 80, "/", headers), "pro") is None  # not a key yet: tier free
    _key_secret(release, "e2e-new-client", key, "pro")
    t = time.monotonic()
    poll(lambda: _quota(get_or_none(ip, 80, "/", headers), "pro") == "20",
         "the new key to get tier pro", timeout=30)
    FIGURES["new_key_s"] = round(time.monotonic() - t, 2)
    release.kubectl("delete", "secret", "-n", release.shop, "e2e-new-client")
    t = time.monotonic()
    # Revoked on every replica: several answers in a row (each connection picks a replica).
    poll(lambda: all(_quota(get_or_none(ip, 80, "/", headers), "free") for _ in range(4)),
         "the revoked key to fall back to tier free on both replicas", timeout=30)
    FIGURES["revoked_key_s"] = round(time.monotonic() - t, 2)


# (f) ------------------------------------------------------------------------------------------

def test_sidecar_metrics_through_the_api_server_proxy(release: Release) -> None:
    for pod in release.app_pods():
        text = release.sidecar_metrics(pod["metadata"]["name"])
        assert metric(text, "sluice_decisions_total", policy=APP) > 0


def test_usage_of_the_test_clients_in_the_collector_api(release: Release) -> None:
    """With a ServiceAccount token bound to the chart's viewer ClusterRole (the collector asks
    a TokenReview and a SubjectAccessReview), from the host to the collector's Service."""
    sa = "e2e-usage-viewer"
    release.kubectl("create", "serviceaccount", "-n", release.shop, sa)
    release.kubectl("create", "rolebinding", "-n", release.shop, sa,
                    f"--clusterrole={RELEASE}-usage-viewer",
                    f"--serviceaccount={release.shop}:{sa}")
    token = release.kubectl("create", "token", "-n", release.shop, sa).stdout.strip()
    ip = release.service_ip(f"{RELEASE}-analytics", SYSTEM_NS)
    client_ip = release.get_json("pod", "-n", release.shop, release.client_pod)["status"]["podIP"]
    now = int(time.time())
    path = f"/v1/top?namespace={release.shop}&start={now - 3600}&end={now + 600}"
    assert get(ip, 9092, path).status == 401  # no token

    def consumers() -> set[str] | None:
        r = get_or_none(ip, 9092, path, {"Authorization": f"Bearer {token}"})
        if r is None or r.status != 200:
            return None
        seen = {c["client"] for c in r.json()["consumers"]}
        wanted = {f"key:{release.shop}/hello-example-client", f"ip:{client_ip}"}
        return seen if wanted <= seen else None

    poll(consumers, "the example key's and the client Pod's usage in /v1/top", timeout=60)
    other = get(ip, 9092, "/v1/top?namespace=kube-system", {"Authorization": f"Bearer {token}"})
    assert other.status == 403  # bound in the app's namespace only


# (e) ------------------------------------------------------------------------------------------

def _web_pod(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                "name": "web", "image": "localhost/sluice-e2e-busybox:1",
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", "mkdir -p /tmp/w && echo hi >/tmp/w/index.html && "
                                        "exec httpd -f -p 8080 -h /tmp/w"],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}}]}}


def _ready_injected(rel: Release, namespace: str, name: str) -> dict[str, Any] | None:
    pod = rel.get_json("pod", "-n", namespace, name)
    injected = any(c["name"] == SIDECAR for c in pod["spec"].get("initContainers", []))
    return pod if injected and pod_ready(pod) else None


def test_pod_in_a_labelled_namespace_without_policy_becomes_ready(release: Release) -> None:
    release.kubectl("apply", "-n", release.bare, "-f", "-",
                    input=json.dumps(_web_pod("web", {"app": "web"})))
    pod = poll(lambda: _ready_injected(release, release.bare, "web"),
               "the injected Pod in a namespace without policy to be Ready", timeout=90,
               diagnose=release.brief)
    r = poll(lambda: get_or_none(_pod_ip(pod), SIDECAR_PORT), "its sidecar to answer")
    assert r.status == 200 and r.body == b"hi\n"
    assert "ratelimit" not in r.headers  # no policy: forwarded unlimited


def test_rollout_under_steady_load_answers_no_5xx(release: Release) -> None:
    key = "sk-e2e-bulk-" + uuid.uuid4().hex
    _key_secret(release, "e2e-bulk-client", key, "bulk")
    ip = release.service_ip()
    headers = {"X-API-Key": key}
    poll(lambda: _quota(get_or_none(ip, 80, "/", headers), "bulk"), "the bulk key", timeout=30)
    outcomes: Counter[str] = Counter()
    stop = threading.Event()
    deadline = time.monotonic() + 150  # the load loop is bounded whatever happens

    def load() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                outcomes[str(get(ip, 80, "/", headers).status)] += 1
            except OSError as exc:
                outcomes[type(exc).__name__] += 1

    workers = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for w in workers:
        w.start()
    old = {p["metadata"]["name"] for p in release.app_pods()}
    try:
        t = time.monotonic()
        release.kubectl("rollout", "restart", "-n", release.shop, f"deployment/{APP}")
        release.kubectl("rollout", "status", "-n", release.shop, f"deployment/{APP}",
                        "--timeout=120s", timeout=150)
        poll(lambda: not old & {p["metadata"]["name"] for p in release.get_json(
            "pods", "-n", release.shop, "-l", f"app={APP}")["items"]},
             "the old Pods to be gone", timeout=60)
        FIGURES["rollout_s"] = round(time.monotonic() - t, 1)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=10)
    FIGURES["rollout_load"] = dict(outcomes)
    assert outcomes["200"] > 50, outcomes
    assert set(outcomes) == {"200"}, outcomes  # no 5xx, no refused or reset connection


# (d) ------------------------------------------------------------------------------------------

def _exhausted_from_host(rel: Release) -> bool:
    """The host's anonymous bucket is refused now (enforcement works)."""
    ip = rel.service_ip()
    return any((r := get_or_none(ip, 80)) is not None and r.status == 429 for _ in range(10))


def test_redis_down_fails_open_and_a_new_pod_becomes_ready(release: Release) -> None:
    """failureMode: open: with Redis gone, requests pass, and a Pod created meanwhile (no config
    yet) becomes Ready (README's table); enforcement resumes when Redis is back."""
    assert _exhausted_from_host(release)
    release.kubectl("scale", "statefulset", "-n", SYSTEM_NS, f"{RELEASE}-redis", "--replicas=0")
    try:
        poll(lambda: not component_pods(release, "redis") and not release.get_json(
            "pods", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/component=redis")["items"],
             "the Redis Pod to be gone", timeout=60)
        ip = release.service_ip()
        # Far past the free limit (7 per 10 s), all admitted: the breaker's failure mode.
        statuses = [get(ip, 80).status for _ in range(20)]
        assert statuses == [200] * 20, statuses
        release.kubectl("apply", "-n", release.shop, "-f", "-",
                        input=json.dumps(_web_pod("during-outage", {"app": APP, "e2e": "outage"})))
        poll(lambda: _ready_injected(release, release.shop, "during-outage"),
             "a Pod created while Redis is down to be Ready (failureMode open)", timeout=90,
             diagnose=release.brief)
    finally:
        release.kubectl("scale", "statefulset", "-n", SYSTEM_NS, f"{RELEASE}-redis",
                        "--replicas=1")
    release.kubectl("wait", "-n", SYSTEM_NS, "--for=condition=Ready", "pod",
                    f"{RELEASE}-redis-0", "--timeout=90s", timeout=120)
    t = time.monotonic()
    poll(lambda: _exhausted_from_host(release), "enforcement to resume with Redis back",
         timeout=60, diagnose=release.brief)
    # The Pod born during the outage enforces too once the operator re-pushed the config.
    outage_ip = _pod_ip(release.get_json("pod", "-n", release.shop, "during-outage"))
    poll(lambda: _quota(get_or_none(outage_ip, SIDECAR_PORT), "free") == "7",
         "the Pod born during the outage to enforce the policy", timeout=60)
    FIGURES["redis_back_enforced_s"] = round(time.monotonic() - t, 1)
    release.kubectl("delete", "pod", "-n", release.shop, "during-outage", "--wait=false")


def test_killed_redis_pod_is_brought_back_and_enforcement_resumes(release: Release) -> None:
    old_uid = component_pods(release, "redis")[0]["metadata"]["uid"]
    release.kubectl("delete", "pod", "-n", SYSTEM_NS, f"{RELEASE}-redis-0", "--wait=false")
    poll(lambda: any(p["metadata"]["uid"] != old_uid and pod_ready(p)
                     for p in component_pods(release, "redis")),
         "the StatefulSet to bring Redis back", timeout=90, diagnose=release.brief)
    poll(lambda: _exhausted_from_host(release), "enforcement to resume", timeout=60,
         diagnose=release.brief)


def _leader(rel: Release) -> str:
    """The operator replica that reconciles: kopf's peering, highest priority (the oldest)."""
    peers = rel.get_json("clusterkopfpeering", RELEASE)["status"]
    return str(max(peers, key=lambda p: peers[p]["priority"]))


def test_killed_leading_operator_replica_is_taken_over(release: Release) -> None:
    leader = _leader(release)
    assert leader in {p["metadata"]["name"] for p in component_pods(release, "operator")}
    release.kubectl("delete", "pod", "-n", SYSTEM_NS, leader, "--wait=true", timeout=90)
    t = time.monotonic()
    _edit_free_quota(release, 6, "to enforce the edit made after the leader died", timeout=90)
    FIGURES["takeover_edit_s"] = round(time.monotonic() - t, 1)


# (g) ------------------------------------------------------------------------------------------

def test_helm_uninstall_leaves_nothing_and_namespaces_delete(release: Release) -> None:
    t = time.monotonic()
    res = uninstall(release)
    assert res.returncode == 0, res.stderr
    FIGURES["uninstall_s"] = round(time.monotonic() - t, 1)
    hooks = release.kubectl("get", "mutatingwebhookconfigurations,validatingwebhookconfigurations",
                            "-o", "name").stdout.split()
    assert [h for h in hooks if "sluice" in h] == []
    kinds = ("pods,services,deployments,statefulsets,secrets,configmaps,serviceaccounts,roles,"
             "rolebindings,networkpolicies,poddisruptionbudgets,persistentvolumeclaims")
    namespaces = (SYSTEM_NS, release.shop, release.bare)

    def left() -> list[str]:
        """What of the release is still there (Pods terminate, owned Secrets are collected)."""
        objects = release.kubectl("get", kinds, "-A", "-o", "name", "-l",
                                  f"app.kubernetes.io/instance={RELEASE}").stdout.split()
        for ns in namespaces:
            objects += [o for o in release.kubectl("get", "pods,secrets", "-n", ns, "-o",
                                                   "name").stdout.split()
                        if RELEASE in o.split("/", 1)[1]]
        cluster = release.kubectl("get", "clusterroles,clusterrolebindings,clusterkopfpeerings",
                                  "-o", "name").stdout.split()
        return objects + [c for c in cluster if c.split("/", 1)[1].startswith(RELEASE)]

    poll(lambda: not left(), "nothing of the release left after helm uninstall", timeout=60,
         diagnose=lambda: "\n".join(left()))
    FIGURES["uninstall_all_gone_s"] = round(time.monotonic() - t, 1)
    assert release.get_json("pods", "-n", SYSTEM_NS)["items"] == []
    crds = release.kubectl("get", "crd", "-o", "name").stdout
    assert "ratelimitpolicies.sluice.dev" in crds  # CRDs stay, as Helm does
    # Namespaces with policies (and the policies in them) go without an operator. Their Pods go
    # first: the namespace controller looks again only after the longest grace period of the
    # Pods it deleted (65 s, the injector's drain allowance), though they exit in seconds.
    release.kubectl("delete", "deployments,pods", "--all", "-n", release.shop, "--wait=true",
                    "--cascade=foreground", timeout=120)  # no new Pod from a ReplicaSet meanwhile
    assert release.kubectl("get", "rlp", "-n", release.shop, "-o", "name").stdout.strip()
    for ns in (release.shop, release.bare):
        release.kubectl("delete", "namespace", ns, "--wait=false")
    poll(lambda: not [ns for ns in (release.shop, release.bare) if release.kubectl(
        "get", "namespace", ns, check=False).returncode == 0],
         "the app namespaces to be deleted (none stuck Terminating)", timeout=90,
         diagnose=release.brief)
    FIGURES["namespaces_deleted_s"] = round(time.monotonic() - t, 1)
