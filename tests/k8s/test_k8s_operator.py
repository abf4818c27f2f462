"""The operator (kopf) against a real kube-apiserver (tests/support/control_plane.py) and a real
Redis: what a user sees with ``kubectl``.

- Policy lifecycle: ``kubectl apply`` -> config in Redis, status conditions, the PROGRAMMED printer
  column, the ``sluice.dev/config`` finalizer; ``kubectl delete`` -> config removed, object gone.
- Without webhooks, a policy the CRD admits but the parser refuses is stored; the operator keeps
  the last good config, says why in ``Accepted=False`` and posts a Warning Event.
- With the webhooks registered (URL client config to the operator on loopback, CA bundle of its
  self-signed certificate), the API server calls them: ``kubectl apply`` of a bad policy is refused
  with the parser's message, a suspicious one is admitted with warnings, and Pods created by the
  real controller-manager from a labelled Deployment carry the injected sidecar.

The operator only serves namespaces named ``sluice-op-*`` (kopf namespace patterns), so policies
of other test files in the same session are left alone. The webhook configurations are
cluster-wide (the validating one with ``failurePolicy: Fail``): they are deleted at teardown,
before the operator stops, or every later policy write in the session would be refused.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from sluice_operator.handlers import FINALIZER
from sluice_operator.injection.names import INJECTED_ANNOTATION, SIDECAR_NAME
from sluice_operator.webhook_config import MUTATING_NAME, VALIDATING_NAME, Endpoint
from support.control_plane import ControlPlane, table
from support.crds import apply_crds
from support.examples import expectation
from support.operator_thread import Operator, running_operator
from support.paths import ROOT
from support.polling import poll
from support.redis_servers import pick_port
from support.sluice_objects import (
    condition,
    delete_webhook_configurations,
    programmed,
    served_namespace,
)

pytestmark = pytest.mark.k8s

CRD_DIR = ROOT / "crds"
BAD_REGEX = CRD_DIR / "examples" / "bad" / "bad-regex.yaml"
NS_PREFIX = "sluice-op"


def policy_yaml(name: str, ns: str, *, requests: int = 10, mode: str = "enforce") -> str:
    return yaml.safe_dump({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"mode": mode, "selector": {"matchLabels": {"app": "demo"}},
                 "tiers": [{"name": "free", "requests": requests, "period": "1m"}],
                 "rules": [{"name": "search", "match": {"path": {"prefix": "/search"}},
                            "cost": 2}]},
    })


@pytest.fixture(scope="module")
def k8s(control_plane: ControlPlane) -> ControlPlane:
    """The control plane with the CRDs applied and Established."""
    return apply_crds(control_plane)


@pytest.fixture
def namespace(k8s: ControlPlane) -> Iterator[str]:
    """A namespace the operator serves. Its policies are deleted while the operator still runs
    (so their finalizers are removed), then the namespace goes, without waiting."""
    with served_namespace(k8s, NS_PREFIX) as ns:
        yield ns


@pytest.fixture(scope="class")
def operator(k8s: ControlPlane, redis_server: Any) -> Iterator[Operator]:
    """The operator without webhooks."""
    with running_operator(k8s, redis_server, f"{NS_PREFIX}-*") as op:
        yield op


@pytest.fixture(scope="class")
def webhook_operator(k8s: ControlPlane, redis_server: Any,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """The operator serving its webhooks on 127.0.0.1 and registering them with the API server."""
    port = pick_port()
    try:
        with running_operator(
                k8s, redis_server, f"{NS_PREFIX}-*", webhook_listen=f"127.0.0.1:{port}",
                webhook_endpoint=Endpoint(url=f"https://127.0.0.1:{port}"),
                webhook_dns_names=("localhost",), webhook_ips=("127.0.0.1",),
                webhook_cert_dir=str(tmp_path_factory.mktemp("webhook-certs")),
                webhook_provided_cert_dir=None) as op:
            poll(lambda: k8s.kubectl("get", "validatingwebhookconfiguration", VALIDATING_NAME,
                                     check=False).returncode == 0, "validating configuration")
            poll(lambda: k8s.kubectl("get", "mutatingwebhookconfiguration", MUTATING_NAME,
                                     check=False).returncode == 0, "mutating configuration")
            wait_webhooks_active(k8s)
            try:
                yield op
            finally:  # before the operator stops: a Fail webhook nobody serves blocks policies
                delete_webhook_configurations(k8s)
    finally:  # also when start-up failed after the configurations were written
        delete_webhook_configurations(k8s, check=False)


def wait_webhooks_active(cp: ControlPlane) -> None:
    """The API server picks webhook configurations up from an informer, a moment after they
    are written. Server-side dry runs (admission runs, nothing is stored) in ``default`` show
    when it calls both: the bad example is refused with the parser's message, a labelled pod
    comes back with the sidecar."""
    expected = expectation(BAD_REGEX)

    def validating() -> bool:
        res = cp.kubectl("create", "--dry-run=server", "-n", "default", "-f", str(BAD_REGEX),
                         check=False)
        return res.returncode != 0 and expected in res.stderr

    def mutating() -> bool:
        pod = yaml.safe_load(deployment("probe", "default", inject=True))["spec"]["template"]
        pod.update(apiVersion="v1", kind="Pod")
        pod["metadata"]["name"] = "sluice-webhook-probe"
        res = cp.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-",
                         input=json.dumps(pod), check=False)
        return res.returncode == 0 and any(
            c["name"] == SIDECAR_NAME for c in json.loads(res.stdout)["spec"].get("initContainers", []))

    poll(validating, "the API server calling the validating webhook")
    poll(mutating, "the API server calling the mutating webhook")


def wait_programmed(op: Operator, ns: str, name: str) -> dict[str, Any]:
    return dict(poll(lambda: programmed(op.cp, "rlp", name, ns),
                     f"rlp {ns}/{name} Programmed=True"))


# ---------------------------------------------------------------------------------------------
# without webhooks


class TestWithoutWebhooks:
    def test_policy_lifecycle(self, operator: Operator, namespace: str) -> None:
        ns, cp = namespace, operator.cp
        res = cp.kubectl("apply", "-f", "-", input=policy_yaml("api", ns))
        assert "created" in res.stdout, res

        cfg = poll(lambda: operator.config(ns), "config in Redis")
        assert [p.name for p in cfg.policies] == ["api"]
        assert cfg.policies[0].tiers["free"].limit.requests == 10

        obj = wait_programmed(operator, ns, "api")
        accepted = condition(obj, "Accepted")
        assert accepted is not None and accepted["status"] == "True", obj["status"]
        assert obj["status"]["configVersion"] == operator.config(ns).version
        assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"] == 1
        # no finalizer: one that outlives the operator (helm uninstall) leaves policies stuck
        assert FINALIZER not in (obj["metadata"].get("finalizers") or [])

        rows = {r["NAME"]: r for r in table(cp.kubectl("get", "rlp", "-n", ns).stdout)}
        assert rows["api"]["PROGRAMMED"] == "True", rows
        assert rows["api"]["MODE"] == "enforce", rows
        assert rows["api"]["TIERS"] == "1", rows

        # an update that the parser accepts: a new version, the new limit
        cp.kubectl("apply", "-f", "-", input=policy_yaml("api", ns, requests=20))
        cfg2 = poll(lambda: (c := operator.config(ns)) and c.version > cfg.version and c,
                    "new config version")
        assert cfg2.policies[0].tiers["free"].limit.requests == 20

        # delete: gone at once; the operator takes it out of Redis from the watch event
        res = cp.kubectl("delete", "rlp", "api", "-n", ns, "--timeout=30s")
        assert "deleted" in res.stdout, res
        assert operator.rlp(ns, "api") is None
        poll(lambda: (c := operator.config(ns)) is not None and not c.policies,
             "an empty config (sidecars stop limiting) in Redis")

    def test_invalid_update_keeps_last_good_config_and_posts_event(
            self, operator: Operator, namespace: str) -> None:
        ns, cp = namespace, operator.cp
        cp.kubectl("apply", "-f", "-", input=policy_yaml("bad-regex", ns))
        wait_programmed(operator, ns, "bad-regex")
        good = operator.config(ns)
        assert good is not None

        # the CRD admits it (only the parser/webhook can refuse a Python regex), no webhook runs
        res = cp.kubectl("apply", "-n", ns, "-f", str(BAD_REGEX))
        assert "configured" in res.stdout, res
        stored = operator.rlp(ns, "bad-regex")
        assert stored is not None and stored["metadata"]["generation"] == 2
        assert stored["spec"]["rules"][0]["match"]["path"] == {"regex": "/search/(["}

        expected = expectation(BAD_REGEX)

        def refused() -> dict[str, Any] | None:
            cond = condition(operator.rlp(ns, "bad-regex") or {}, "Accepted")
            return cond if cond and cond["status"] == "False" else None

        accepted = poll(refused, "Accepted=False")
        assert expected in accepted["message"], accepted
        assert "last good version keeps serving" in accepted["message"], accepted
        assert accepted["observedGeneration"] == 2

        still = operator.config(ns)
        assert still.version == good.version  # nothing was written
        assert still.policies[0].rules[0].path.prefix == "/search"
        obj = operator.rlp(ns, "bad-regex")
        assert obj is not None
        programmed = condition(obj, "Programmed")
        assert programmed is not None and programmed["status"] == "True", obj["status"]
        assert obj["status"]["observedGeneration"] == 1  # the generation that is serving

        def event() -> dict[str, Any] | None:
            events = cp.kubectl_json("get", "events", "-n", ns)["items"]
            return next((e for e in events if e.get("reason") == "InvalidPolicy"
                         and e["involvedObject"]["name"] == "bad-regex"), None)

        ev = poll(event, "InvalidPolicy Event")
        assert ev["type"] == "Warning"
        assert ev["involvedObject"]["kind"] == "RateLimitPolicy"
        assert expected in ev["message"], ev
        out = cp.kubectl("get", "events", "-n", ns).stdout
        assert "InvalidPolicy" in out and expected in out, out


# ---------------------------------------------------------------------------------------------
# with webhooks registered with the API server


class TestWithWebhooks:
    def test_bad_policy_refused_by_the_api_server(self, webhook_operator: Operator,
                                                  namespace: str) -> None:
        ns, cp = namespace, webhook_operator.cp
        res = cp.kubectl("apply", "-n", ns, "-f", str(BAD_REGEX), check=False)
        assert res.returncode != 0, res
        # kubectl prints the webhook's Status (422, with causes) as it prints a schema error;
        # the CRD alone admits this object (TestWithoutWebhooks), so the webhook refused it
        assert f'The RateLimitPolicy "bad-regex" is invalid: {expectation(BAD_REGEX)}' in res.stderr, res
        assert webhook_operator.rlp(ns, "bad-regex") is None  # never stored

    def test_good_policy_admitted_with_warnings(self, webhook_operator: Operator,
                                                namespace: str) -> None:
        ns, cp = namespace, webhook_operator.cp
        res = cp.kubectl("apply", "-f", "-", input=policy_yaml("quiet", ns))
        assert "created" in res.stdout, res
        assert "Warning:" not in res.stderr, res

        res = cp.kubectl("apply", "-f", "-", input=policy_yaml("watcher", ns, mode="shadow"))
        assert "created" in res.stdout, res
        assert "Warning: spec.mode: shadow never refuses a request" in res.stderr, res

        obj = wait_programmed(webhook_operator, ns, "watcher")
        assert obj["spec"]["mode"] == "shadow"
        cfg = webhook_operator.config(ns)
        assert {p.name for p in cfg.policies} == {"quiet", "watcher"}

        # an update to something invalid is refused as well: the stored spec stays
        res = cp.kubectl("apply", "-f", "-", check=False,
                         input=policy_yaml("quiet", ns).replace("prefix: /search", "regex: '/a/(['"))
        assert res.returncode != 0, res
        assert 'The RateLimitPolicy "quiet" is invalid: spec.rules[0].match.path.regex: is not a valid' \
            in res.stderr, res
        stored = webhook_operator.rlp(ns, "quiet")
        assert stored is not None
        assert stored["spec"]["rules"][0]["match"]["path"] == {"prefix": "/search"}

    def test_sidecar_injected_into_pods_of_a_labelled_deployment(
            self, webhook_operator: Operator, namespace: str) -> None:
        ns, cp = namespace, webhook_operator.cp
        cp.kubectl("apply", "-f", "-", input=deployment("web", ns, inject=True))
        cp.kubectl("apply", "-f", "-", input=deployment("plain", ns, inject=False))

        def pods(app: str) -> list[dict[str, Any]]:
            return list(cp.kubectl_json("get", "pods", "-n", ns, "-l", f"app={app}")["items"])

        injected = poll(lambda: len(p := pods("web")) == 2 and p, "2 Pods of web")
        for pod in injected:
            spec = pod["spec"]
            # a native sidecar (the suite's API server is 1.34): started before the app, stopped after
            assert [c["name"] for c in spec["containers"]] == ["app"]
            assert [c["name"] for c in spec["initContainers"]] == [SIDECAR_NAME]
            assert pod["metadata"]["annotations"].get(INJECTED_ANNOTATION) == "true", pod["metadata"]
            app = spec["containers"][0]
            sidecar = spec["initContainers"][0]
            assert sidecar["restartPolicy"] == "Always"
            # the app stops only after the sidecar drained (GET /drain with this pod's token)
            hook = app["lifecycle"]["preStop"]["httpGet"]
            env = {e["name"]: e.get("value") for e in sidecar["env"]}
            assert (hook["path"], hook["port"]) == ("/drain", webhook_operator.settings.injection.admin_port)
            assert hook["httpHeaders"] == [{"name": "X-Sluice-Drain-Token", "value": env["SLUICE_DRAIN_TOKEN"]}]
            # no policy in this namespace: "no policy here" is ready at once, forwarding, counted
            assert env["SLUICE_WITHOUT_CONFIG"] == "unlimited"
            app_ports = {p["containerPort"]: p.get("name") for p in app["ports"]}
            assert app_ports == {8080: "http-app"}, app_ports  # renamed: the sidecar has "http"
            sidecar_ports = {p.get("name"): p["containerPort"] for p in sidecar["ports"]}
            assert sidecar_ports["http"] == webhook_operator.settings.injection.sidecar_port
            assert sidecar_ports["http"] != 8080, sidecar_ports
            assert app["readinessProbe"]["httpGet"]["port"] == 8080, app["readinessProbe"]
            assert pod["status"]["phase"] == "Pending"  # no scheduler, no kubelet
            owner = pod["metadata"]["ownerReferences"][0]
            assert owner["kind"] == "ReplicaSet" and owner["name"].startswith("web-")

        plain = poll(lambda: len(p := pods("plain")) == 1 and p, "1 Pod of plain")
        spec = plain[0]["spec"]
        assert [c["name"] for c in spec["containers"]] == ["app"]
        assert spec["containers"][0]["ports"][0]["name"] == "http"
        assert spec["containers"][0]["readinessProbe"]["httpGet"]["port"] == "http"
        assert INJECTED_ANNOTATION not in (plain[0]["metadata"].get("annotations") or {})

    def test_before_its_first_config_a_sidecar_follows_the_failure_mode_of_its_policies(
            self, webhook_operator: Operator, namespace: str) -> None:
        """Redis down at its start, or the operator not there yet: fail open (or no policy
        selects the pod) is Ready at once and forwards; fail closed waits (#12, defects 1, 2)."""
        ns, cp = namespace, webhook_operator.cp
        for name, mode in (("guarded", "closed"), ("lenient", "open")):
            cp.kubectl("apply", "-f", "-", input=yaml.safe_dump({
                "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"failureMode": mode, "selector": {"matchLabels": {"app": name}},
                         "tiers": [{"name": "free", "requests": 10, "period": "1m"}]}}))
        for name in ("guarded", "lenient", "unselected"):
            cp.kubectl("apply", "-f", "-", input=deployment(name, ns, inject=True, replicas=1))

        def without_config(app: str) -> str | None:
            items = cp.kubectl_json("get", "pods", "-n", ns, "-l", f"app={app}")["items"]
            if not items:
                return None
            (side,) = items[0]["spec"]["initContainers"]
            return str({e["name"]: e.get("value") for e in side["env"]}["SLUICE_WITHOUT_CONFIG"])

        assert poll(lambda: without_config("guarded"), "the guarded pod") == "refuse"
        assert poll(lambda: without_config("lenient"), "the lenient pod") == "unlimited"
        assert poll(lambda: without_config("unselected"), "the unselected pod") == "unlimited"


def deployment(name: str, ns: str, *, inject: bool, replicas: int | None = None) -> str:
    labels = {"app": name, **({"sluice.dev/inject": "true"} if inject else {})}
    return yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": replicas or (2 if inject else 1),
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{
                    "name": "app", "image": "registry.invalid/demo:1",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                }]},
            },
        },
    })


def patches_of_policies(cp: ControlPlane) -> int:
    """PATCH requests the API server has served on RateLimitPolicies (and their status), all
    clients (only this test's operator runs meanwhile)."""
    text = cp.kubectl("get", "--raw", "/metrics").stdout
    return sum(int(float(m[2])) for m in re.finditer(
        r'^apiserver_request_total\{([^}]*)\} (\S+)$', text, re.M)
        if 'resource="ratelimitpolicies"' in m[1] and 'verb="PATCH"' in m[1])


def test_an_idle_operator_writes_nothing(k8s: ControlPlane, fresh_redis: Any) -> None:
    """Nothing changes: no status write in several resync intervals (0.5 s here), and a few
    Redis commands an interval, not some per namespace. Twelve policies in twelve namespaces:
    each interval used to PATCH every status (kopf sends any non-empty patch) and read every
    namespace's document and heartbeats."""
    prefix = f"{NS_PREFIX}-idle-{uuid.uuid4().hex[:4]}"
    namespaces = [f"{prefix}-{i}" for i in range(12)]
    for ns in namespaces:
        k8s.kubectl("create", "namespace", ns)
    with running_operator(k8s, fresh_redis, f"{prefix}-*", resync_interval_s=0.5) as op:
        try:
            for ns in namespaces:
                k8s.kubectl("apply", "-f", "-", input=policy_yaml("api", ns))
            poll(lambda: all(condition(op.rlp(ns, "api") or {}, "Enforced") for ns in namespaces),
                 "every policy's first Enforced condition (no sidecars: False)", timeout=60)

            def resyncs() -> float:
                return sum(s.value for m in op.metrics.registry.collect()
                           if m.name == "sluice_operator_resyncs" for s in m.samples if s.name.endswith("_total"))

            def redis_calls() -> dict[str, int]:
                stats = op.redis.info("commandstats")
                return {k: int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"}

            # Idle from here: the sidecar counts a new version calls for (1, 3 and 10 s after it) done.
            poll(lambda: not op.reconciler.recounts, "the recounts after the writes", timeout=30)
            versions = {ns: op.rlp(ns, "api")["metadata"]["resourceVersion"] for ns in namespaces}
            patches, calls, start = patches_of_policies(k8s), redis_calls(), resyncs()
            poll(lambda: resyncs() >= start + 6, "six resync intervals", timeout=30)
            after = redis_calls()
            by_command = {k: n - calls.get(k, 0) for k, n in after.items() if n != calls.get(k, 0)}
            patched, called, swept = patches_of_policies(k8s) - patches, sum(by_command.values()), resyncs() - start
            assert patched == 0, f"{patched} PATCHes of policies while nothing changed"
            assert {ns: op.rlp(ns, "api")["metadata"]["resourceVersion"] for ns in namespaces} == versions
            # about six an interval (epoch, EXISTS, heartbeats read and pruned, memory settings),
            # where every namespace cost a document and a heartbeat read before
            assert called / swept < len(namespaces), f"{called} Redis commands in {swept} intervals: {by_command}"
        finally:
            for ns in namespaces:
                k8s.kubectl("delete", "rlp", "--all", "-n", ns, "--timeout=30s", check=False)
    for ns in namespaces:
        k8s.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


def test_a_new_policy_costs_one_patch_its_status(k8s: ControlPlane, fresh_redis: Any) -> None:
    """kopf also wrote the spec it last handled into an annotation of each policy: a third PATCH
    and watch event per new policy (1,000 at a start-up with 1,000 fresh policies). It stays in
    the operator's memory now; an update is still told from a creation. No finalizer either
    (#12, defect 4): the status is the one write."""
    prefix = f"{NS_PREFIX}-new-{uuid.uuid4().hex[:4]}"
    namespaces = [f"{prefix}-{i}" for i in range(4)]
    for ns in namespaces:
        k8s.kubectl("create", "namespace", ns)
        k8s.kubectl("apply", "-f", "-", input=policy_yaml("api", ns))
    before = patches_of_policies(k8s)
    with running_operator(k8s, fresh_redis, f"{prefix}-*", resync_interval_s=300.0) as op:
        try:
            poll(lambda: all(programmed(k8s, "rlp", "api", ns) for ns in namespaces), "all Programmed")
            patched = patches_of_policies(k8s) - before
            assert patched <= len(namespaces), patched  # three each before, then two
            for ns in namespaces:
                annotations = (op.rlp(ns, "api") or {})["metadata"].get("annotations") or {}
                assert "kopf.zalando.org/last-handled-configuration" not in annotations
            version = op.config(namespaces[0]).version
            k8s.kubectl("apply", "-f", "-", input=policy_yaml("api", namespaces[0], requests=20))
            poll(lambda: op.config(namespaces[0]).version > version, "the update in Redis")
        finally:
            for ns in namespaces:
                k8s.kubectl("delete", "rlp", "--all", "-n", ns, "--timeout=30s", check=False)
    for ns in namespaces:
        k8s.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


def test_a_restarted_operator_reconciles_each_namespace_once(k8s: ControlPlane, fresh_redis: Any,
                                                            namespace: str) -> None:
    """At start-up every policy resumes at once; the first reconcile of the namespace serves
    them all (checked under the namespace's lock): eight policies, one reconcile, where each
    resume and each resync timer reconciled before (16)."""
    names = [f"p{i}" for i in range(8)]
    with running_operator(k8s, fresh_redis, namespace, resync_interval_s=300.0):
        for name in names:
            k8s.kubectl("apply", "-f", "-", input=policy_yaml(name, namespace))
        poll(lambda: all(programmed(k8s, "rlp", n, namespace) for n in names), "all Programmed")
    with running_operator(k8s, fresh_redis, namespace, resync_interval_s=300.0) as op:
        def reconciles() -> float:
            return sum(s.value for m in op.metrics.registry.collect()
                       if m.name == "sluice_operator_reconciles"
                       for s in m.samples if s.name.endswith("_total"))

        poll(lambda: reconciles() >= 1, "the first reconcile")
        time.sleep(5.0)  # a measuring window for the other resumes and timers, not a synchronisation
        count = reconciles()
        k8s.kubectl("delete", "rlp", "--all", "-n", namespace, "--timeout=30s")
    assert count <= 3, count
