"""A pod's termination under load, with an app that exits at once on SIGTERM (most do): no 5xx.

The kubelet's part is played here, in the order it acts for an injected pod (#12, defect 3):

- native sidecar (an init container with ``restartPolicy: Always``): the app's preStop hook
  (``GET /drain`` on the sidecar's admin port, which the injector adds) runs first; when it
  answers, the app gets SIGTERM; once the app is gone, the sidecar gets SIGTERM;
- older clusters (the sidecar an ordinary container): the sidecar gets SIGTERM at once, while
  the app's preStop hook runs; the app gets SIGTERM when the hook answers.

A client keeps one keep-alive connection busy meanwhile, reconnecting when told ``Connection:
close``, as a client behind a Service does. The Service stops sending it new connections a
moment after the pod began terminating (kube-proxy's propagation, well inside ``--drain-s``);
requests on a connection already open keep coming (the keep-alive case that got 424 × 502).
It must never see a 5xx nor a request left unanswered: the sidecar keeps serving while the
endpoint is removed, tells keep-alive clients to go, stops accepting, and only then lets the
app stop.
"""

from __future__ import annotations

import http.client
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.polling import wait_until
from support.processes import SidecarProcess, UpstreamProcess, http_get

TOKEN = "t0k3n-for-this-pod"
# The app: answers 200, and exits the moment it gets SIGTERM (no graceful shutdown of its own).
APP_SOURCE = """
import os, signal, sys
from aiohttp import web
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
async def ok(request):
    await request.read()
    return web.Response(text="ok")
app = web.Application()
app.router.add_route("*", "/{tail:.*}", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None, handle_signals=False)
"""
PROPAGATION_S = 0.3  # endpoint removal reaching kube-proxy; --drain-s is 1.0
POLICY = ("apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: p}\n"
          "spec:\n  tiers: [{name: free, requests: 1000000, period: 1s}]\n")


class Client(threading.Thread):
    """Requests on one keep-alive connection; a new connection after ``Connection: close``,
    until the Service routes new connections elsewhere (:meth:`pod_terminating`); stops then."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.statuses: Counter[int] = Counter()
        self.told_to_close = 0
        self.broken: list[str] = []  # a request sent and no answer: what a client would retry
        self.stopping = threading.Event()
        self._elsewhere_at = float("inf")

    def pod_terminating(self) -> None:
        """The pod began terminating: its endpoint is removed; new connections go elsewhere
        once kube-proxy has it."""
        self._elsewhere_at = time.monotonic() + PROPAGATION_S

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self.stopping.is_set():
            if conn is None:
                if time.monotonic() >= self._elsewhere_at:
                    return  # served by another replica from here on
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
            except (http.client.HTTPException, OSError) as exc:
                self.broken.append(repr(exc))
                conn.close()
                conn = None
                continue
            self.statuses[resp.status] += 1
            if (resp.getheader("Connection") or "").lower() == "close":
                self.told_to_close += 1
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


@pytest.fixture
def app() -> Iterator[UpstreamProcess]:
    up = UpstreamProcess(APP_SOURCE)
    try:
        yield up
    finally:
        up.close()


def prestop(admin: str, token: str = TOKEN) -> int:
    """The kubelet's httpGet preStop hook: no timeout of its own (the grace period bounds it)."""
    req = urllib.request.Request(admin + "/drain", headers={"X-Sluice-Drain-Token": token})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def start(app: UpstreamProcess, tmp_path: Path) -> tuple[SidecarProcess, Client]:
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    sidecar = SidecarProcess(app.url, "--policy-file", str(policy), "--drain-s", "1.0",
                             "--shutdown-timeout-s", "5", "--drain-token", TOKEN)
    client = Client(sidecar.port)
    client.start()
    wait_until(lambda: client.statuses[200] >= 20, 15, what="traffic flowing")
    return sidecar, client


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def finish(sidecar: SidecarProcess, client: Client) -> None:
    client.join(10)
    assert not client.is_alive()
    fivexx = {s: n for s, n in client.statuses.items() if s >= 500}
    assert not fivexx, (fivexx, sidecar.output())
    assert client.statuses[200] >= 20
    assert client.told_to_close >= 1  # the keep-alive connection was sent away while draining
    assert not client.broken, client.broken


def test_native_sidecar_termination_answers_no_5xx(app: UpstreamProcess, tmp_path: Path) -> None:
    sidecar, client = start(app, tmp_path)
    try:
        client.pod_terminating()
        assert prestop(sidecar.admin) == 200  # drained: no longer accepting
        assert http_get(sidecar.admin + "/readyz")[0] == 503
        assert refuses_connections(sidecar.port)
        app.proc.send_signal(signal.SIGTERM)
        assert app.proc.wait(10) == 0
        sidecar.proc.send_signal(signal.SIGTERM)  # after the app, as the kubelet does
        assert sidecar.proc.wait(20) == 0
        finish(sidecar, client)
    finally:
        client.stopping.set()
        sidecar.close()


def test_ordinary_container_termination_answers_no_5xx(app: UpstreamProcess, tmp_path: Path) -> None:
    """Older clusters: the sidecar's SIGTERM and the app's preStop hook at the same time."""
    sidecar, client = start(app, tmp_path)
    try:
        hook: dict[str, int] = {}

        def app_prestop_then_sigterm() -> None:
            hook["status"] = prestop(sidecar.admin)
            app.proc.send_signal(signal.SIGTERM)

        client.pod_terminating()
        t = threading.Thread(target=app_prestop_then_sigterm)
        t.start()
        sidecar.proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert hook["status"] == 200
        assert app.proc.wait(10) == 0
        assert sidecar.proc.wait(20) == 0
        finish(sidecar, client)
    finally:
        client.stopping.set()
        sidecar.close()


def test_drain_needs_the_token(app: UpstreamProcess, tmp_path: Path) -> None:
    """Whoever reaches the admin port cannot take the pod out of service."""
    sidecar, client = start(app, tmp_path)
    try:
        assert prestop(sidecar.admin, token="guess") == 403
        assert prestop(sidecar.admin, token="") == 403
        assert http_get(sidecar.admin + "/readyz")[0] == 200
        assert sidecar.proc.poll() is None
    finally:
        client.stopping.set()
        client.join(10)
        sidecar.close()
    assert not any(s >= 500 for s in client.statuses)


def test_drain_is_off_without_a_token(app: UpstreamProcess, tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    sidecar = SidecarProcess(app.url, "--policy-file", str(policy))
    try:
        assert prestop(sidecar.admin) == 404
        assert http_get(sidecar.admin + "/readyz")[0] == 200
    finally:
        sidecar.close()

