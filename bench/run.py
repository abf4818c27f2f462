"""`make bench`: throughput, latency, CPU and memory of the sidecar against baselines measured in
the same run, written into docs/benchmarks.md between the bench markers.

Targets (issue #2): proxy CPU <= 200 us/request with Redis limiting; throughput >= 0.6x direct;
Redis <= 6 us per decision; added latency at a moderate fixed load p50 <= 0.5 ms, p99 <= 2 ms;
Redis memory per idle bucket <= 150 bytes; sidecar RSS <= 60 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.redis_servers import RedisServer, pick_port  # noqa: E402

from bench.report import write_block  # noqa: E402

KEYS = [f"bench-key-{i:02d}" for i in range(16)]
POLICY = """
apiVersion: sluice.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: bench}
spec:
  identify: {order: [apiKey, ip]}
  tiers:
    - {name: pro, requests: 1000000, period: 1s, burst: 1000000}
  headers: draft
"""
WRK_SCRIPT = """
local keys = {%s}
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/", {["X-API-Key"] = keys[(n %% #keys) + 1]})
end
%s
"""
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` (schedstat: nanoseconds on CPU)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def parse_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        return float("nan")
    v = float(m.group(1))
    return {"us": v / 1000, "ms": v, "s": v * 1000}[m.group(2)]


@dataclass
class Result:
    name: str
    rps: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    requests: int = 0
    non2xx: int = 0
    cpu_us: float | None = None
    redis_us: float | None = None  # INFO commandstats: wall time in the script, per decision
    redis_cpu_us: float | None = None  # redis-server's CPU time (all of it), per decision
    rss: float | None = None
    notes: list[str] = field(default_factory=list)


def wrk(url: str, seconds: float, connections: int, script: Path) -> Result:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "-s",
                          str(script), url], capture_output=True, text=True, check=True).stdout
    r = Result(url)
    r.rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    r.requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r.non2xx = int(m.group(1)) if m else 0
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    r.p50, r.p99 = parse_ms(lat.get("50", "nan")), parse_ms(lat.get("99", "nan"))
    return r


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *cmd: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def measure(name: str, url: str, pid: int | None, redis: RedisServer | None, seconds: float,
            script: Path, connections: int = 50) -> Result:
    wrk(url, 2, connections, script)  # warm-up: connections, pools, caches
    if redis is not None:
        redis.execute("CONFIG", "RESETSTAT")
    before = cpu_ns(pid) if pid else 0
    redis_before = cpu_ns(redis.proc.pid) if redis is not None and redis.proc else 0
    r = wrk(url, seconds, connections, script)
    if redis is not None and redis.proc:
        r.redis_cpu_us = (cpu_ns(redis.proc.pid) - redis_before) / 1000 / max(1, r.requests)
    r.name = name
    if pid:
        r.cpu_us = (cpu_ns(pid) - before) / 1000 / max(1, r.requests)
        r.rss = rss_mb(pid)
    if redis is not None:
        stats = redis.execute("INFO", "commandstats")
        # Server time per *decision* (one request = one decision; the sidecar batches several
        # decisions into one script run, so usec_per_call would overstate it).
        usec = sum(int(stats[c]["usec"]) for c in ("cmdstat_evalsha", "cmdstat_eval") if c in stats)
        calls = sum(int(stats[c]["calls"]) for c in ("cmdstat_evalsha", "cmdstat_eval") if c in stats)
        if calls:
            r.redis_us = usec / max(1, r.requests)
            r.notes.append(f"{r.requests / calls:.1f} decisions per script run")
    return r


async def bucket_memory(redis: RedisServer, n: int = 30000) -> tuple[float, int]:
    """Bytes of Redis memory per idle bucket, as the sidecar writes them."""
    from sluice_core import keyschema
    from sluice_core.model import Limit
    from sluice_core.redisurl import parse_redis_url
    from sluice_sidecar.stores.redis import RedisStore

    redis.execute("FLUSHALL")
    store = RedisStore(parse_redis_url(redis.url), timeout=5, connect_timeout=0.5)
    limit = Limit(requests=100, period_us=60_000_000, burst=100)
    params = (limit.emission_us, limit.capacity_us)
    key = ""

    async def fill(start: int, stop: int) -> None:
        nonlocal key
        for i in range(start, stop, 500):
            batch = []
            for j in range(i, min(stop, i + 500)):
                digest = hashlib.sha256(f"key-{j}".encode()).digest()
                tag = keyschema.client_tag("shop/public-api", keyschema.client_for_api_key(digest))
                key = keyschema.tier_bucket_key(tag, "pro", *params)
                batch.append(store.decide((key,), 1, params))
            await asyncio.gather(*batch)

    def used() -> int:
        time.sleep(0.5)  # let Redis finish incremental rehashing (a benchmark, not a test)
        return int(redis.execute("INFO", "memory")["used_memory"])

    # The slope between 10,000 and n buckets: per-key cost including the growth of Redis's
    # hash tables (main and expires), excluding fixed overhead.
    await fill(0, 10_000)
    before = used()
    await fill(10_000, n)
    after = used()
    await store.close()
    n -= 10_000
    return (after - before) / n, int(redis.execute("MEMORY", "USAGE", key))


def _redis_benchmark(redis: RedisServer, *args: str) -> float:
    """usec_per_call of EVALSHA for ``args`` run by redis-benchmark on an otherwise idle server."""
    redis.execute("CONFIG", "RESETSTAT")
    subprocess.run(["redis-benchmark", "-p", str(redis.port), "-n", "20000", "-c", "10", "-P", "4",
                    "-q", *args], check=True, capture_output=True)
    return float(redis.execute("INFO", "commandstats")["cmdstat_evalsha"]["usec_per_call"])


def script_cost(redis: RedisServer, batch: int) -> float:
    """Server time per decision of ``decide.lua`` carrying ``batch`` one-bucket decisions."""
    from sluice_core import scripts

    s = scripts.decide()
    sha = redis.execute("SCRIPT", "LOAD", s.source)
    sha = sha.decode() if isinstance(sha, bytes) else sha
    keys = [f"sl:{{bench{i}:k{i:015d}}}:t:pro:x7Q" for i in range(batch)]
    argv = [str(batch)] + ["1", "1", "60000", "60000000"] * batch
    if redis.proc is None:
        return float("nan")
    return _redis_benchmark(redis, "evalsha", sha, str(batch), *keys, *argv) / batch


def naive_script_cost(redis: RedisServer) -> float:
    sys.path.insert(0, str(ROOT / "bench"))
    from naive_proxy import SCRIPT

    sha = redis.execute("SCRIPT", "LOAD", SCRIPT)
    sha = sha.decode() if isinstance(sha, bytes) else sha
    return _redis_benchmark(redis, "-r", "1000", "evalsha", sha, "2", "rl:{__rand_int__}:t",
                            "rl:{__rand_int__}:ts", "1000000", "1000000", "1763812345.123", "1")


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "–" if v is None or v != v else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    if not shutil.which("wrk"):
        print("error: wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    keysfile = tmp / "keys.yaml"
    keysfile.write_text("keys:\n" + "".join(f"  {k}: pro\n" for k in KEYS))
    quoted = ", ".join(f'"{k}"' for k in KEYS)
    load_script = tmp / "load.lua"
    load_script.write_text(WRK_SCRIPT % (quoted, ""))
    paced_script = tmp / "paced.lua"  # moderate fixed load: each connection waits 10 ms
    paced_script.write_text(WRK_SCRIPT % (quoted, "delay = function() return 10 end"))

    py = sys.executable
    procs = Procs()
    redis = RedisServer()
    results: list[Result] = []
    try:
        up_port = pick_port()
        up = procs.start(py, str(ROOT / "bench" / "upstream_app.py"), str(up_port))
        upstream = f"http://127.0.0.1:{up_port}"
        wait_http(upstream + "/")

        def sidecar(store: str) -> tuple[str, int]:
            port, admin = pick_port(), pick_port()
            cmd = [py, "-m", "sluice_core.cli", "sidecar", "--upstream", upstream,
                   "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                   "--policy-file", str(policy), "--api-keys-file", str(keysfile),
                   "--log-level", "warning", "--redis-timeout-ms", "1000"]
            if store == "redis":
                cmd += ["--redis", redis.url]
            p = procs.start(*cmd)
            wait_http(f"http://127.0.0.1:{admin}/readyz")
            return f"http://127.0.0.1:{port}/", p.pid

        naive_port = pick_port()
        naive = procs.start(py, str(ROOT / "bench" / "naive_proxy.py"), str(naive_port), upstream, redis.url)
        wait_http(f"http://127.0.0.1:{naive_port}/")
        express = _start_express(procs, upstream, redis.url)
        s_redis_url, s_redis_pid = sidecar("redis")
        s_mem_url, s_mem_pid = sidecar("memory")
        layered_url, layered_pid = _layered_sidecar(procs, tmp, upstream, redis)

        print("measuring (wrk -t1 -c50, 16 API keys, nothing refused) ...", flush=True)
        direct = measure("upstream directly", upstream + "/", up.pid, None, args.seconds, load_script)
        direct.cpu_us = None  # that is the upstream's own CPU, not a proxy's
        results.append(direct)
        results.append(measure("naive aiohttp proxy + redis-py EVALSHA", f"http://127.0.0.1:{naive_port}/",
                               naive.pid, redis, args.seconds, load_script))
        if express is not None:
            results.append(measure("Express + rate-limiter-flexible + ioredis", express[0],
                                   express[1], redis, args.seconds, load_script))
        results.append(measure("Sluice sidecar, Redis store", s_redis_url, s_redis_pid, redis,
                               args.seconds, load_script))
        results.append(measure("Sluice sidecar, in-memory store", s_mem_url, s_mem_pid, None,
                               args.seconds, load_script))
        results.append(measure("Sluice sidecar, namespace + cluster policy (1 atomic call)", layered_url,
                               layered_pid, redis, args.seconds, load_script))
        results[-1].notes.append("both policies' buckets (4 keys) in one script call per request")
        print("measuring added latency at a moderate fixed load (wrk -c10, 10 ms pause per request) ...", flush=True)
        paced_direct = wrk(upstream + "/", args.seconds, 10, paced_script)
        paced_sidecar = wrk(s_redis_url, args.seconds, 10, paced_script)
        paced_memory = wrk(s_mem_url, args.seconds, 10, paced_script)
        per_bucket, memory_usage = asyncio.run(bucket_memory(redis))
        print("measuring the decision script alone (redis-benchmark, no other load) ...", flush=True)
        script_costs = {b: script_cost(redis, b) for b in (1, 8, 16)}
        naive_cost = naive_script_cost(redis)
    finally:
        procs.close()
        redis.close()
        shutil.rmtree(tmp, ignore_errors=True)

    base = results[0].rps
    lines = [BEGIN, "",
             f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores "
             f"({_cpu_model()}), Python {platform.python_version()}, "
             f"{_version('redis-server')}, wrk -t1 -c50 -d{args.seconds:.0f}s with 16 API keys, "
             "limits high enough that nothing is refused. Command: `make bench`.", "",
             "| target | req/s | ratio to direct | p50 ms | p99 ms | proxy CPU µs/req | Redis script µs/decision | Redis CPU µs/decision | RSS MB | non-2xx | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.rps:.0f} | {r.rps / base:.2f}× | {fmt(r.p50, '.2f')} | "
                     f"{fmt(r.p99, '.2f')} | {fmt(r.cpu_us)} | {fmt(r.redis_us, '.1f')} | {fmt(r.redis_cpu_us, '.1f')} | "
                     f"{fmt(r.rss, '.0f')} | {r.non2xx} | {'; '.join(r.notes)} |")
    added50 = paced_sidecar.p50 - paced_direct.p50
    added99 = paced_sidecar.p99 - paced_direct.p99
    sluice = next(r for r in results if r.name == "Sluice sidecar, Redis store")
    lines += ["",
              f"Moderate fixed load (wrk -t1 -c10, 10 ms think time per request, ~{paced_direct.rps:.0f} req/s): "
              f"direct p50 {paced_direct.p50:.2f} ms / p99 {paced_direct.p99:.2f} ms; through the sidecar "
              f"(Redis) p50 {paced_sidecar.p50:.2f} ms / p99 {paced_sidecar.p99:.2f} ms; "
              f"**added p50 {added50:.2f} ms, p99 {added99:.2f} ms**. Through the sidecar with the "
              f"in-memory store (no Redis hop): p50 {paced_memory.p50:.2f} ms / p99 {paced_memory.p99:.2f} ms.", "",
              "Decision script alone (redis-benchmark, 10 clients, pipeline 4, nothing else running; "
              "`usec_per_call` / decisions per run): " + ", ".join(
                  f"batch of {b}: **{v:.1f} µs** per decision" for b, v in script_costs.items())
              + f"; the naive proxy's straightforward token-bucket script: {naive_cost:.1f} µs per decision.", "",
              f"Redis memory per idle bucket: **{per_bucket:.0f} bytes** (used_memory growth from 10,000 to 30,000 "
              f"buckets; `MEMORY USAGE` of one key: {memory_usage} bytes).", "",
              "| target (issue #2) | goal | measured | met |", "|---|---|---|---|",
              _row("proxy CPU per request, Redis store", "≤ 200 µs", sluice.cpu_us, 200, "µs"),
              _row("throughput vs direct", "≥ 0.6×", sluice.rps / base, 0.6, "×", higher=True),
              _row("Redis server time per decision (commandstats)", "≤ 6 µs", sluice.redis_us, 6, "µs"),
              _row("Redis CPU per decision (whole server)", "≤ 6 µs", sluice.redis_cpu_us, 6, "µs"),
              _row("decision script alone, batch of 8", "≤ 6 µs", script_costs[8], 6, "µs"),
              _row("added latency p50", "≤ 0.5 ms", added50, 0.5, "ms"),
              _row("added latency p99", "≤ 2 ms", added99, 2, "ms"),
              _row("Redis memory per idle bucket", "≤ 150 B", per_bucket, 150, "B"),
              _row("sidecar RSS after load", "≤ 60 MB", sluice.rss, 60, "MB"),
              "", END]
    block = "\n".join(lines)
    print(block)
    write_block(Path(args.out), BEGIN, END, block)
    return 0


def publish_layered(redis_url: str, tmp: Path) -> Path:
    """Namespace ``bench``'s policy and a ClusterRateLimitPolicy over the same keys, written to
    Redis as the operator would; returns the pod-labels file that selects them."""
    from sluice_core import configdoc, configstore, keyschema
    from sluice_core.model import CLUSTER_SCOPE, KeyGrant
    from sluice_core.policyfile import load_policies

    policy_file = tmp / "layered.yaml"
    policy_file.write_text(POLICY.replace("metadata: {name: bench}", "metadata: {name: bench, namespace: bench}")
                           + "---\n" + POLICY.replace("kind: RateLimitPolicy", "kind: ClusterRateLimitPolicy")
                           .replace("metadata: {name: bench}", "metadata: {name: shared}"))
    policy, cluster_policy = load_policies(str(policy_file))
    grants = {keyschema.hash_api_key(k): KeyGrant(tier="pro") for k in KEYS}

    async def publish() -> None:
        async with configstore.connect(redis_url) as client:
            await configstore.publish(client, "bench", configdoc.build_doc("bench", [policy], {policy.name: grants}))
            await configstore.publish(client, CLUSTER_SCOPE, configdoc.build_doc(
                CLUSTER_SCOPE, [cluster_policy], {cluster_policy.name: grants}, {cluster_policy.name: ["bench"]}))

    asyncio.run(publish())
    labels = tmp / "labels"
    labels.write_text('app="bench"\n')
    return labels


def _layered_sidecar(procs: Procs, tmp: Path, upstream: str, redis: RedisServer) -> tuple[str, int]:
    """A sidecar in cluster mode whose pod is under the bench policy and a ClusterRateLimitPolicy
    with the same keys: every request takes both policies' buckets in one atomic script call
    (single Redis; on a Cluster they would be two calls)."""
    labels = publish_layered(redis.url, tmp)
    port, admin = pick_port(), pick_port()
    p = procs.start(sys.executable, "-m", "sluice_core.cli", "sidecar", "--upstream", upstream,
                    "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                    "--redis", redis.url, "--namespace", "bench", "--pod-labels", str(labels),
                    "--log-level", "warning", "--redis-timeout-ms", "1000")
    wait_http(f"http://127.0.0.1:{admin}/readyz")
    return f"http://127.0.0.1:{port}/", p.pid


def _start_express(procs: Procs, upstream: str, redis_url: str) -> tuple[str, int] | None:
    """The Express baseline, when node and npm are installed (dependencies from the lockfile)."""
    d = ROOT / "bench" / "express"
    if not (shutil.which("node") and shutil.which("npm")):
        print("note: node/npm not installed; skipping the Express baseline", file=sys.stderr)
        return None
    if not (d / "node_modules").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=d, check=True)
    port = pick_port()
    p = procs.start("node", str(d / "server.js"), str(port), upstream, redis_url)
    wait_http(f"http://127.0.0.1:{port}/")
    return f"http://127.0.0.1:{port}/", p.pid


def _row(name: str, goal: str, value: float | None, limit: float, unit: str, higher: bool = False) -> str:
    if value is None:
        return f"| {name} | {goal} | – | – |"
    ok = value >= limit if higher else value <= limit
    shown = f"{value:.2f} {unit}" if unit in ("×", "ms") else f"{value:.0f} {unit}"
    return f"| {name} | {goal} | {shown} | {'yes' if ok else '**no**'} |"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return binary
    m = re.search(r"v=(\S+)", out)
    return f"Redis {m.group(1)}" if m else out.strip()


if __name__ == "__main__":
    sys.exit(main())
