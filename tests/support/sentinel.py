"""A real Redis Sentinel (``redis-server --sentinel``) watching one master, for tests that need
a ``redis+sentinel://`` URL. Ready once the Sentinel names its master (polled, no sleeps)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from support.polling import poll
from support.redis_servers import RedisServer, death_signal_preexec, pick_port

MASTER_NAME = "sluicemaster"


@contextlib.contextmanager
def started_sentinel() -> Iterator[tuple[RedisServer, str]]:
    """``(master, redis+sentinel:// URL)``; both stopped on exit."""
    master = RedisServer()
    d = Path(tempfile.mkdtemp(prefix="sluice-sentinel-"))
    port = pick_port()
    conf = d / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor {MASTER_NAME} 127.0.0.1 {master.port} 1\n"
                    f"sentinel down-after-milliseconds {MASTER_NAME} 5000\n")
    proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"], cwd=d, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=death_signal_preexec())

    def knows_master() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5) as s:
                s.sendall(f"SENTINEL get-master-addr-by-name {MASTER_NAME}\r\n".encode())
                return str(master.port).encode() in s.recv(256)
        except OSError:
            return False
    try:
        poll(knows_master, "sentinel", 15, interval=0.02)
        yield master, f"redis+sentinel://127.0.0.1:{port}/{MASTER_NAME}"
    finally:
        proc.kill()
        proc.wait(5)
        master.close()
        shutil.rmtree(d, ignore_errors=True)
