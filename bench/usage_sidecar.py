"""`make bench`: what usage analytics (#10 §1) cost a sidecar, measured in the same run against
the same sidecar with ``--usage off``. Written into docs/benchmarks.md between the usage markers.

- Proxy CPU per request (schedstat of the sidecar process, wrk load of 16 API keys over 64
  unmatched paths ``/items/<n>/x``, so each request is counted and its path normalised), usage on
  and off, in rounds in which both are loaded at once, each by its own wrk: a neighbour's load on
  a shared machine, which comes in bursts, then weighs on both alike (rounds taken one after the
  other, even alternating, drifted apart by more than the 5 % measured); the median of the
  rounds' on/off ratios, and their spread. The issue's bar: at most 5 % more. The in-process
  cost of the whole usage path (below, CPU time) is given beside it.
- Redis commands caused by usage: ``INFO commandstats`` ``cmdstat_xadd`` over the "on" rounds,
  per request and per window (``--usage-window-s 1`` here, so a round spans several windows):
  one XADD per window whatever the rate.
- In-process: the whole usage path of one request (its note, the
  decision appended, the proxy's timing, ``UsageAggregator.record`` with a cached client and
  endpoint), ``record`` alone, and the aggregator's memory after
  50,000 distinct clients over 150 paths in one window at the default bounds (tracemalloc).

Run alone: ``python -m bench.usage_sidecar [--seconds 8] [--rounds 3] [--out docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.redis_servers import RedisServer, pick_port  # noqa: E402

from bench import usage_instructions  # noqa: E402
from bench.report import write_block  # noqa: E402
from bench.run import POLICY, Procs, cpu_ns, wait_http, wrk  # noqa: E402

BEGIN, END = "<!-- bench-usage:begin -->", "<!-- bench-usage:end -->"
KEYS = [f"bench-key-{i:02d}" for i in range(16)]
WRK_SCRIPT = """
local keys = {%s}
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/items/" .. (n %% 64) .. "/x", {["X-API-Key"] = keys[(n %% #keys) + 1]})
end
"""
WINDOW_S = 1


def _sidecar_args(upstream: str, port: int, admin: int, policy: Path, keys: Path, redis: RedisServer,
                  usage: str, window_s: float = WINDOW_S) -> list[str]:
    return ["--upstream", upstream, "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
            "--policy-file", str(policy), "--api-keys-file", str(keys), "--redis", redis.url,
            "--log-level", "warning", "--redis-timeout-ms", "1000", "--usage", usage,
            "--usage-window-s", str(window_s)]


def _sidecar(procs: Procs, upstream: str, policy: Path, keys: Path, redis: RedisServer, usage: str) -> tuple[str, int]:
    port, admin = pick_port(), pick_port()
    p = procs.start(sys.executable, "-m", "sluice_core.cli", "sidecar",
                    *_sidecar_args(upstream, port, admin, policy, keys, redis, usage))
    wait_http(f"http://127.0.0.1:{admin}/readyz")
    return f"http://127.0.0.1:{port}/", p.pid


def _instructions(upstream: str, policy: Path, keys: Path, redis: RedisServer, script: Path, rounds: int,
                  seconds: float, work: Path) -> tuple[list[float], list[float]]:
    """Instructions per request (callgrind), usage on and off, one sidecar run each per round,
    the order swapped every round. No window ends while counting: under callgrind a window holds
    ~50x fewer requests than at full speed, so its flush would weigh ~50x too much per request
    (:func:`flush_cost` measures it apart)."""
    on: list[float] = []
    off: list[float] = []
    for i in range(rounds):
        for usage in ("on", "off") if i % 2 else ("off", "on"):
            port, admin = pick_port(), pick_port()
            args = _sidecar_args(upstream, port, admin, policy, keys, redis, usage, window_s=3600)
            (on if usage == "on" else off).append(
                usage_instructions.instructions_per_request(args, port, admin, script, seconds, work))
    return on, off


def _files(tmp: Path) -> tuple[Path, Path, Path]:
    """The policy, the keys file and the wrk script, written into ``tmp``."""
    policy, keys, script = tmp / "policy.yaml", tmp / "keys.yaml", tmp / "load.lua"
    policy.write_text(POLICY)
    keys.write_text("keys:\n" + "".join(f"  {k}: {{tier: pro, id: id-{k}}}\n" for k in KEYS))
    script.write_text(WRK_SCRIPT % ", ".join(f'"{k}"' for k in KEYS))
    return policy, keys, script


def sidecar_instructions(rounds: int, seconds: float, work: Path) -> tuple[list[float], list[float]]:
    """:func:`_instructions` with its own upstream and Redis (``python -m bench.usage_instructions``)."""
    policy, keys, script = _files(work)
    procs = Procs()
    redis = RedisServer()
    try:
        up_port = pick_port()
        procs.start(sys.executable, str(ROOT / "bench" / "upstream_app.py"), str(up_port))
        upstream = f"http://127.0.0.1:{up_port}"
        wait_http(upstream + "/")
        return _instructions(upstream, policy, keys, redis, script, rounds, seconds, work)
    finally:
        procs.close()
        redis.close()


def _pair(on: tuple[str, int], off: tuple[str, int], seconds: float, script: Path) -> tuple[float, float, int]:
    """CPU µs per request of the "on" and the "off" sidecar, each loaded by its own wrk at the
    same time (so whatever else runs on the machine weighs on both alike), and the "on" one's
    request count."""
    (on_url, on_pid), (off_url, off_pid) = on, off
    on_before, off_before = cpu_ns(on_pid), cpu_ns(off_pid)
    with ThreadPoolExecutor(2) as pool:
        on_run, off_run = pool.submit(wrk, on_url, seconds, 50, script), pool.submit(wrk, off_url, seconds, 50, script)
        r_on, r_off = on_run.result(), off_run.result()
    return ((cpu_ns(on_pid) - on_before) / 1000 / max(1, r_on.requests),
            (cpu_ns(off_pid) - off_before) / 1000 / max(1, r_off.requests), r_on.requests)


def usage_path_cost(n: int) -> float:
    """µs per request of everything usage adds to a request, as the server, limiter and proxy
    do it (one decision, a cached client and endpoint)."""
    from sluice_sidecar.usage_aggregate import UsageAggregator
    from sluice_sidecar.usage_note import UsageNote

    a = UsageAggregator(max_clients=1000, max_endpoints=100)
    paths = [f"/items/{i}/x" for i in range(64)]
    client = "kclient000000001"  # a variable: a tuple of constants would be built once, at compile time
    start = time.process_time()
    for i in range(n):
        note = UsageNote()  # the server's, handed to the limiter and the proxy as an argument
        note.append(("shop/api", False, client, "key-1", "pro", "", "allowed", 1))
        started = time.perf_counter_ns()  # as the proxy times the upstream
        note.status, note.latency_us = 200, (time.perf_counter_ns() - started) // 1000
        note.bytes_out = 11
        a.record(note, paths[i & 63])
    return (time.process_time() - start) / n * 1e6


def record_cost(n: int) -> float:
    """µs per ``UsageAggregator.record`` of a typical request (cached client and endpoint)."""
    from sluice_sidecar.usage_aggregate import UsageAggregator
    from sluice_sidecar.usage_note import UsageNote

    a = UsageAggregator(max_clients=1000, max_endpoints=100)
    notes = []
    for i in range(64):
        note = UsageNote()
        note.append(("shop/api", False, f"kclient{i % 16:09d}", f"key-{i % 16}", "pro", "",
                               "allowed", 1))
        note.status, note.latency_us, note.bytes_out = 200, 800 + i, 11
        notes.append(note)
    paths = [f"/items/{i}/x" for i in range(64)]
    start = time.process_time()
    for i in range(n):
        a.record(notes[i & 63], paths[i & 63])
    return (time.process_time() - start) / n * 1e6


def flush_cost(n: int) -> float:
    """µs of CPU to encode one window as the bench's sidecar ends it (16 clients, one endpoint),
    once per window whatever the rate."""
    from sluice_core import usage
    from sluice_sidecar.usage_aggregate import UsageAggregator
    from sluice_sidecar.usage_note import UsageNote

    a = UsageAggregator(max_clients=1000, max_endpoints=100)
    for i in range(1024):
        note = UsageNote()
        note.append(("shop/api", False, f"kclient{i % 16:09d}", f"key-{i % 16}", "pro", "", "allowed", 1))
        note.status, note.latency_us, note.bytes_out = 200, 500 + i * 37 % 20_000, 11
        a.record(note, f"/items/{i % 64}/x")
    window = a.take("bench", 0, "ns")
    start = time.process_time()
    for _ in range(n):
        usage.encode(window)
    return (time.process_time() - start) / n * 1e6


def flood_memory(clients: int) -> tuple[float, int]:
    """MiB the aggregator holds after ``clients`` distinct clients over 150 paths, and its rows."""
    from sluice_sidecar.usage_aggregate import UsageAggregator
    from sluice_sidecar.usage_note import UsageNote

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    a = UsageAggregator(max_clients=1000, max_endpoints=100)
    for i in range(clients):
        note = UsageNote()
        note.append(("shop/api", False, f"i10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "",
                               "free", "", "allowed", 1))
        note.status, note.latency_us = 200, 500 + i % 5000
        a.record(note, f"/r{i % 150}/{i}")
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / 2**20, len(a)


def _instruction_lines(on: list[float], off: list[float], rounds: int, seconds: int) -> tuple[str, str]:
    """The table row and the note of the instruction counts (callgrind)."""
    if not on:
        why = "not measured (`--callgrind-rounds 0`)" if not rounds else "not measured: valgrind is not installed"
        return f"| proxy instructions per request (callgrind) | – | – | – | ≤ 1.05× | {why} |", ""
    ratio = statistics.median(a / b for a, b in zip(on, off, strict=True))
    return (f"| proxy instructions per request (callgrind) | {statistics.median(off) / 1000:.0f} k | "
            f"{statistics.median(on) / 1000:.0f} k | {ratio:.3f}× | ≤ 1.05× | {'yes' if ratio <= 1.05 else '**no**'} |",
            f"Instructions (callgrind, {rounds} rounds of {seconds} s of wrk -c{usage_instructions.CONNECTIONS} "
            f"load per sidecar, order swapped each round; unmoved by the machine's load): on "
            f"{', '.join(f'{c / 1000:.1f}' for c in on)} k; off {', '.join(f'{c / 1000:.1f}' for c in off)} k "
            "per request.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--callgrind-rounds", type=int, default=3,
                    help="rounds of instruction counts (callgrind; 0: none, as without valgrind)")
    ap.add_argument("--callgrind-seconds", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-usage-"))
    policy, keys, script = _files(tmp)
    procs = Procs()
    redis = RedisServer()
    on_cpu: list[float] = []
    off_cpu: list[float] = []
    xadds = requests_on = 0
    on_seconds = 0.0
    try:
        up_port = pick_port()
        procs.start(sys.executable, str(ROOT / "bench" / "upstream_app.py"), str(up_port))
        upstream = f"http://127.0.0.1:{up_port}"
        wait_http(upstream + "/")
        on_url, on_pid = _sidecar(procs, upstream, policy, keys, redis, "on")
        off_url, off_pid = _sidecar(procs, upstream, policy, keys, redis, "off")
        print(f"measuring usage on/off ({args.rounds} rounds of {args.seconds} s, both at once) ...", flush=True)
        wrk(on_url, 2, 50, script)  # warm-up
        wrk(off_url, 2, 50, script)
        for _ in range(args.rounds):
            redis.execute("CONFIG", "RESETSTAT")
            started = time.monotonic()
            on, off, n = _pair((on_url, on_pid), (off_url, off_pid), args.seconds, script)
            time.sleep(WINDOW_S * 1.5)  # the run's last window is written before counting
            on_seconds += time.monotonic() - started
            stats = redis.execute("INFO", "commandstats")
            xadds += int(stats.get("cmdstat_xadd", {}).get("calls", 0))
            requests_on += n
            on_cpu.append(on)
            off_cpu.append(off)
        ir_on: list[float] = []
        ir_off: list[float] = []
        if args.callgrind_rounds and usage_instructions.available():
            print(f"counting instructions ({args.callgrind_rounds} rounds of {args.callgrind_seconds} s per sidecar, "
                  "callgrind) ...", flush=True)
            ir_on, ir_off = _instructions(upstream, policy, keys, redis, script, args.callgrind_rounds,
                                          args.callgrind_seconds, tmp)
    finally:
        procs.close()
        redis.close()
    path_us = usage_path_cost(200_000)
    record_us = record_cost(200_000)
    flush_us = flush_cost(2_000)
    flood_mib, flood_rows = flood_memory(50_000)
    on, off = statistics.median(on_cpu), statistics.median(off_cpu)
    ratios = [a / b for a, b in zip(on_cpu, off_cpu, strict=True)]
    ratio = statistics.median(ratios)
    windows = on_seconds / WINDOW_S
    ir_row, ir_note = _instruction_lines(ir_on, ir_off, args.callgrind_rounds, args.callgrind_seconds)
    lines = [BEGIN, "",
             f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores, Python "
             f"{platform.python_version()}: one sidecar with usage counting on and one with `--usage off`, "
             f"same policy, Redis store, wrk -t1 -c50, 16 API keys over 64 unmatched paths, "
             f"{args.rounds} rounds of {args.seconds} s, both sidecars loaded at once, each by its own wrk "
             "(medians; the ratio is the median of the rounds' ratios). Command: `make bench` "
             "(`python -m bench.usage_sidecar`).", "",
             "| measure | usage off | usage on | ratio | goal (#10) | met |",
             "|---|---:|---:|---:|---|---|",
             f"| proxy CPU per request | {off:.0f} µs | {on:.0f} µs | {ratio:.3f}× | ≤ 1.05× | "
             f"{'yes' if ratio <= 1.05 else '**no**'} |",
             ir_row,
             f"| usage's own path per request, in-process | – | {path_us:.2f} µs | "
             f"{1 + path_us / off:.3f}× of the off CPU | ≤ 1.05× | {'yes' if path_us / off <= 0.05 else '**no**'} |",
             f"| Redis commands per request caused by usage (`cmdstat_xadd`) | 0 | {xadds / max(1, requests_on):.2g} "
             f"({xadds} XADD for {requests_on:,} requests) | – | one XADD per window | "
             f"{'yes' if xadds <= windows + args.rounds else '**no**'} |",
             f"| XADD per {WINDOW_S} s window | – | {xadds / max(1.0, windows):.2f} | – | 1 | "
             f"{'yes' if xadds <= windows + args.rounds else '**no**'} |",
             "", f"The rounds: on {', '.join(f'{c:.0f}' for c in on_cpu)} µs; off {', '.join(f'{c:.0f}' for c in off_cpu)} µs; "
             f"on/off {', '.join(f'{a / b:.3f}' for a, b in zip(on_cpu, off_cpu, strict=True))} "
             f"(spread {min(ratios):.3f}–{max(ratios):.3f}).",
             ir_note,
             f"In-process: the whole usage path of a request (note, decision, timing, "
             f"`record`) **{path_us:.2f} µs**; `record` alone **{record_us:.2f} µs** (one "
             f"decision, known client and endpoint, path normalised); a window's encoding at its end **{flush_us:.0f} µs** "
             f"({WINDOW_S} s windows of the rounds above: {flush_us / max(1.0, requests_on / max(1.0, windows)):.3f} µs "
             f"a request); after 50,000 distinct clients over 150 "
             f"paths in one window at the default bounds (1,000 clients, 100 endpoints) it holds "
             f"**{flood_mib:.1f} MiB** in {flood_rows:,} rows (tracemalloc).",
             "", END]
    block = "\n".join(lines)
    print(block)
    write_block(Path(args.out), BEGIN, END, block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
