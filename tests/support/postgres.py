"""A throwaway PostgreSQL cluster on a free loopback port, for tests and benchmarks.

``initdb`` into a temp dir, then ``postgres`` started directly (so its PID is ours to stop:
SIGINT is PostgreSQL's "fast" shutdown), ``fsync=off`` (nothing here must survive a power
cut), trust authentication on 127.0.0.1 only. PostgreSQL refuses to run as root: as root the
cluster belongs to a dedicated system user, :data:`OS_USER`, made on first use. The binaries
are Debian's (``/usr/lib/postgresql/<version>/bin``; ``make test`` installs the package).
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from support.redis_servers import death_signal_preexec, pick_port

OS_USER = "sluice-pg"
START_TIMEOUT = 30.0
_LIVE: set[PostgresServer] = set()


class PostgresNotInstalled(RuntimeError):
    """No PostgreSQL server binaries: the message says what to install."""


def bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise PostgresNotInstalled(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres): install Debian's "
            "package 'postgresql' (`apt-get install postgresql`), or run `make test` as root, which does")
    return Path(found[-1]).parent


def _os_user() -> str | None:
    """The user to run PostgreSQL as: ours when root (made if missing), else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OS_USER],
                       check=True)
    return OS_USER


class PostgresServer:
    host = "127.0.0.1"

    def __init__(self) -> None:
        self.bin = bin_dir()
        self.user = _os_user()
        self.dir = Path(tempfile.mkdtemp(prefix="sluice-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        if self.user:
            shutil.chown(self.dir, self.user)
        os.chmod(self.dir, 0o755)
        subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                        "--no-sync", "-E", "UTF8", "--locale=C"], check=True, user=self.user,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.port = pick_port()
        self.proc: subprocess.Popen[bytes] | None = None
        _LIVE.add(self)
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def start(self) -> None:
        log = open(self.log, "ab")  # noqa: SIM115 - the server's stderr for its lifetime
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.dir),
             "-c", f"listen_addresses={self.host}", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=100"],
            user=self.user, stdout=log, stderr=log, preexec_fn=death_signal_preexec())
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited at start:\n{self.log.read_text()[-2000:]}")
            ready = subprocess.run([str(self.bin / "pg_isready"), "-h", self.host, "-p", str(self.port),
                                    "-U", "postgres"], capture_output=True)
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"postgres did not accept connections in {START_TIMEOUT} s:\n"
                           f"{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster: connections ended, data kept)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def create_database(self) -> str:
        """A new empty database (its name): tests that need a schema of their own."""
        name = f"t{os.urandom(6).hex()}"
        subprocess.run([str(self.bin / "psql"), "-h", self.host, "-p", str(self.port), "-U", "postgres",
                        "-q", "-c", f"CREATE DATABASE {name}"], check=True, capture_output=True)
        return name

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        _LIVE.discard(self)


@atexit.register
def _close_all() -> None:
    for server in list(_LIVE):
        server.close()
