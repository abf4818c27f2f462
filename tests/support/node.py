"""A real one-node Kubernetes cluster for the e2e tests, brought up and torn down by the project's
own scripts: ``hack/node/up.sh DIR`` and ``hack/node/down.sh DIR`` (docs/real-node.md).

:class:`NodeSession` is what the session fixture holds: :meth:`NodeSession.ensure_up` brings a
node up (once; again after :meth:`NodeSession.down`) and returns a :class:`Node`, whose
``kubectl()`` talks to it as cluster admin. The node's ports are all picked free by up.sh, so it
runs beside the suite's own control planes (tests/k8s); what is host-wide (the ``sluice0``
bridge, iptables chains, ``/run/netns``) allows one node per machine, so a session holds
``/run/lock/sluice-node.lock`` while its node is up and a second session waits for it.

:class:`HostState` is a snapshot of everything a node can leave behind (processes, mounts,
links, network namespaces, iptables chains, cgroups, sysctls, default paths); the session takes
one before its first bring-up, and the teardown test compares. A bring-up that fails raises
:class:`NodeStartError` with up.sh's output and the tails of every component's log.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO

import pytest

from support.paths import ROOT

HACK = ROOT / "hack" / "node"
LOCK_PATH = Path("/run/lock/sluice-node.lock")
CURRENT = Path("/run/sluice-node.dir")  # lib.sh's CURRENT: the state directory of the node up
LOCK_WAIT = 900.0  # another session's e2e run on this machine
UP_TIMEOUT = 240.0
DOWN_TIMEOUT = 120.0
# Processes of a node, by executable name (container processes have no state dir in argv).
NODE_EXES = frozenset({"kubelet", "kube-proxy", "kube-scheduler", "containerd",
                       "containerd-shim-runc-v2", "runc", "coredns", "pause"})


class NodeStartError(RuntimeError):
    """up.sh failed (or a prerequisite is missing); the message says what and shows the logs."""


class NodeTeardownError(RuntimeError):
    """down.sh failed or left something behind; the message lists it."""


def _lib_list(name: str) -> list[str]:
    """A bash array of hack/node/lib.sh (one place for the node's names and paths)."""
    out = subprocess.run(["bash", "-c", f'D=/nonexistent; source "$0"; printf "%s\\n" "${{{name}[@]}}"',
                          str(HACK / "lib.sh")], capture_output=True, text=True, check=True)
    return out.stdout.split()


def _lib_output(function: str) -> list[str]:
    """The lines a host-state probe of hack/node/lib.sh prints (the same probes down.sh uses)."""
    return subprocess.run(["bash", "-c", f'D=/nonexistent; source "$0"; {function} || true',
                           str(HACK / "lib.sh")], capture_output=True, text=True,
                          check=True).stdout.splitlines()


def _running(pid: int) -> bool:
    """Exists and is not a zombie (PID 1 may reap orphans late)."""
    stat = _read(Path(f"/proc/{pid}/stat"))
    return bool(stat) and stat.rpartition(") ")[2][:1] != "Z"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@dataclass(frozen=True)
class HostState:
    """What a node may change on the host; equal snapshots = nothing left behind."""

    processes: frozenset[str]
    mounts: frozenset[str]
    links: frozenset[str]
    netns: frozenset[str]
    iptables: frozenset[str]
    nft_tables: frozenset[str]
    cgroups: frozenset[str]
    sysctls: frozenset[str]
    paths: frozenset[str]

    @classmethod
    def snapshot(cls, node_dirs: tuple[Path, ...] = ()) -> HostState:
        procs = set()
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            argv = _read(p / "cmdline").replace("\0", " ")
            exe = os.path.basename(argv.split(" ", 1)[0])
            if exe in NODE_EXES or any(str(d) in argv for d in node_dirs):
                procs.add(f"{p.name} {argv.strip()}")
        mounts = {line.split()[4] for line in _read(Path("/proc/self/mountinfo")).splitlines()
                  if line.split()[4].startswith(("/run/netns", *(str(d) for d in node_dirs)))}
        links = {line.split(":")[1].strip().split("@")[0] for line in
                 subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                                check=True).stdout.splitlines()}
        chains, tables, cgroups = (_lib_output(f) for f in ("iptables_chains", "nft_tables",
                                                             "cgroup_dirs"))
        sysctls = set()
        for key in _lib_list("SYSCTLS"):
            value = _read(Path("/proc/sys") / key.replace(".", "/")).strip()
            if value:
                sysctls.add(f"{key}={value}")
        paths = {p for p in _lib_list("HOST_PATHS") if os.path.lexists(p)}
        netns = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
        return cls(frozenset(procs), frozenset(mounts), frozenset(links), frozenset(netns),
                   frozenset(chains), frozenset(tables), frozenset(cgroups),
                   frozenset(sysctls), frozenset(paths))

    def changes_since(self, before: HostState) -> list[str]:
        """Human-readable differences ("+ added", "- removed") per kind; empty when equal."""
        out = []
        for f in fields(self):
            now, was = getattr(self, f.name), getattr(before, f.name)
            out += [f"{f.name}: + {x}" for x in sorted(now - was)]
            out += [f"{f.name}: - {x}" for x in sorted(was - now)]
        return out


class Node:
    """A running node: ``kubectl(...)`` as cluster admin, ``env`` as up.sh wrote it (ports,
    ``NODE_IP``, ``KUBECONFIG``), ``log_report()`` for failure reports."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.env: dict[str, str] = {}
        for line in _read(directory / "env").splitlines():
            key, _, value = line.partition("=")
            self.env[key] = value
        self.kubeconfig = Path(self.env.get("KUBECONFIG", directory / "etc/admin.kubeconfig"))
        self.bin = Path(os.environ.get("SLUICE_CACHE") or Path.home() / ".cache/sluice") / "bin"

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / "kubectl"), f"--kubeconfig={self.kubeconfig}",
               f"--cache-dir={self.dir / 'kube-cache'}", *args]
        result = subprocess.run(cmd, input=input, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {result.returncode}\n"
                                 f"--- stdout\n{result.stdout}--- stderr\n{result.stderr}")
        return result

    def log_report(self, lines: int = 30) -> str:
        return log_tails(self.dir / "logs", lines)

    def make_namespace(self) -> str:
        """A fresh namespace, once Pods can be created in it (its default ServiceAccount,
        made by the controller-manager, exists)."""
        name = f"e2e-{uuid.uuid4().hex[:8]}"
        self.kubectl("create", "namespace", name)
        self.kubectl("wait", "--for=create", "serviceaccount/default", "-n", name,
                     "--timeout=60s")
        return name


def log_tails(log_dir: Path, lines: int = 30) -> str:
    parts = []
    for log in sorted(log_dir.glob("*.log")):
        tail = _read(log).splitlines()[-lines:]
        if tail:
            parts.append(f"----- {log.name} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts) or f"(no logs in {log_dir})"


@contextlib.contextmanager
def _machine_lock() -> Iterator[IO[str]]:
    """One node per machine: wait (with a deadline) for another session's node to go."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    f = LOCK_PATH.open("a+")
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                f.seek(0)
                f.close()
                raise NodeStartError(f"another one-node cluster held {LOCK_PATH} for "
                                     f"{LOCK_WAIT:.0f}s (holder: {f.read().strip()!r})") from None
            time.sleep(1.0)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    try:
        yield f
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


class NodeSession:
    """Owns the node of one pytest session: brings it up on demand, tears it down at the end."""

    def __init__(self) -> None:
        self.node: Node | None = None
        self.baseline: HostState | None = None
        self.timings: dict[str, float] = {}
        self.failure: str | None = None
        self._lock: contextlib.ExitStack | None = None
        self._dirs: list[Path] = []

    def ensure_up(self) -> Node:
        """The running node, brought up if needed. A bring-up that failed once is not retried in
        the same session: every later test fails at once with the same report."""
        if self.node is not None:
            return self.node
        if self.failure is not None:
            raise NodeStartError(f"(as at the first bring-up of this session) {self.failure}")
        if os.geteuid() != 0:
            self.failure = (
                "the one-node cluster needs root (containerd, runc, iptables, network "
                "namespaces, mounts): run the e2e tests as root (CI does), or deselect them "
                "with -m 'not e2e'")
            raise NodeStartError(self.failure)
        lock = contextlib.ExitStack()
        try:
            lock.enter_context(_machine_lock())
            self._clean_up_after_a_dead_session()
            self.node = self._bring_up()
        except BaseException as exc:
            lock.close()  # never keep the machine's node lock when there is no node
            if isinstance(exc, NodeStartError | OSError | NodeTeardownError):
                self.failure = str(exc)
                raise NodeStartError(self.failure) from exc
            raise
        self._lock = lock
        return self.node

    def _bring_up(self) -> Node:
        directory = Path(tempfile.mkdtemp(prefix="sluice-node-"))
        self._dirs.append(directory)
        (directory / "owner").write_text(f"pytest {os.getpid()}\n")
        if self.baseline is None:
            self.baseline = HostState.snapshot()
        t = time.monotonic()
        try:
            result = subprocess.run([str(HACK / "up.sh"), str(directory)], capture_output=True,
                                    text=True, timeout=UP_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
            result = subprocess.CompletedProcess(
                exc.cmd, -1, "", f"{stderr}\nup.sh timed out after {UP_TIMEOUT:.0f}s")
        except OSError as exc:  # up.sh missing or not executable: nothing was started
            shutil.rmtree(directory, ignore_errors=True)
            raise NodeStartError(f"cannot run hack/node/up.sh: {exc}") from exc
        if result.returncode != 0:
            # up.sh prints the components' log tails itself, unless it was killed (timeout).
            tails = log_tails(directory / "logs") if result.returncode < 0 else ""
            report = (f"hack/node/up.sh {directory} failed (exit {result.returncode}):\n"
                      f"{result.stderr}\n{tails}")
            self._teardown(directory, keep_logs=True)
            raise NodeStartError(f"{report}\n(logs kept in {directory / 'logs'})")
        self.timings["up"] = time.monotonic() - t
        return Node(directory)

    def down(self, *, keep_logs: bool = False) -> str:
        """Tear the node down (down.sh); return its output. Raises NodeTeardownError if it
        failed or left something behind."""
        if self.node is None:
            return ""
        node, self.node = self.node, None
        t = time.monotonic()
        try:
            return self._teardown(node.dir, keep_logs=keep_logs)
        finally:
            self.timings["down"] = time.monotonic() - t
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def _clean_up_after_a_dead_session(self) -> None:
        """A node whose pytest session was killed (CI timeout, kill -9) would make every later
        bring-up on this machine refuse to start: tear it down first. A node started by hand
        (no owner file) is left alone; up.sh then says how to tear it down."""
        if not CURRENT.exists():
            return
        directory = Path(CURRENT.read_text().strip())
        owner = _read(directory / "owner").split()
        if len(owner) == 2 and owner[0] == "pytest" and not _running(int(owner[1])):
            self._teardown(directory, keep_logs=False)

    @property
    def node_dirs(self) -> tuple[Path, ...]:
        return tuple(self._dirs)

    @staticmethod
    def _teardown(directory: Path, *, keep_logs: bool) -> str:
        args = [str(HACK / "down.sh"), *(["--keep-logs"] if keep_logs else []), str(directory)]
        result = subprocess.run(args, capture_output=True, text=True, timeout=DOWN_TIMEOUT)
        if result.returncode != 0:
            raise NodeTeardownError(f"hack/node/down.sh {directory} exited "
                                    f"{result.returncode}:\n{result.stderr}")
        return result.stderr


def node_up(session: NodeSession) -> Node:
    """The session's node, brought up if needed; a failed bring-up fails the test with the
    reason and the log tails (never a skip)."""
    try:
        return session.ensure_up()
    except NodeStartError as exc:
        message = f"the one-node cluster did not come up: {exc}"
    pytest.fail(message, pytrace=False)
