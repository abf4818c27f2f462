"""The operator at scale, against a real kube-apiserver (``python -m bench.operator_scale``).

N policies in N namespaces (one each), created before a cluster-wide operator starts (no
webhooks, default 30 s resync). For the code at ``--baseline`` (a ``git archive`` copy) and the
working tree, each on a fresh control plane and Redis, side by side in one run:

- start-up: operator start to every policy ``Programmed=True`` (and to the first config in Redis);
- RSS once started, idle CPU (s a minute), idle API requests by verb and resource (the API
  server's ``apiserver_request_total``, writes and reads), idle Redis commands a minute
  (``INFO commandstats``), all over ``--idle`` seconds with nothing changing;
- edit to Redis: a spec change applied through the API until its new config version is in Redis
  (median of 11).

``--keys N`` adds the key-Secrets case: one namespace, one policy, N key Secrets created before
the operator starts: start-up to all N keys in Redis (embedded in the document before grants,
as grants after), RSS 5 s later, and the time from creating one more Secret to its key in Redis, and from creating another to its key
working in a cluster-mode sidecar of the namespace (the policy requires keys).
``--sizes ""`` runs the key-Secrets case alone.

Run time: about 9 min at the default sizes (100, 1,000; ``--sizes 100``: 2 min), 8 more with
``--keys 10000``. Figures
go to docs/benchmarks.md (``--out``), between this benchmark's markers.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import redis  # noqa: E402
import yaml  # noqa: E402
from sluice_core import keyschema  # noqa: E402
from support.control_plane import ControlPlane  # noqa: E402
from support.crds import apply_crds  # noqa: E402
from support.processes import SidecarProcess, UpstreamProcess  # noqa: E402
from support.redis_servers import RedisServer, pick_port  # noqa: E402

from bench.report import write_block  # noqa: E402
from bench.run import cpu_ns, rss_mb  # noqa: E402

BEGIN, END = "<!-- bench:operator-scale:begin -->", "<!-- bench:operator-scale:end -->"
NS = "scale-{i:04d}"
OPERATOR_WRITES = ("ratelimitpolicies", "clusterratelimitpolicies", "events", "namespaces", "secrets")
"""Resources the operator writes (the controller-manager writes others: ServiceAccounts for new
namespaces, its leases)."""
_REQUESTS = re.compile(r'^apiserver_request_total\{([^}]*)\} (\S+)$', re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def policy(ns: str, requests: int = 100) -> dict[str, Any]:
    return {"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
            "metadata": {"name": "api", "namespace": ns},
            "spec": {"tiers": [{"name": "free", "requests": requests, "period": "1m"},
                               {"name": "pro", "requests": 1000, "period": "1m"}]}}


def key_policy(ns: str) -> dict[str, Any]:
    """:func:`policy` with required API keys, for the pods labelled ``app: web``."""
    doc = policy(ns)
    doc["spec"].update(selector={"matchLabels": {"app": "web"}}, identify={"order": ["apiKey", "ip"]},
                       apiKeys={"header": "X-API-Key", "required": True})
    return doc


def key_secret(ns: str, i: int) -> dict[str, Any]:
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": f"key-{i:05d}", "namespace": ns, "labels": {"sluice.dev/policy": "api"}},
            "data": {"key": b64(f"bench-key-{i}"), "tier": b64("pro")}}


def create(cp: ControlPlane, objects: list[dict[str, Any]], chunk: int = 500) -> None:
    for start in range(0, len(objects), chunk):
        cp.kubectl("create", "-f", "-", timeout=300,
                   input=yaml.safe_dump_all(objects[start:start + chunk]))


def api_requests(cp: ControlPlane) -> Counter[tuple[str, str]]:
    status, body = cp._api_get("/metrics")
    assert status == 200, status
    counts: Counter[tuple[str, str]] = Counter()
    for labels, value in _REQUESTS.findall(body.decode()):
        d = dict(_LABEL.findall(labels))
        counts[(d.get("verb", "?"), d.get("resource", "?"))] += int(float(value))
    return counts


def redis_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_info",))


@dataclass
class Variant:
    name: str
    pythonpath: str


@dataclass
class Figures:
    variant: str
    n: int
    startup_s: float = 0.0
    first_redis_s: float = 0.0
    rss_mb: float = 0.0
    rss_idle_mb: float = 0.0
    idle_cpu_s_min: float = 0.0
    idle_writes_min: float = 0.0
    idle_requests: dict[str, float] = field(default_factory=dict)
    idle_redis_min: float = 0.0
    edit_ms: float = 0.0
    conflicts: int = 0
    notes: list[str] = field(default_factory=list)


class Operator:
    def __init__(self, variant: Variant, cp: ControlPlane, redis_url: str, workdir: Path,
                 extra: tuple[str, ...] = ()) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "SLUICE_OPERATOR_"))}
        env.update(KUBECONFIG=str(cp.kubeconfig), PYTHONPATH=variant.pythonpath)
        self.log_path = workdir / f"operator-{variant.name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sluice_core.cli", "operator", "--redis", redis_url,
             "--liveness", f"http://127.0.0.1:{pick_port()}/healthz",
             "--metrics-listen", f"127.0.0.1:{pick_port()}", "--log-level", "warning", *extra],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=workdir)

    def stop(self) -> float:
        """SIGTERM; the seconds it took to exit."""
        t = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        return time.monotonic() - t

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_for(predicate: Callable[[], bool], what: str, timeout: float, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def policy_columns(cp: ControlPlane) -> list[dict[str, Any]]:
    """Every policy's printer columns (the CRD's), as the API server renders them in a Table:
    polled every half second, a full ``kubectl get -o json`` of 1,000 policies (managed fields
    and all, a kubectl process each time) took a good part of the two cores from the operator
    being measured."""
    req = urllib.request.Request(cp.server + "/apis/sluice.dev/v1alpha1/ratelimitpolicies?includeObject=None",
                                 headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})
    with urllib.request.urlopen(req, timeout=30, context=cp._ssl_context()) as r:
        table = json.loads(r.read())
    names = [c["name"] for c in table["columnDefinitions"]]
    return [dict(zip(names, row["cells"], strict=True)) for row in table.get("rows") or []]


def programmed_count(cp: ControlPlane) -> int:
    return sum(1 for row in policy_columns(cp) if row.get("Programmed") == "True")


def enforced_count(cp: ControlPlane) -> int:
    """Policies whose status has an Enforced condition (and so a count of enforcing sidecars):
    the first resync has counted sidecars."""
    return sum(1 for row in policy_columns(cp) if row.get("Enforced") is not None)


@contextlib.contextmanager
def cluster() -> Iterator[tuple[ControlPlane, RedisServer, redis.Redis]]:
    cp = ControlPlane()
    server = RedisServer()
    try:
        apply_crds(cp)
        with server.client() as r:
            yield cp, server, r
    finally:
        server.close()
        cp.close()


def measure_policies(variant: Variant, n: int, idle_s: float, workdir: Path) -> Figures:
    fig = Figures(variant.name, n)
    with cluster() as (cp, server, r):
        nss = [NS.format(i=i) for i in range(n)]
        create(cp, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}} for ns in nss])
        create(cp, [policy(ns) for ns in nss])
        settled(cp, n)
        op = Operator(variant, cp, server.url, workdir)
        try:
            first = [0.0]

            def done() -> bool:
                if not first[0] and r.exists(f"sluice:cfg:{{{nss[0]}}}") + r.exists(f"sluice:cfg:{{{nss[-1]}}}"):
                    first[0] = time.monotonic() - op.started
                return programmed_count(cp) >= n

            wait_for(done, f"{n} policies Programmed", timeout=600, interval=0.5)
            fig.startup_s = time.monotonic() - op.started
            fig.first_redis_s = first[0] or fig.startup_s
            # Idle means after the first resync, whose count of sidecars is a status change.
            wait_for(lambda: enforced_count(cp) >= n, "the first resync's Enforced conditions", timeout=300)
            time.sleep(5)  # let its stragglers pass
            fig.rss_mb = rss_mb(op.proc.pid)
            api0, redis0, cpu0, t0 = api_requests(cp), redis_calls(r), cpu_ns(op.proc.pid), time.monotonic()
            time.sleep(idle_s)
            api1, redis1, cpu1, t1 = api_requests(cp), redis_calls(r), cpu_ns(op.proc.pid), time.monotonic()
            fig.rss_idle_mb = rss_mb(op.proc.pid)
            per_min = 60.0 / (t1 - t0)
            fig.idle_cpu_s_min = (cpu1 - cpu0) / 1e9 * per_min
            fig.idle_redis_min = (redis1 - redis0) * per_min
            diff = {f"{v} {res}": (api1[(v, res)] - api0[(v, res)]) * per_min
                    for v, res in api1 if api1[(v, res)] - api0[(v, res)] > 0}
            fig.idle_requests = diff
            fig.idle_writes_min = sum(c for k, c in diff.items()  # to what the operator writes
                                      if k.split()[0] in ("PATCH", "POST", "PUT", "DELETE")
                                      and k.split()[-1] in OPERATOR_WRITES)
            fig.edit_ms = edit_latency(cp, r, nss)
            fig.conflicts = op.log().count("(422)") + op.log().count("Conflict")
            took = op.stop()
            fig.notes.append(f"stop {took:.1f}s")
            fig.notes += sorted({m for m in re.findall(r"did not exit in time|Timer .* has failed", op.log())})
        finally:
            if op.proc.poll() is None:
                op.stop()
        shutil.copy(op.log_path, workdir / f"operator-{variant.name}-{n}.log")
    return fig


def settled(cp: ControlPlane, n: int) -> None:
    """Wait for the controller-manager to finish with the new namespaces (a ServiceAccount and
    a ConfigMap each): in a real cluster they are older than the operator, and on two cores its
    burst of writes would be measured as the operator's start-up."""
    def done() -> bool:
        made = api_requests(cp)
        return made[("POST", "serviceaccounts")] >= n and made[("POST", "configmaps")] >= n
    wait_for(done, "the controller-manager's objects of the new namespaces", timeout=300)
    time.sleep(2)


def edit_latency(cp: ControlPlane, r: redis.Redis, nss: list[str], edits: int = 11) -> float:
    """A spec change through the API server until Redis holds its new version (ms, median)."""
    times = []
    for i in range(edits):
        ns = nss[(i * 7919) % len(nss)]
        key = f"sluice:cfg:{{{ns}}}"
        before = int(r.hget(key, "version") or 0)
        patch = json.dumps({"spec": policy(ns, requests=200 + i)["spec"]})
        t = time.monotonic()
        cp.kubectl("patch", "rlp", "api", "-n", ns, "--type=merge", "-p", patch)
        deadline = t + 30
        while int(r.hget(key, "version") or 0) <= before:
            if time.monotonic() > deadline:
                raise TimeoutError(f"edit of {ns} not in Redis after 30 s")
            time.sleep(0.001)
        times.append((time.monotonic() - t) * 1000)
    return statistics.median(times)


@dataclass
class KeyFigures:
    variant: str
    keys: int
    startup_s: float = 0.0
    rss_mb: float = 0.0
    new_key_ms: float = 0.0
    new_key_sidecar_ms: float = 0.0
    burst: int = 0  # key Secrets created at once while the operator runs
    burst_s: float = 0.0  # from the first creation to all of them in Redis
    burst_status_writes: int = 0  # status PATCHes meanwhile
    unfinished: str = ""  # what did not happen within its time limit


def measure_keys(variant: Variant, keys: int, workdir: Path, limit_s: float) -> KeyFigures:
    fig = KeyFigures(variant.name, keys)
    ns = "scale-keys"
    with cluster() as (cp, server, r):
        create(cp, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}, key_policy(ns)])
        create(cp, [key_secret(ns, i) for i in range(keys)], chunk=1000)
        op = Operator(variant, cp, server.url, workdir)
        try:
            try:
                wait_for(lambda: _keys_in_redis(r, ns) >= keys, f"{keys} keys in Redis", timeout=limit_s)
            except TimeoutError:
                fig.unfinished = f"not all keys in Redis after {limit_s:.0f} s ({_keys_in_redis(r, ns):,})"
                fig.rss_mb = rss_mb(op.proc.pid)
                return fig
            fig.startup_s = time.monotonic() - op.started
            time.sleep(5)
            fig.rss_mb = rss_mb(op.proc.pid)
            t = time.monotonic()
            create(cp, [key_secret(ns, keys)])
            try:
                wait_for(lambda: _key_in_redis(r, ns, f"bench-key-{keys}"), "the new key in Redis",
                         timeout=120, interval=0.002)
            except TimeoutError:
                fig.unfinished = "the new key not in Redis after 120 s"
                return fig
            fig.new_key_ms = (time.monotonic() - t) * 1000
            fig.new_key_sidecar_ms = new_key_in_sidecar(cp, server.url, ns, keys + 1, workdir)
            fig.burst = max(keys // 10, 1)
            patches0, t = api_requests(cp)[("PATCH", "ratelimitpolicies")], time.monotonic()
            create(cp, [key_secret(ns, i) for i in range(keys + 2, keys + 2 + fig.burst)], chunk=1000)
            wait_for(lambda: _keys_in_redis(r, ns) >= keys + 2 + fig.burst, "the burst in Redis", timeout=limit_s)
            fig.burst_s = time.monotonic() - t
            time.sleep(2)  # the last coalesced status write
            fig.burst_status_writes = api_requests(cp)[("PATCH", "ratelimitpolicies")] - patches0
        finally:
            op.stop()
    return fig


def new_key_in_sidecar(cp: ControlPlane, redis_url: str, ns: str, i: int, workdir: Path) -> float:
    """ms from creating key Secret ``i`` to a cluster-mode sidecar of ``ns`` answering 200 with
    its key (asked every 2 ms; before, 401)."""
    labels = workdir / "labels"
    labels.write_text('app="web"\n')
    up = UpstreamProcess()
    sidecar = SidecarProcess(up.url, "--redis", redis_url, "--namespace", ns, "--pod-labels", str(labels))
    try:
        def answer() -> int:
            req = urllib.request.Request(sidecar.url + "/", headers={"X-API-Key": f"bench-key-{i}"})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return int(r.status)
            except urllib.error.HTTPError as e:
                return int(e.code)

        assert answer() == 401, "the key works before its Secret exists"
        t = time.monotonic()
        create(cp, [key_secret(ns, i)])
        wait_for(lambda: answer() == 200, "the new key in the sidecar", timeout=120, interval=0.002)
        return (time.monotonic() - t) * 1000
    finally:
        sidecar.close()
        up.close()


def _keys_in_redis(r: redis.Redis, ns: str) -> int:
    """Keys embedded in the document (before grants), or the policy's grants."""
    doc = r.hget(keyschema.config_key(ns), "doc")
    embedded = doc.count(b'"tier"') if doc else 0
    return max(embedded, int(r.scard(keyschema.grant_index_key(keyschema.policy_id(f"{ns}/api")))))


def _key_in_redis(r: redis.Redis, ns: str, api_key: str) -> bool:
    digest = keyschema.hash_api_key(api_key)
    if digest in (r.hget(keyschema.config_key(ns), "doc") or b"").decode():
        return True
    grant = keyschema.grant_key(keyschema.policy_id(f"{ns}/api"), keyschema.client_for_api_key(bytes.fromhex(digest)))
    return bool(r.exists(grant))


def variants(baseline: str, workdir: Path) -> list[Variant]:
    old = workdir / "baseline"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", baseline], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    return [Variant(f"before ({baseline})", f"{old}/core:{old}/sidecar:{old}/operator"),
            Variant("after", f"{ROOT}/core:{ROOT}/sidecar:{ROOT}/operator")]


def table(figs: list[Figures]) -> str:
    rows = ["| policies | code | start-up to all Programmed | first config in Redis | RSS after the first resync | "
            "RSS idle | idle CPU | idle API writes | idle Redis commands | edit to Redis | 422 conflicts |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for f in figs:
        rows.append(f"| {f.n:,} | {f.variant} | {f.startup_s:.1f} s | {f.first_redis_s:.1f} s | "
                    f"{f.rss_mb:.0f} MB | {f.rss_idle_mb:.0f} MB | {f.idle_cpu_s_min:.2f} s/min | "
                    f"{f.idle_writes_min:,.0f}/min | "
                    f"{f.idle_redis_min:,.0f}/min | {f.edit_ms:.0f} ms | {f.conflicts} |")
    rows += ["", "Idle API requests a minute, by verb and resource (the whole API server: the "
             "controller-manager's own requests are in it too):", "",
             "| policies | code | requests a minute |", "| ---: | --- | --- |"]
    for f in figs:
        parts = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(f.idle_requests.items(), key=lambda kv: -kv[1]))
        rows.append(f"| {f.n:,} | {f.variant} | {parts or 'none'} |")
    return "\n".join(rows)


def key_table(figs: list[KeyFigures]) -> str:
    rows = ["| key Secrets | code | start-up to all keys in Redis | RSS | one more Secret to its key in Redis "
            "| ... and working in a sidecar | a burst of more Secrets: all in Redis, status writes |",
            "| ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    rows += [f"| {f.keys:,} | {f.variant} | {f.unfinished or f'{f.startup_s:.1f} s'} | {f.rss_mb:.0f} MB | "
             f"{'–' if f.unfinished else f'{f.new_key_ms:.0f} ms'} | "
             f"{f'{f.new_key_sidecar_ms:.0f} ms' if f.new_key_sidecar_ms else '–'} | "
             f"{f'{f.burst:,}: {f.burst_s:.1f} s, {f.burst_status_writes} PATCHes' if f.burst else '–'} |" for f in figs]
    return "\n".join(rows)


def ratios(figs: list[Figures]) -> str:
    out = []
    for n in sorted({f.n for f in figs}):
        pair = [f for f in figs if f.n == n]
        if len(pair) == 2:
            b, a = pair
            out.append(f"- {n:,} policies: start-up ×{b.startup_s / max(a.startup_s, 1e-9):.1f} faster, "
                       f"idle RSS ×{b.rss_idle_mb / max(a.rss_idle_mb, 1e-9):.1f} smaller, idle CPU "
                       f"{b.idle_cpu_s_min:.2f} → {a.idle_cpu_s_min:.2f} s/min, idle writes "
                       f"{b.idle_writes_min:,.0f} → {a.idle_writes_min:,.0f}/min, idle Redis "
                       f"{b.idle_redis_min:,.0f} → {a.idle_redis_min:,.0f}/min")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,1000", help="policy counts, comma-separated")
    parser.add_argument("--idle", type=float, default=60.0, help="idle window, seconds")
    parser.add_argument("--keys", type=int, default=0, help="also the key-Secrets case with this many")
    parser.add_argument("--keys-limit", type=float, default=300.0,
                        help="seconds to wait for all keys in Redis at start-up")
    parser.add_argument("--baseline", default="a046dce", help="the commit to compare with")
    parser.add_argument("--only", choices=("before", "after"), help="measure one variant")
    parser.add_argument("--out", type=Path, help="write the figures into this Markdown page")
    args = parser.parse_args()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="sluice-opscale-"))
    figs: list[Figures] = []
    key_figs: list[KeyFigures] = []
    runs = [v for v in variants(args.baseline, workdir) if not args.only or v.name.startswith(args.only)]
    for n in [int(s) for s in args.sizes.split(",") if s]:
        for v in runs:
            figs.append(measure_policies(v, n, args.idle, workdir))
            print(table(figs[-1:]).split("\n")[2], flush=True)
    if args.keys:
        for v in runs:
            key_figs.append(measure_keys(v, args.keys, workdir, args.keys_limit))
            print(key_table(key_figs[-1:]).split("\n")[2], flush=True)
    took = time.monotonic() - started
    block = "\n".join([
        BEGIN, "### The operator at scale (`python -m bench.operator_scale`)", "",
        f"One policy per namespace, created before a cluster-wide operator starts (no webhooks, "
        f"30 s resync); real kube-apiserver and Redis; idle figures over {args.idle:.0f} s with "
        f"nothing changing, from 5 s after the first resync wrote every policy's `Enforced` condition. {os.cpu_count()} cores. Run took {took / 60:.1f} min.", "",
        table(figs), "", ratios(figs), "",
        *([key_table(key_figs), ""] if key_figs else []),
        "Notes: " + "; ".join(f"{f.variant} {f.n}: {', '.join(f.notes)}" for f in figs), END])
    print(block)
    print(f"logs in {workdir}")
    if args.out:
        write_block(args.out, BEGIN, END, block)


if __name__ == "__main__":
    main()
