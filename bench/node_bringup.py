"""`make bench`: what the e2e tests' one-node cluster costs (issue #12): bring-up
(``hack/node/up.sh``: nothing to CoreDNS Ready), a Pod answering through a ClusterIP Service,
teardown (``hack/node/down.sh``), and the cluster's peak memory (RSS of the node's processes
and containers, sampled every 0.2 s). Baseline, measured in the same run: the suite's own
control plane (etcd + kube-apiserver + kube-controller-manager, tests/support/control_plane.py),
which every tests/k8s session starts. Needs root (the node does). Written into
docs/benchmarks.md between the bench-node markers.

Run alone: ``python -m bench.node_bringup [--cycles 3] [--out docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.control_plane import ControlPlane  # noqa: E402
from support.node import NODE_EXES, NodeSession  # noqa: E402

from bench.report import write_block  # noqa: E402

BEGIN, END = "<!-- bench-node:begin -->", "<!-- bench-node:end -->"
CONTAINER_EXES = frozenset({"httpd"})  # the workload's process below
CLIENTS = frozenset({"kubectl"})  # they name the node's kubeconfig, but are not the cluster


class RssSampler(threading.Thread):
    """Peak of the summed RSS of the node's processes (those naming ``marker`` in their
    arguments, the node's executables and the workload's), per executable at the peak."""

    def __init__(self, marker: str) -> None:
        super().__init__(daemon=True)
        self.marker = marker.encode()
        self.peak: tuple[int, dict[str, int]] = (0, {})
        self.stop = threading.Event()

    def sample(self) -> tuple[int, dict[str, int]]:
        per: dict[str, int] = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes()
                exe = os.path.basename(argv.split(b"\0", 1)[0].decode())
                if exe in CLIENTS or not (self.marker in argv or exe in NODE_EXES
                                          or exe in CONTAINER_EXES):
                    continue
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            rss = next((int(line.split()[1]) for line in status.splitlines()
                        if line.startswith("VmRSS:")), 0)
            per[exe] = per.get(exe, 0) + rss
        return sum(per.values()), per

    def run(self) -> None:
        while not self.stop.wait(0.2):
            current = self.sample()
            if current[0] > self.peak[0]:
                self.peak = current


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@dataclass
class NodeRun:
    up: float
    pod: float
    down: float
    peak_kib: int
    per_exe_kib: dict[str, int]


def node_cycle() -> NodeRun:
    session = NodeSession()
    t0 = time.monotonic()
    node = session.ensure_up()
    up = time.monotonic() - t0
    sampler = RssSampler(str(node.dir))
    sampler.start()
    ns = node.make_namespace()
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "web"}},
           "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
               "name": "web", "image": "localhost/sluice-e2e-busybox:1",
               "imagePullPolicy": "Never",
               "command": ["sh", "-c", "mkdir -p /tmp/w && hostname > /tmp/w/index.html && "
                                       "exec httpd -f -p 8080 -h /tmp/w"]}]}}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    t1 = time.monotonic()
    node.kubectl("apply", "-n", ns, "-f", "-",
                 input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [pod, svc]}))
    ip = node.kubectl("get", "-n", ns, "service", "web", "-o",
                      "jsonpath={.spec.clusterIP}").stdout
    deadline = time.monotonic() + 120
    while not _answers(f"http://{ip}/"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the ClusterIP {ip} did not answer within 120 s")
        time.sleep(0.05)
    pod_answers = time.monotonic() - t1
    sampler.stop.set()
    sampler.join()
    t2 = time.monotonic()
    session.down()
    down = time.monotonic() - t2
    return NodeRun(up, pod_answers, down, sampler.peak[0], sampler.peak[1])


def control_plane_cycle() -> dict[str, float]:
    t0 = time.monotonic()
    cp = ControlPlane()
    up = time.monotonic() - t0
    t1 = time.monotonic()
    cp.close()
    return {"up": up, "down": time.monotonic() - t1}


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} s (min {min(xs):.1f}, max {max(xs):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--cycles", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("error: bench.node_bringup needs root (the one-node cluster does)")
    base = [control_plane_cycle() for _ in range(args.cycles)]
    runs = [node_cycle() for _ in range(args.cycles)]
    ups = [r.up for r in runs]
    base_up = statistics.median(b["up"] for b in base)
    peak = max(runs, key=lambda r: r.peak_kib)
    per = ", ".join(f"{k} {v / 1024:.0f}" for k, v in
                    sorted(peak.per_exe_kib.items(), key=lambda kv: -kv[1]))
    load = os.getloadavg()[0]
    lines = [
        BEGIN, "",
        f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {args.cycles} cycles each, "
        f"load average {load:.1f} at the end, binaries and images already built. Command: "
        "`make bench` (`python -m bench.node_bringup`, as root).", "",
        "| | bring-up | a Pod answering through a ClusterIP, from `kubectl apply` | teardown |",
        "|---|---|---|---|",
        f"| one-node cluster (`hack/node/up.sh`, to CoreDNS Ready) | {_med(ups)} | "
        f"{_med([r.pod for r in runs])} | {_med([r.down for r in runs])} |",
        f"| baseline: the suite's control plane (tests/k8s) | {_med([b['up'] for b in base])} | — | "
        f"{_med([b['down'] for b in base])} |",
        "",
        f"Bring-up of the whole node = {statistics.median(ups) / base_up:.1f} × the control plane's. "
        f"Peak RSS of the cluster with CoreDNS and one web Pod: "
        f"{peak.peak_kib / 1024:.0f} MiB ({per} MiB).",
        "", END]
    block = "\n".join(lines)
    print(block)
    write_block(Path(args.out), BEGIN, END, block)


if __name__ == "__main__":
    main()
