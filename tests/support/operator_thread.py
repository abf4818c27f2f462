"""The operator (kopf) in a thread of the test process, logged in to the real API server
(tests/support/control_plane.py) with the admin client certificate; helpers to read what
``kubectl`` shows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes import config as k8s_config
from sluice_core import configstore
from sluice_operator.handlers import build_registry
from sluice_operator.metrics import OperatorMetrics
from sluice_operator.reconcile import Reconciler
from sluice_operator.settings import OperatorSettings

from support.control_plane import ControlPlane
from support.polling import poll
from support.store_calls import store_call


@dataclass
class Operator:
    cp: ControlPlane
    redis: Any  # the test's own redis-py client (the operator's is in the operator's loop)
    settings: OperatorSettings
    metrics: OperatorMetrics
    reconciler: Reconciler  # lives in the operator's loop: read only (e.g. its pending recounts)

    def config(self, ns: str) -> Any:
        return store_call(self.settings.redis, configstore.read, ns)

    def get(self, kind: str, name: str, ns: str | None = None) -> dict[str, Any] | None:
        where = ["-n", ns] if ns else []
        res = self.cp.kubectl("get", kind, name, *where, "-o", "json", check=False)
        if res.returncode != 0:
            assert "NotFound" in res.stderr, res.stderr
            return None
        return dict(json.loads(res.stdout))

    def rlp(self, ns: str, name: str) -> dict[str, Any] | None:
        return self.get("rlp", name, ns)


@contextlib.contextmanager
def running_operator(cp: ControlPlane, redis_server: Any, namespaces: str,
                     **settings_kw: Any) -> Iterator[Operator]:
    """kopf in its own thread and loop (see ../shared/TESTING.md), serving the namespaced
    policies of the namespaces matching the kopf pattern ``namespaces`` only, so that other
    test files' policies are left alone."""
    settings_kw.setdefault("resync_interval_s", 2.0)
    settings = OperatorSettings(redis=redis_server.url, heartbeat_stale_s=30, **settings_kw)
    metrics = OperatorMetrics()
    reconciler = Reconciler(configstore.connect(redis_server.url), metrics)  # closed at kopf's cleanup
    registry = build_registry(
        settings, reconciler,
        api_client=lambda: k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(cp.kubeconfig)))

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=cp.server, ca_path=str(cp.ca_cert),
                                   certificate_path=str(cp.client_cert),
                                   private_key_path=str(cp.client_key))

    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(kopf.operator(registry=registry, namespaces=[namespaces],
                                      standalone=True, stop_flag=stop, ready_flag=ready))
        except BaseException as exc:  # reported by the fixture, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="sluice-operator", daemon=True)
    thread.start()
    try:
        poll(lambda: ready.is_set() or errors, "operator ready")
        assert not errors, f"the operator failed to start: {errors[0]!r}"
        with redis_server.client() as redis:
            yield Operator(cp, redis, settings, metrics, reconciler)
    finally:
        stop.set()
        thread.join(20)
        assert not thread.is_alive(), "the operator thread did not stop within 20 s"
