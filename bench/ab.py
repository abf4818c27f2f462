"""Paired A/B of two source trees: is a change to the hot path faster or slower?

Whole ``make bench`` runs drift by several µs of proxy CPU per request between runs on this
machine, more than most changes cost. This runs a sidecar from each tree side by side (one
Redis, one upstream, the same policies and keys as ``bench.run``) and alternates short wrk runs
between them, swapping which goes first every round (the first of a pair measured up to 1.5 µs
dearer), so drift and order hit both alike. Prints proxy CPU µs per request per round and the
medians. Not part of ``make bench``; for measuring a change before it lands, e.g.:

    git worktree add --detach /tmp/before <commit>
    python -m bench.ab /tmp/before . --scenario layered --rounds 6
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.redis_servers import RedisServer, pick_port  # noqa: E402

from bench.run import KEYS, POLICY, WRK_SCRIPT, Procs, cpu_ns, publish_layered, wait_http, wrk  # noqa: E402

SCENARIOS = ("layered", "redis", "memory")


def _sidecar(procs: Procs, tree: Path, scenario: str, upstream: int, redis: RedisServer,
             tmp: Path, labels: Path | None) -> tuple[str, int]:
    port, admin = pick_port(), pick_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(tree / p) for p in ("core", "sidecar", "operator")))
    cmd = [sys.executable, "-m", "sluice_core.cli", "sidecar", "--upstream", f"http://127.0.0.1:{upstream}",
           "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
           "--log-level", "warning", "--redis-timeout-ms", "1000"]
    if labels is not None:  # layered: cluster mode, the config published in Redis
        cmd += ["--redis", redis.url, "--namespace", "bench", "--pod-labels", str(labels)]
    else:
        cmd += ["--policy-file", str(tmp / "policy.yaml"), "--api-keys-file", str(tmp / "keys.yaml")]
        if scenario == "redis":
            cmd += ["--redis", redis.url]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.procs.append(p)
    wait_http(f"http://127.0.0.1:{admin}/readyz")
    return f"http://127.0.0.1:{port}/", p.pid


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="the tree before (a checkout: its core/, sidecar/, operator/)")
    ap.add_argument("b", type=Path, help="the tree after")
    ap.add_argument("--scenario", choices=SCENARIOS, default="layered")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sluice-ab-"))
    (tmp / "policy.yaml").write_text(POLICY)
    (tmp / "keys.yaml").write_text("keys:\n" + "".join(f"  {k}: pro\n" for k in KEYS))
    script = tmp / "keys.lua"
    script.write_text(WRK_SCRIPT % (", ".join(f'"{k}"' for k in KEYS), ""))
    procs, redis = Procs(), RedisServer()
    try:
        upstream = pick_port()
        procs.start(sys.executable, str(ROOT / "bench" / "upstream_app.py"), str(upstream))
        wait_http(f"http://127.0.0.1:{upstream}/")
        labels = publish_layered(redis.url, tmp) if args.scenario == "layered" else None
        sidecars = {name: _sidecar(procs, tree.resolve(), args.scenario, upstream, redis, tmp, labels)
                    for name, tree in (("a", args.a), ("b", args.b))}
        for url, _ in sidecars.values():
            wrk(url, 2, 50, script)  # warm-up
        cpu: dict[str, list[float]] = {"a": [], "b": []}
        for round_ in range(args.rounds):
            for name in ("a", "b") if round_ % 2 == 0 else ("b", "a"):
                url, pid = sidecars[name]
                before = cpu_ns(pid)
                r = wrk(url, args.seconds, 50, script)
                cpu[name].append((cpu_ns(pid) - before) / 1000 / r.requests)
        for name, tree in (("a", args.a), ("b", args.b)):
            rounds = " ".join(f"{c:.1f}" for c in cpu[name])
            print(f"{name} {tree}: proxy CPU µs/request {rounds}  median {statistics.median(cpu[name]):.1f}")
        print(f"b - a: {statistics.median(cpu['b']) - statistics.median(cpu['a']):+.1f} µs/request "
              f"({args.scenario}, {args.rounds} rounds of {args.seconds} s, order alternating)")
    finally:
        procs.close()
        redis.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
