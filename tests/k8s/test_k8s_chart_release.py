"""The whole chart installed into the real control plane (tests/support/control_plane.py): the
in-chart Redis, the usage collector, the NetworkPolicies and the sidecars' Redis Secret in an
application namespace, as `helm install` with the defaults makes them.

- The API server accepts every object (NetworkPolicies, StatefulSet, PVC, ...) and the
  controller-manager makes the pods.
- The generated Redis password survives ``helm upgrade`` (lookup of the live Secret), in the
  release's Secret and in the application namespace's copy.
- The collector's ServiceAccount may do what its API needs (TokenReview, SubjectAccessReview,
  Events, reading policies) and nothing dangerous.
- examples/ applies (the CRDs' schema on the API server) and the Deployment makes 2 pods.
- The commands NOTES.txt prints run and succeed, as printed.
- Changing redis.persistence fails before anything is applied, naming the recreate step.
- ``helm uninstall`` leaves no object of the release behind but its two data volumes (CRDs
  stay, as Helm does); a reinstall takes the collector's back.

The release has ``webhook.enabled=false``: no operator runs here, and a ``sluice-policies``
(failurePolicy Fail) without one would refuse the example policy (tests/k8s/
test_k8s_chart_install.py runs the operator under the chart's RBAC)."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from support.chart import CHART, helm
from support.control_plane import ControlPlane, bin_dir
from support.paths import ROOT
from support.polling import poll

pytestmark = pytest.mark.k8s


@dataclass
class FullRelease:
    name: str
    namespace: str
    app_namespace: str
    cp: ControlPlane

    @property
    def full(self) -> str:
        return f"{self.name}-sluice"

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return helm(*args, "--namespace", self.namespace, "--kubeconfig", str(self.cp.kubeconfig),
                    check=check)

    def secret(self, name: str, namespace: str | None = None) -> dict[str, str]:
        obj = self.cp.kubectl_json("get", "secret", name, "-n", namespace or self.namespace)
        return {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}


@pytest.fixture(scope="module")
def release(control_plane: ControlPlane) -> Iterator[FullRelease]:
    suffix = uuid.uuid4().hex[:6]
    rel = FullRelease(f"full-{suffix}", f"sluice-full-{suffix}", f"shop-{suffix}", control_plane)
    for ns in (rel.namespace, rel.app_namespace):
        control_plane.kubectl("create", "namespace", ns)
    try:
        rel.helm("install", rel.name, str(CHART), "--wait=false", "--set", "webhook.enabled=false",
                 "--set", f"sidecar.redisSecret.namespaces={{{rel.app_namespace}}}")
        yield rel
    finally:
        rel.helm("uninstall", rel.name, check=False)
        for ns in (rel.namespace, rel.app_namespace):
            control_plane.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


def test_the_full_release_installs(release: FullRelease) -> None:
    cp, ns, full = release.cp, release.namespace, release.full
    status = release.helm("status", release.name, "-o", "json").stdout
    assert '"status":"deployed"' in status.replace(" ", "")
    for kind, name in [("statefulset", f"{full}-redis"), ("service", f"{full}-redis"),
                       ("configmap", f"{full}-redis"), ("deployment", f"{full}-operator"),
                       ("deployment", f"{full}-analytics"), ("service", f"{full}-analytics"),
                       ("serviceaccount", f"{full}-analytics"),
                       ("persistentvolumeclaim", f"{full}-analytics"),
                       ("networkpolicy", f"{full}-redis"), ("networkpolicy", f"{full}-operator"),
                       ("networkpolicy", f"{full}-analytics")]:
        assert cp.kubectl_json("get", kind, name, "-n", ns)["metadata"]["name"] == name
    for kind in ("clusterrole", "clusterrolebinding"):
        assert cp.kubectl_json("get", kind, f"{full}-analytics")["metadata"]["name"]
    # the sidecars' copy of the URL, in the application namespace, is the operator's
    url = release.secret(f"{full}-redis")["url"]
    assert release.secret(f"{full}-redis-url", release.app_namespace) == {"url": url}
    assert f"@{full}-redis.{ns}.svc:6379" in url
    # the controller-manager makes the pods: Redis (StatefulSet) and the collector
    for component in ("redis", "analytics"):
        pods = poll(lambda c=component: cp.kubectl_json(
            "get", "pods", "-n", ns, "-l", f"app.kubernetes.io/component={c}")["items"],
            f"the {component} pod")
        assert pods[0]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_the_redis_password_survives_upgrades(release: FullRelease) -> None:
    full, app_ns = release.full, release.app_namespace
    before = release.secret(f"{full}-redis")
    assert len(before["password"]) >= 32
    sts = release.cp.kubectl_json("get", "statefulset", f"{full}-redis", "-n", release.namespace)
    checksum = sts["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    release.helm("upgrade", release.name, str(CHART), "--reuse-values", "--wait=false",
                 "--set", "redis.maxmemory=100mb")
    assert release.secret(f"{full}-redis") == before
    assert release.secret(f"{full}-redis-url", app_ns) == {"url": before["url"]}
    sts = release.cp.kubectl_json("get", "statefulset", f"{full}-redis", "-n", release.namespace)
    # a changed redis.conf rolls Redis; the password it is given is the same
    assert sts["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != checksum


def can_i(release: FullRelease, account: str, *args: str) -> bool:
    res = release.cp.kubectl("auth", "can-i", *args,
                             f"--as=system:serviceaccount:{release.namespace}:{account}",
                             check=False)
    return res.stdout.strip() == "yes"


def test_the_collector_may_do_what_its_api_needs_and_no_more(release: FullRelease) -> None:
    sa = f"{release.full}-analytics"
    allowed = [("create", "tokenreviews.authentication.k8s.io"),
               ("create", "subjectaccessreviews.authorization.k8s.io"),
               ("create", "events", "-n", "team-a"), ("create", "events", "-n", "default"),
               ("get", "ratelimitpolicies.sluice.dev", "-n", "team-a"),
               ("list", "ratelimitpolicies.sluice.dev", "-A"),
               ("get", "clusterratelimitpolicies.sluice.dev")]
    denied = [("list", "secrets", "-A"), ("get", "secrets", "-n", release.namespace),
              ("create", "pods", "-n", release.namespace),
              ("update", "ratelimitpolicies.sluice.dev", "-n", "team-a"),
              ("delete", "ratelimitpolicies.sluice.dev", "-n", "team-a"),
              ("patch", "ratelimitpolicies.sluice.dev/status", "-n", "team-a"),
              ("watch", "ratelimitpolicies.sluice.dev", "-A"),
              ("delete", "events", "-n", "team-a"), ("create", "serviceaccounts/token", "-n", "x"),
              ("update", "ratelimitpolicies.sluice.dev/buckets", "-n", "team-a")]
    assert [a for a in allowed if not can_i(release, sa, *a)] == []
    assert [a for a in denied if can_i(release, sa, *a)] == []


def test_the_examples_apply(release: FullRelease) -> None:
    cp, app_ns = release.cp, release.app_namespace
    cp.kubectl("apply", "-n", app_ns, "-f", str(ROOT / "examples"))
    rlp = cp.kubectl_json("get", "rlp", "hello", "-n", app_ns)
    assert [t["name"] for t in rlp["spec"]["tiers"]] == ["free", "pro"]
    svc = cp.kubectl_json("get", "service", "hello", "-n", app_ns)
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    poll(lambda: len(cp.kubectl_json("get", "pods", "-n", app_ns, "-l", "app=hello")["items"]) == 2,
         "the example Deployment's 2 pods")


def notes_commands(release: FullRelease) -> list[str]:
    notes = release.helm("get", "notes", release.name).stdout
    commands = [line.strip() for line in notes.splitlines() if re.match(r"^ {2}kubectl ", line)]
    assert commands, notes
    return commands


def run_as_printed(release: FullRelease, command: str) -> subprocess.CompletedProcess[str]:
    """A NOTES command through bash, kubectl on PATH and the control plane as its cluster."""
    env = {**os.environ, "PATH": f"{bin_dir()}:{os.environ['PATH']}",
           "KUBECONFIG": str(release.cp.kubeconfig)}
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60,
                          env=env, check=False, stdin=subprocess.DEVNULL)


def test_the_notes_commands_work(release: FullRelease) -> None:
    commands = notes_commands(release)
    assert len(commands) == 3, commands
    for command in commands:
        res = run_as_printed(release, command)
        assert res.returncode == 0, f"{command}\n{res.stderr}"
    listed = run_as_printed(release, commands[0]).stdout
    assert f"{release.full}-redis" in listed and f"{release.full}-analytics" in listed
    labels = release.cp.kubectl_json("get", "namespace", release.app_namespace)["metadata"]["labels"]
    assert labels["sluice.dev/inject"] == "true"
    # no namespace listed: NOTES show how to copy the URL Secret into one (here: "default",
    # which the test swaps for a namespace of its own, the command unchanged otherwise)
    other = f"other-{uuid.uuid4().hex[:6]}"
    release.cp.kubectl("create", "namespace", other)
    try:
        release.helm("upgrade", release.name, str(CHART), "--reuse-values", "--wait=false",
                     "--set-json", "sidecar.redisSecret.namespaces=[]")
        commands = notes_commands(release)
        assert len(commands) == 4 and "create secret generic" in commands[1], commands
        for command in commands[1:3]:
            res = run_as_printed(release, command.replace(" default ", f" {other} ")
                                 .replace("-n default", f"-n {other}"))
            assert res.returncode == 0, f"{command}\n{res.stderr}"
        url = release.secret(f"{release.full}-redis")["url"]
        assert release.secret(f"{release.full}-redis-url", other) == {"url": url}
    finally:
        release.cp.kubectl("delete", "namespace", other, "--wait=false")


def test_changing_redis_persistence_fails_first_and_names_the_step(release: FullRelease) -> None:
    """REVIEW15 M7: volumeClaimTemplates cannot change. The upgrade fails before it applies
    anything, with the command that makes it possible, and that command works as printed."""
    cp, ns, sts_name = release.cp, release.namespace, f"{release.full}-redis"
    before = cp.kubectl_json("get", "statefulset", sts_name, "-n", ns)
    assert not before["spec"].get("volumeClaimTemplates")
    res = release.helm("upgrade", release.name, str(CHART), "--reuse-values", "--wait=false",
                       "--set", "redis.persistence.enabled=true", check=False)
    assert res.returncode != 0
    step = re.search(r"`(kubectl -n \S+ delete statefulset \S+ --cascade=orphan)`", res.stderr)
    assert step, res.stderr
    assert "updates to statefulset spec" not in res.stderr  # ours, before the API server's
    assert cp.kubectl_json("get", "statefulset", sts_name, "-n", ns)["metadata"]["generation"] == \
        before["metadata"]["generation"]
    done = run_as_printed(release, step[1])
    assert done.returncode == 0, done.stderr
    release.helm("upgrade", release.name, str(CHART), "--reuse-values", "--wait=false",
                 "--set", "redis.persistence.enabled=true")
    after = cp.kubectl_json("get", "statefulset", sts_name, "-n", ns)
    assert after["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    # the StatefulSet controller makes the claim (Pending here: no provisioner)
    poll(lambda: cp.kubectl("get", "pvc", f"data-{sts_name}-0", "-n", ns, check=False).returncode == 0,
         "the Redis pod's claim")
    # a size in another spelling of the same quantity is no change; a bigger one is refused
    same = release.helm("upgrade", release.name, str(CHART), "--reuse-values", "--wait=false",
                        "--set", "redis.persistence.size=1024Mi", check=False)
    assert same.returncode == 0, same.stderr
    bigger = release.helm("upgrade", release.name, str(CHART), "--reuse-values", "--wait=false",
                          "--set", "redis.persistence.size=2Gi", check=False)
    assert bigger.returncode != 0 and f"patch pvc data-{sts_name}-0" in bigger.stderr, bigger.stderr


def test_uninstall_leaves_only_the_kept_volumes(release: FullRelease) -> None:
    """Everything of the release goes but the two claims that hold data: the collector's
    SQLite (helm.sh/resource-policy: keep, REVIEW15 M7) and Redis's (a StatefulSet's claims
    outlive it). A reinstall under the same name takes the collector's claim back."""
    cp, ns = release.cp, release.namespace
    claim = cp.kubectl_json("get", "pvc", f"{release.full}-analytics", "-n", ns)
    release.helm("uninstall", release.name)
    selector = f"app.kubernetes.io/instance={release.name}"
    kinds = ("deployments,statefulsets,replicasets,pods,services,secrets,configmaps,"
             "networkpolicies,persistentvolumeclaims,serviceaccounts,roles,rolebindings,"
             "poddisruptionbudgets")

    def left() -> list[str]:
        names = cp.kubectl("get", kinds, "-A", "-l", selector, "-o", "name").stdout.split()
        names += cp.kubectl("get", "clusterroles,clusterrolebindings,clusterkopfpeerings",
                            "-l", selector, "-o", "name").stdout.split()
        return sorted(names)

    kept = sorted([f"persistentvolumeclaim/{release.full}-analytics",
                   f"persistentvolumeclaim/data-{release.full}-redis-0"])
    poll(lambda: left() == kept, f"every object of the release gone but {kept}")
    for crd in ("ratelimitpolicies.sluice.dev", "clusterkopfpeerings.kopf.dev"):
        assert cp.kubectl_json("get", "crd", crd)["metadata"]["name"] == crd  # Helm keeps CRDs
    release.helm("install", release.name, str(CHART), "--wait=false", "--set", "webhook.enabled=false")
    again = cp.kubectl_json("get", "pvc", f"{release.full}-analytics", "-n", ns)
    assert again["metadata"]["uid"] == claim["metadata"]["uid"]
    release.helm("uninstall", release.name)
    cp.kubectl("delete", "pvc", "--all", "-n", ns, "--wait=false")


def test_a_gitops_password_secret_reaches_the_sidecars_and_rolls_its_readers(control_plane: ControlPlane) -> None:
    """REVIEW15 M9, with an API server: redis.auth.existingSecret's resourceVersion (looked up
    by helm install/upgrade) is what the pods' checksum carries, so a rotated password rolls
    Redis, the operator and the collector; the NOTES command that gives an application
    namespace the sidecars' URL Secret works as printed."""
    cp, suffix = control_plane, uuid.uuid4().hex[:6]
    rel = FullRelease(f"git-{suffix}", f"sluice-git-{suffix}", f"app-{suffix}", cp)
    for ns in (rel.namespace, rel.app_namespace):
        cp.kubectl("create", "namespace", ns)
    try:
        cp.kubectl("create", "secret", "generic", "redis-pass", "-n", rel.namespace,
                   "--from-literal=redis.password=first-Pass_1")
        values = ("--wait=false", "--set", "webhook.enabled=false", "--set", "redis.auth.existingSecret=redis-pass",
                  "--set", "redis.auth.existingSecretKey=redis.password")
        rel.helm("install", rel.name, str(CHART), *values)

        def checksums() -> set[str]:
            return {cp.kubectl_json("get", kind, f"{rel.full}-{name}", "-n", rel.namespace)["spec"]["template"]
                    ["metadata"]["annotations"]["checksum/redis-auth"]
                    for kind, name in [("statefulset", "redis"), ("deployment", "operator"),
                                       ("deployment", "analytics")]}

        version = cp.kubectl_json("get", "secret", "redis-pass", "-n", rel.namespace)["metadata"]["resourceVersion"]
        assert checksums() == {version}
        (create,) = [c for c in notes_commands(rel) if "create secret generic" in c]
        res = run_as_printed(rel, create.replace(" default ", f" {rel.app_namespace} ")
                             .replace("-n default", f"-n {rel.app_namespace}"))
        assert res.returncode == 0, f"{create}\n{res.stderr}"
        url = f"redis://:first-Pass_1@{rel.full}-redis.{rel.namespace}.svc:6379"
        assert rel.secret(f"{rel.full}-redis-url", rel.app_namespace) == {"url": url}
        # rotate: the next upgrade rolls every reader of the password
        rotated = cp.kubectl("create", "secret", "generic", "redis-pass", "-n", rel.namespace,
                             "--from-literal=redis.password=second-Pass_2", "--dry-run=client", "-o", "yaml").stdout
        cp.kubectl("apply", "-f", "-", input=rotated)
        new = cp.kubectl_json("get", "secret", "redis-pass", "-n", rel.namespace)["metadata"]["resourceVersion"]
        assert new != version
        rel.helm("upgrade", rel.name, str(CHART), *values)
        assert checksums() == {new}
    finally:
        rel.helm("uninstall", rel.name, check=False)
        for ns in (rel.namespace, rel.app_namespace):
            cp.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")
