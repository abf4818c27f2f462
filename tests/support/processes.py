"""Sidecar and upstream *processes* for multi-process tests (contention, failover, cluster mode).

``SidecarProcess`` runs ``sluice sidecar`` as a real subprocess on free loopback ports and waits
for its admin port to answer; ``UpstreamProcess`` runs a tiny aiohttp app that answers 200.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from support.polling import wait_until
from support.redis_servers import pick_port

UPSTREAM_SOURCE = """
import asyncio, sys
from aiohttp import web
async def ok(request):
    await request.read()
    if request.path == "/slow":  # for drain tests: answers after ?s= seconds
        await asyncio.sleep(float(request.query.get("s", "1")))
    return web.Response(text="ok")
app = web.Application()
app.router.add_route("*", "/{tail:.*}", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class UpstreamProcess:
    """``source``: a Python program taking its port as its argument that answers ``GET /`` with
    200 (the default, :data:`UPSTREAM_SOURCE`, or a misbehaving one such as the attack suite's)."""

    def __init__(self, source: str = UPSTREAM_SOURCE) -> None:
        self.port = pick_port()
        self.proc = subprocess.Popen([sys.executable, "-c", source, str(self.port)])
        wait_until(lambda: http_get(f"{self.url}/")[0] == 200, 15, what="upstream")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


class SidecarProcess:
    def __init__(self, upstream: str, *args: str, env: dict[str, str] | None = None,
                 wait_ready: bool = True) -> None:
        self.port = pick_port()
        self.admin_port = pick_port()
        self.log = Path(tempfile.mkstemp(prefix="sluice-sidecar-", suffix=".log")[1])
        cmd = [sys.executable, "-m", "sluice_core.cli", "sidecar", "--upstream", upstream,
               "--listen", f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin_port}",
               *args]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})
        if wait_ready:
            self.wait_ready()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def wait_ready(self, timeout: float = 20) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited with {self.proc.returncode}:\n{self.output()}")
            return http_get(f"{self.admin}/readyz")[0] == 200
        wait_until(ready, timeout, what=f"sidecar ready\n{self.output()}")

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        _, body = http_get(f"{self.admin}/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.log.unlink(missing_ok=True)
