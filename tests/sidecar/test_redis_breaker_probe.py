"""The circuit breaker's probe and log lines, against real sidecar processes and redis-servers.

- The probe checks what a decision needs, under the decision timeout: a Redis slower than
  ``--redis-timeout-ms`` (but quick to accept connections) keeps the breaker open, without
  flapping; once it answers fast again the breaker closes by itself.
- Each transition is one log line (the breaker's), not two.
- A wrong password is said at start (ERROR, reason ``auth``), before any client request.
- The pause between probes is never shorter than the probe interval, whatever the cooldown.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from pathlib import Path

import pytest
from sluice_core import keyschema, scripts
from sluice_core.redisurl import parse_redis_url
from sluice_sidecar.breaker import PROBE_INTERVAL_S, CircuitBreaker, State
from sluice_sidecar.stores.base import StoreUnavailable
from sluice_sidecar.stores.redis import RedisStore
from sluice_sidecar.transport.errors import AUTH
from support.polling import wait_until
from support.processes import SidecarProcess, UpstreamProcess, http_get
from support.redis_servers import RedisClusterProcs, RedisServer
from support.sidecar_harness import policy_doc


def policy(tmp_path: Path) -> Path:
    f = tmp_path / "policy.yaml"
    f.write_text(json.dumps(policy_doc(failureMode="open")))
    return f


class DelayingRelay:
    """A TCP relay to Redis on 127.0.0.1 that holds every reply ``delay`` seconds (in its own
    thread and event loop, so the synchronous test code around it can block). Connections are
    accepted at once: only answers are slow, as with a Redis busy with slow commands."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),),
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the relay did not start")

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
        # The relayed connections end with the relay (the loop is its own): left pending, they
        # were destroyed at some later garbage collection, in whatever test ran then, their
        # pumps closing writers on a closed loop (an unraisable error that failed that test).
        clients = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            r_reader, r_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, slow: bool) -> None:
            try:
                while data := await src.read(65536):
                    if slow and self.delay:
                        await asyncio.sleep(self.delay)  # the simulated latency, not a wait for anything
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pump(reader, r_writer, False), pump(r_reader, writer, True))
        except asyncio.CancelledError:
            return  # the relay stops (ended, not cancelled: asyncio 3.11 logs a cancelled one)

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()


def test_a_redis_slower_than_the_decision_timeout_keeps_the_breaker_open(
        upstream_process: UpstreamProcess, tmp_path: Path) -> None:
    with RedisServer() as r:
        relay = DelayingRelay(r.port)
        sidecar = SidecarProcess(upstream_process.url, "--redis", f"redis://127.0.0.1:{relay.port}",
                                 "--policy-file", str(policy(tmp_path)), "--redis-timeout-ms", "50",
                                 "--redis-connect-timeout-ms", "2000", "--breaker-threshold", "3",
                                 "--breaker-cooldown-s", "0.2")
        try:
            assert http_get(sidecar.url + "/a")[0] == 200
            assert sidecar.metric("sluice_decisions_total", decision="allowed") == 1
            # Between the two timeouts: every decision times out, every connect succeeds.
            relay.delay = 0.3
            wait_until(lambda: http_get(sidecar.url + "/a", timeout=5)[0] == 200
                       and sidecar.metric("sluice_circuit_state") == 1, 20, what="the breaker open")

            def probes() -> tuple[float, float]:
                return (sidecar.metric("sluice_store_probes_total", result="failed"),
                        sidecar.metric("sluice_store_probes_total", result="ok"))
            # Ten probes in a row while Redis stays slow: none may pass (a pass closes the
            # breaker, and the next requests reopen it: a flap every cooldown).
            wait_until(lambda: probes()[0] >= 10 or probes()[1] > 0, 60, what="ten probes")
            failed, ok = probes()
            assert ok == 0, f"a probe passed against a Redis slower than the decision timeout ({failed} failed)"
            assert sidecar.metric("sluice_circuit_state") == 1
            # Fast again: the breaker closes by itself and the next request is decided by Redis.
            relay.delay = 0.0
            wait_until(lambda: sidecar.metric("sluice_circuit_state") == 0, 20, interval=0.05,
                       what="the breaker closed")
            before = sidecar.metric("sluice_decisions_total", decision="allowed")
            assert http_get(sidecar.url + "/a")[0] == 200
            assert sidecar.metric("sluice_decisions_total", decision="allowed") == before + 1
            opened = [line for line in sidecar.output().splitlines() if "decision store failing" in line]
            assert len(opened) == 1, sidecar.output()
        finally:
            sidecar.close()
            relay.close()


def test_each_breaker_transition_is_one_log_line(upstream_process: UpstreamProcess, tmp_path: Path) -> None:
    with RedisServer() as r:
        sidecar = SidecarProcess(upstream_process.url, "--redis", r.url, "--policy-file", str(policy(tmp_path)),
                                 "--breaker-threshold", "3", "--breaker-cooldown-s", "0.2")
        try:
            assert http_get(sidecar.url + "/a")[0] == 200
            r.kill()
            try:
                wait_until(lambda: http_get(sidecar.url + "/a", timeout=5)[0] == 200
                           and sidecar.metric("sluice_circuit_state") == 1, 20, what="the breaker open")
            finally:
                r.restart()
            wait_until(lambda: sidecar.metric("sluice_circuit_state") == 0, 20, interval=0.05,
                       what="the breaker closed")
            wait_until(lambda: "deciding again" in sidecar.output(), 10, what="the recovery line")
            lines = [line for line in sidecar.output().splitlines()
                     if "sluice.store" in line or "circuit" in line]
            assert len(lines) == 2, sidecar.output()
            assert " ERROR " in lines[0] and "failing (unavailable)" in lines[0], lines
            assert " WARNING " in lines[1] and "deciding again" in lines[1], lines
        finally:
            sidecar.close()


def test_one_slow_answer_at_start_does_not_open_the_breaker(upstream_process: UpstreamProcess,
                                                             tmp_path: Path) -> None:
    """A slow first answer (a cold Redis) is one failure towards the threshold, as for a
    decision; opening on it would answer every request by the failure mode for a cooldown."""
    with RedisServer() as r:
        relay = DelayingRelay(r.port)
        relay.delay = 0.3  # slower than the decision timeout, faster than the connect timeout
        sidecar = SidecarProcess(upstream_process.url, "--redis", f"redis://127.0.0.1:{relay.port}",
                                 "--policy-file", str(policy(tmp_path)), "--redis-timeout-ms", "50",
                                 "--redis-connect-timeout-ms", "2000", "--breaker-cooldown-s", "30")
        try:
            wait_until(lambda: "slow at start" in sidecar.output()
                       or "decision store failing" in sidecar.output(), 10,
                       what=f"the start probe's verdict\n{sidecar.output()}")
            assert "decision store failing" not in sidecar.output(), sidecar.output()
            assert sidecar.metric("sluice_circuit_state") == 0
            relay.delay = 0.0  # Redis answers in time again: requests are decided by it (the
            # relay may still be holding the slow first answer back for a moment)
            wait_until(lambda: http_get(sidecar.url + "/a")[0] == 200
                       and sidecar.metric("sluice_decisions_total", decision="allowed") >= 1, 10,
                       what="a decision by Redis")
            assert sidecar.metric("sluice_circuit_state") == 0
        finally:
            sidecar.close()
            relay.close()


def test_a_wrong_password_is_said_at_start(upstream_process: UpstreamProcess, tmp_path: Path) -> None:
    with RedisServer() as r:
        r.execute("CONFIG", "SET", "requirepass", "the-right-one")
        sidecar = SidecarProcess(upstream_process.url, "--redis", f"redis://:not-it-4e1c@127.0.0.1:{r.port}",
                                 "--policy-file", str(policy(tmp_path)), "--breaker-cooldown-s", "0.2")
        try:  # ready (Redis may be fixed later), and not one client request is sent
            wait_until(lambda: "decision store failing" in sidecar.output(), 10,
                       what=f"the ERROR line at start\n{sidecar.output()}")
            errors = [line for line in sidecar.output().splitlines() if " ERROR " in line]
            assert len(errors) == 1 and "failing (auth)" in errors[0], errors
            assert "not-it-4e1c" not in sidecar.output()
            assert sidecar.metric("sluice_circuit_state") == 1
            assert sidecar.metric("sluice_decisions_total") == 0
            # The right password set later: the background probe closes the breaker.
            with r.client(password="the-right-one") as admin:
                admin.config_set("requirepass", "not-it-4e1c")
            wait_until(lambda: sidecar.metric("sluice_circuit_state") == 0, 20, interval=0.05,
                       what="the breaker closed")
        finally:
            sidecar.close()


async def test_the_pause_between_probes_is_floored(fresh_redis: RedisServer) -> None:
    """A cooldown of 0 (refused by the flags, still possible in code) does not re-authenticate a
    wrong password back to back."""
    fresh_redis.execute("CONFIG", "SET", "requirepass", "the-right-one")
    store = RedisStore(parse_redis_url(f"redis://:wrong@127.0.0.1:{fresh_redis.port}"),
                       timeout=0.5, connect_timeout=0.5)
    loop = asyncio.get_running_loop()
    at: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        at.append(loop.time())
        if len(at) >= 4:
            done.set()
        await store.probe()

    breaker = CircuitBreaker(probe=probe, threshold=1, cooldown=0.0)
    try:
        breaker.failure(StoreUnavailable("test", AUTH))
        assert breaker.state is State.OPEN
        await asyncio.wait_for(done.wait(), 20)
        gaps = [b - a for a, b in itertools.pairwise(at)]
        assert all(g >= PROBE_INTERVAL_S * 0.9 for g in gaps), gaps
    finally:
        await breaker.close()
        await store.close()


@pytest.mark.cluster
async def test_the_probe_runs_the_script_on_every_master_and_writes_nothing(
        redis_cluster: RedisClusterProcs) -> None:
    # A MOVED reply (a probe key on the wrong node) would fail the probe.
    store = RedisStore(parse_redis_url(redis_cluster.url), timeout=1.0, connect_timeout=1.0)
    try:
        await store.probe()
        sha = scripts.decide().sha1
        for node in redis_cluster.nodes:  # each master ran it (so has it), none holds a probe key
            assert node.execute("SCRIPT", "EXISTS", sha) == [1]
            assert not node.execute("KEYS", f"{keyschema.PREFIX}:probe*")
    finally:
        await store.close()
