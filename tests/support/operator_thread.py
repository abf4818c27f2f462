"""The operator (kopf) in a thread of the test process (:class:`OperatorThread`, also used by the
kmock tests), logged in to the real API server (tests/support/control_plane.py) with the admin
client certificate; helpers to read what ``kubectl`` shows."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import json
import logging
import sys
import threading
import time
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

    operator = OperatorThread(registry=registry, namespaces=[namespaces], standalone=True)
    try:
        poll(operator.started, "operator ready")
        with redis_server.client() as redis:
            yield Operator(cp, redis, settings, metrics, reconciler)
    finally:
        operator.stop()


STOP_S = 20.0  # a stop flag to a stopped thread: kopf's cleanup, closing its clients
END_S = 10.0  # then every task of its loop cancelled again and again


class OperatorThread:
    """``kopf.operator(**kwargs)`` in a thread of its own, with its own loop (see
    ../shared/TESTING.md), started at once. :meth:`stop` never leaves it running: an operator
    that outlives its test goes on logging (its API server gone: urllib3's retry warnings) into
    the log capture of whatever test runs next, and fails that one instead."""

    def __init__(self, **kwargs: Any) -> None:
        self.stop_flag, self.ready = threading.Event(), threading.Event()
        self.errors: list[BaseException] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, args=(kwargs,), name="sluice-operator", daemon=True)
        self.thread.start()

    def _run(self, kwargs: dict[str, Any]) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await kopf.operator(stop_flag=self.stop_flag, ready_flag=self.ready, **kwargs)

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by started() or stop(), not lost in the thread
            self.errors.append(exc)

    def started(self) -> bool:
        """Ready (raises if it failed to start): a probe for poll()/eventually()."""
        assert not self.errors, f"the operator failed to start: {self.errors[0]!r}"
        return self.ready.is_set()

    def stop(self, timeout: float = STOP_S, end_s: float = END_S) -> None:
        """Set kopf's stop flag and wait; an operator still running after ``timeout`` fails the
        test here, loudly: the stacks of the threads and of the loop's tasks go to stderr, then
        the loop's tasks are cancelled until it ends. One that even then does not end is cut
        off from logging."""
        self.stop_flag.set()
        self.thread.join(timeout)
        if not self.thread.is_alive():
            return
        faulthandler.dump_traceback(all_threads=True)
        loop = self.loop
        for task in asyncio.all_tasks(loop) if loop is not None else ():
            task.print_stack(file=sys.stderr)
        ended = self.end(end_s)
        raise AssertionError(f"the operator did not stop within {timeout:.0f} s of its stop flag "
                             "(thread and task stacks on stderr); "
                             + ("ended by cancelling its tasks again" if ended
                                else "still running: its log records are dropped from now on"))

    def end(self, end_s: float) -> bool:
        """Cancel every task of the loop again until the thread ends (else cut it off from
        logging); False if it did not."""
        loop, deadline = self.loop, time.monotonic() + end_s

        def cancel_all() -> None:
            for task in asyncio.all_tasks():
                task.cancel()

        while loop is not None and self.thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(cancel_all)
            self.thread.join(0.2)
        if not self.thread.is_alive():
            return True
        executor = getattr(loop, "_default_executor", None)  # its to_thread calls log too
        silence = _DropThreads({self.thread, *getattr(executor, "_threads", ())})
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            if isinstance(logger, logging.Logger):
                logger.addFilter(silence)
        return False


class _DropThreads(logging.Filter):
    """Drops the records logged by these threads (a logger's filters see the records logged on
    it, whoever handles them; filters run in the logging thread). Thread objects, not idents:
    an ident is reused by a later thread once its thread ends."""

    def __init__(self, threads: set[threading.Thread]) -> None:
        super().__init__()
        self.threads = threads

    def filter(self, record: logging.LogRecord) -> bool:
        return threading.current_thread() not in self.threads
