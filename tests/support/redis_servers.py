"""Real ``redis-server`` processes on free loopback ports, for tests and benchmarks.

- :class:`RedisServer`: one server (``--save '' --appendonly no``), its own temp dir, started
  and waited for with a deadline (PING polled, no fixed sleeps). ``stop()``/``kill()``,
  ``restart()`` on the same port, ``pause()``/``resume()`` (SIGSTOP/SIGCONT) to simulate a
  stalled server.
- :class:`RedisClusterProcs`: N masters with ``--cluster-enabled yes`` joined by
  ``redis-cli --cluster create``; ready once every node reports ``cluster_state:ok``.

Every process started here is killed at interpreter exit (``atexit``) and, when started from
the main thread on Linux, also when the Python process dies abruptly (``PR_SET_PDEATHSIG``), so
a crashed or interrupted test run leaves no servers behind.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

SERVER_BIN = "redis-server"
CLI_BIN = "redis-cli"
# Ports are drawn from here: below the kernel's ephemeral range (32768+), and so is the cluster
# bus port (port + 10000), so an outgoing connection cannot grab either one meanwhile.
PORT_RANGE = (10000, 22000)
START_TIMEOUT = 15.0

_LIVE: set[RedisServer] = set()
_LIVE_LOCK = threading.Lock()
_TAKEN: set[int] = set()


class RedisNotInstalled(RuntimeError):
    """``redis-server`` / ``redis-cli`` is not on PATH."""


class RedisStartError(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


def require_binaries(*names: str) -> None:
    """Raise :class:`RedisNotInstalled` with what to install when a binary is missing."""
    for name in names:
        if shutil.which(name) is None:
            raise RedisNotInstalled(
                f"{name} not found on PATH: install the Debian package 'redis-server' "
                f"(it brings redis-server and redis-cli via 'redis-tools'): "
                f"`apt-get install redis-server`, or run `make setup` / hack/ensure-redis.sh")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port(*, with_bus: bool = False) -> int:
    """A port free on 127.0.0.1 (and ``port + 10000`` too when ``with_bus``), not handed out
    before by this process. Another process may still take it before Redis binds: callers
    retry on 'address in use'."""
    rng = random.Random()
    lo, hi = PORT_RANGE
    for _ in range(1000):
        port = rng.randrange(lo, hi)
        if port in _TAKEN or (with_bus and port + 10000 in _TAKEN):
            continue
        if _port_free(port) and (not with_bus or _port_free(port + 10000)):
            _TAKEN.add(port)
            if with_bus:
                _TAKEN.add(port + 10000)
            return port
    raise RuntimeError(f"no free port found in {PORT_RANGE}")


def death_signal_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGKILL the child when this thread dies, or None.

    Only from the main thread: PDEATHSIG fires when the *thread* that forked exits."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


def ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a Redis answers PING with +PONG (raw socket: no client library state)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = s.recv(64)
                if not chunk:
                    return False
                data += chunk
            return data.startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` on 127.0.0.1. Use as a context manager or call ``close()``."""

    host = "127.0.0.1"

    def __init__(self, *, port: int | None = None, extra_args: Sequence[str] = (),
                 cluster: bool = False, start: bool = True) -> None:
        require_binaries(SERVER_BIN)
        self.cluster = cluster
        self.extra_args = list(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix="sluice-redis-"))
        self._fixed_port = port is not None
        self.port = port if port is not None else pick_port(with_bus=cluster)
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self._log_file: Any = None
        if start:
            self.start()

    # ------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def log_path(self) -> Path:
        return self.dir / f"redis-{self.port}.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _argv(self) -> list[str]:
        argv = [SERVER_BIN, "--port", str(self.port), "--bind", self.host, "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", str(self.dir),
                "--logfile", "", "--protected-mode", "no"]
        if self.cluster:
            argv += ["--cluster-enabled", "yes",
                     "--cluster-config-file", str(self.dir / f"nodes-{self.port}.conf"),
                     "--cluster-node-timeout", "2000"]
        return argv + self.extra_args

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the process and wait until it answers PING. A port taken meanwhile by another
        process is replaced by a fresh one (unless the port was fixed, as in ``restart``)."""
        if self.running:
            return
        for attempt in range(5):
            self._spawn()
            try:
                self.wait_ready(timeout)
                return
            except RedisStartError as exc:
                in_use = "Address already in use" in self.log_tail(50)
                self._reap()
                if not in_use or self._fixed_port or attempt == 4:
                    raise exc
                self.port = pick_port(with_bus=self.cluster)

    def _spawn(self) -> None:
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap
        self.proc = subprocess.Popen(
            self._argv(), stdin=subprocess.DEVNULL, stdout=self._log_file,
            stderr=subprocess.STDOUT, cwd=self.dir, preexec_fn=death_signal_preexec())
        self.paused = False
        with _LIVE_LOCK:
            _LIVE.add(self)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RedisStartError(
                    f"redis-server on port {self.port} exited (code {code}):\n{self.log_tail()}")
            if ping(self.host, self.port):
                return
            if time.monotonic() > deadline:
                raise RedisStartError(
                    f"redis-server on port {self.port} did not answer PING within "
                    f"{timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.005)

    def _reap(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.paused = False
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (after SIGCONT if paused), then SIGKILL if it does not exit in time."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if self.paused:
                    proc.send_signal(signal.SIGCONT)
                proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
        self._reap()

    def kill(self) -> None:
        """SIGKILL: the abrupt death of a Redis (no shutdown, connections reset)."""
        self._reap()

    def restart(self, *, hard: bool = False, timeout: float = START_TIMEOUT) -> None:
        """Stop (``hard``: SIGKILL) and start again on the same port; data is gone."""
        if hard:
            self.kill()
        else:
            self.stop()
        fixed, self._fixed_port = self._fixed_port, True
        try:
            self.start(timeout)
        finally:
            self._fixed_port = fixed

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing until ``resume()``."""
        assert self.proc is not None and self.running
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.paused:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def close(self) -> None:
        """Stop the process and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------
    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client talking to this very node (no cluster redirection)."""
        kwargs.setdefault("socket_timeout", 5.0)
        return redis.Redis(host=self.host, port=self.port, **kwargs)

    def execute(self, *args: Any) -> Any:
        """Run one command on this node with a short-lived connection."""
        with self.client() as c:
            return c.execute_command(*args)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "stopped"
        return f"<RedisServer {self.url} {state}>"


class RedisClusterProcs:
    """``n`` cluster-enabled masters (no replicas) joined into one Redis Cluster."""

    def __init__(self, n: int = 3, *, start: bool = True) -> None:
        require_binaries(SERVER_BIN, CLI_BIN)
        if n < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.n = n
        self.nodes: list[RedisServer] = []
        if start:
            self.start()

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self, timeout: float = 60.0) -> None:
        try:
            self.nodes = [RedisServer(cluster=True) for _ in range(self.n)]
            addrs = [f"127.0.0.1:{p}" for p in self.ports]
            res = subprocess.run(
                [CLI_BIN, "--cluster", "create", *addrs, "--cluster-replicas", "0",
                 "--cluster-yes"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
            if res.returncode != 0:
                raise RedisStartError(
                    "redis-cli --cluster create failed:\n"
                    + res.stdout.decode(errors="replace")[-2000:]
                    + res.stderr.decode(errors="replace")[-2000:])
            self.wait_ok(timeout)
        except BaseException:
            self.close()
            raise

    def cluster_info(self, node: RedisServer) -> dict[str, str]:
        raw = node.execute("CLUSTER", "INFO")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Poll until every node reports ``cluster_state:ok`` and knows every other node."""
        deadline = time.monotonic() + timeout
        while True:
            infos = []
            for node in self.nodes:
                try:
                    infos.append(self.cluster_info(node))
                except redis.RedisError:
                    infos.append({})
            if all(i.get("cluster_state") == "ok"
                   and i.get("cluster_known_nodes") == str(self.n)
                   and i.get("cluster_slots_assigned") == "16384" for i in infos):
                return
            if time.monotonic() > deadline:
                raise RedisStartError(f"cluster not ok after {timeout:.0f}s: {infos}")
            time.sleep(0.02)

    def slot_owners(self) -> dict[int, int]:
        """slot -> port of the master serving it (from CLUSTER SLOTS of the first node)."""
        owners: dict[int, int] = {}
        for entry in self.nodes[0].execute("CLUSTER", "SLOTS"):
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            for s in range(start, end + 1):
                owners[s] = int(master[1])
        return owners

    def node_by_port(self, port: int) -> RedisServer:
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisClusterProcs:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __iter__(self) -> Iterator[RedisServer]:
        return iter(self.nodes)


@contextlib.contextmanager
def sentinel_for(master: RedisServer, name: str = "sluicemaster") -> Iterator[int]:
    """A redis-server in Sentinel mode monitoring ``master`` as ``name``; yields its port once
    it knows the master (``redis+sentinel://127.0.0.1:<port>/<name>``)."""
    d = Path(tempfile.mkdtemp(prefix="sluice-sentinel-"))
    port = pick_port()
    conf = d / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor {name} 127.0.0.1 {master.port} 1\n"
                    f"sentinel down-after-milliseconds {name} 5000\n")
    proc = subprocess.Popen([SERVER_BIN, str(conf), "--sentinel"], cwd=d, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=death_signal_preexec())

    def knows_master() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5) as s:
                s.sendall(f"SENTINEL get-master-addr-by-name {name}\r\n".encode())
                return str(master.port).encode() in s.recv(256)
        except OSError:
            return False

    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not knows_master():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RedisStartError(f"sentinel on port {port} did not come to know its master")
            time.sleep(0.02)
        yield port
    finally:
        proc.kill()
        proc.wait(5)
        shutil.rmtree(d, ignore_errors=True)


def _kill_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for server in live:
        with contextlib.suppress(Exception):
            server.kill()
        shutil.rmtree(server.dir, ignore_errors=True)


atexit.register(_kill_all)

__all__ = ["RedisClusterProcs", "RedisNotInstalled", "RedisServer", "RedisStartError", "pick_port",
           "ping", "require_binaries"]

if __name__ == "__main__":  # manual smoke test: python -m tests.support.redis_servers
    with RedisServer() as single, RedisClusterProcs() as cl:
        print(single, single.execute("PING"), cl.url, os.getpid())
