"""``sluice demo``: the embedded default.

Starts a small demo upstream, a local ``redis-server`` when one is installed (else the
in-memory store), and the sidecar with the example policy (free / pro / enterprise tiers, a
strict ``POST /api/expensive`` rule, an unlimited ``/healthz``). With Redis it also starts the
usage collector (``sluice analytics`` on SQLite, :mod:`sluice_sidecar.demo_usage`). It then
shows 200s turning into 429s for each tier, prints the curl commands to try it yourself and the
commands that show the traffic per client, and serves until Ctrl-C (or ``--duration`` seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path

import aiohttp
from aiohttp import web
from sluice_core.policyfile import load_policies
from sluice_core.sidecar_settings import SidecarSettings

from sluice_sidecar import demo_usage
from sluice_sidecar.cli import setup_event_loop
from sluice_sidecar.server import Sidecar

HELP = "run a demo upstream behind the sidecar with the example policy"  # one line in `sluice --help`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8080, help="sidecar port (0: any free port)")
    parser.add_argument("--admin-port", type=int, default=9090, help="admin port (0: any free port)")
    parser.add_argument("--store", choices=["auto", "redis", "memory"], default="auto",
                        help="auto: a local redis-server when installed, else memory")
    parser.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: run until Ctrl-C)")
    parser.add_argument("--no-tour", action="store_true", help="skip the scripted tour")
    parser.add_argument("--analytics-port", type=int, default=9092,
                        help="the usage collector's API port, with Redis (0: any free port)")


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free port")


async def _upstream(port: int) -> web.AppRunner:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": "from the demo upstream", "path": request.path,
                                  "method": request.method})
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


class _RedisProcess:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sluice-demo-redis-")
        self.port = _free_port(0)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir,
             # What Sluice needs of any Redis (README, Redis requirements): full evicts buckets.
             "--maxmemory", "64mb", "--maxmemory-policy", "volatile-ttl"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


async def _tour(base: str) -> None:
    async with aiohttp.ClientSession() as http:
        async def show(title: str, method: str, path: str, n: int, key: str | None = None) -> None:
            print(f"\n{title}")
            codes = []
            last: dict[str, str] = {}
            for _ in range(n):
                headers = {"X-API-Key": key} if key else {}
                async with http.request(method, base + path, headers=headers) as r:
                    await r.read()
                    codes.append(str(r.status))
                    last = {k: v for k, v in r.headers.items() if "ratelimit" in k.lower() or k == "Retry-After"}
            print(f"  {method} {path} x{n}: {' '.join(codes)}")
            for k, v in last.items():
                print(f"    {k}: {v}")
        await show("free tier (anonymous, by IP: 5 per 10 s)", "GET", "/api/items", 7)
        await show("pro tier (X-API-Key: demo-pro-key, burst 20)", "GET", "/api/items", 22, "demo-pro-key")
        await show("enterprise tier (burst 200) - 5 requests", "GET", "/api/items", 5, "demo-enterprise-key")
        await show("strict rule: POST /api/expensive (2 per minute, per client)", "POST", "/api/expensive", 3, "demo-enterprise-key")
        await show("health check: never limited", "GET", "/healthz", 8)


async def _main(args: argparse.Namespace) -> int:
    upstream_port = _free_port(8000)
    port, admin_port = _free_port(args.port), _free_port(args.admin_port)
    redis: _RedisProcess | None = None
    if args.store in ("auto", "redis") and shutil.which("redis-server"):
        redis = _RedisProcess()
        redis.wait_ready()
    elif args.store == "redis":
        print("error: redis-server is not installed (Debian: apt-get install redis-server)")
        return 1
    examples = resources.files("sluice_core").joinpath("examples")
    policy = Path(str(examples.joinpath("public-api.yaml")))
    keys = Path(str(examples.joinpath("demo-keys.yaml")))
    up = await _upstream(upstream_port)
    redis_url = f"redis://127.0.0.1:{redis.port}" if redis else None
    settings = SidecarSettings(
        upstream=f"http://127.0.0.1:{upstream_port}", listen=f"127.0.0.1:{port}",
        admin_listen=f"127.0.0.1:{admin_port}", redis=redis_url,
        policy_file=str(policy), api_keys_file=str(keys), drain_s=0,
        usage_window_s=demo_usage.DEMO_USAGE_WINDOW_S)
    sidecar = Sidecar(settings)
    collector: demo_usage.DemoCollector | None = None
    try:
        if redis_url and demo_usage.available():
            collector = demo_usage.DemoCollector(redis_url, _free_port(args.analytics_port))
            await asyncio.to_thread(collector.wait_ready)
        await sidecar.start()
        base = f"http://127.0.0.1:{sidecar.data_port}"
        store = f"redis-server on 127.0.0.1:{redis.port}" if redis else "in-memory store (redis-server not installed)"
        print(f"Sluice demo: sidecar {base} -> demo upstream 127.0.0.1:{upstream_port}; buckets in {store}")
        print(f"policy: {policy}")
        if not args.no_tour:
            await _tour(base)
        print(f"""
Try it yourself (buckets refill: free 1 token / 2 s, pro 100 / min, enterprise 1000 / min):
  curl -i {base}/api/items                                        # free tier, by IP
  curl -i -H 'X-Forwarded-For: 198.51.100.7' {base}/api/items     # another client (the demo trusts 127.0.0.1 as a proxy)
  curl -i -H 'X-API-Key: demo-pro-key' {base}/api/items           # pro tier
  curl -i -H 'X-API-Key: demo-enterprise-key' {base}/api/items    # enterprise tier
  curl -i -X POST -H 'X-API-Key: demo-pro-key' {base}/api/expensive   # strict rule, cost 2
  curl -i {base}/healthz                                          # skipped: never limited
  curl -s http://127.0.0.1:{sidecar.admin_port}/metrics | grep sluice_decisions
  curl -s http://127.0.0.1:{sidecar.admin_port}/admin/config""")
        print(_usage_text(collector, sidecar.admin_port, load_policies(policy)[0].namespace))
        print(f"Serving {f'for {args.duration:.0f} s' if args.duration else 'until Ctrl-C'}.", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.duration or None):
                await stop.wait()
        print("\nstopping:", json.dumps(sidecar.components()))
    finally:
        await sidecar.stop()  # its last partial window goes to the stream first
        if collector:
            collector.stop()
        await up.cleanup()
        if redis:
            redis.stop()
    return 0


def _usage_text(collector: demo_usage.DemoCollector | None, admin_port: int, namespace: str) -> str:
    if collector is not None:
        return demo_usage.instructions(collector, namespace)
    why = "no Redis for the usage stream" if demo_usage.available() else "sluice_analytics is not installed"
    return f"""
Usage per client ({why}: this process only, the window being counted and the last one):
  curl -s http://127.0.0.1:{admin_port}/usage"""


def run(args: argparse.Namespace) -> int:
    setup_event_loop()
    return asyncio.run(_main(args))
