"""A real redis-server speaking TLS only, with a certificate from a private CA made here with
``openssl`` (a CA no system store trusts): what a ``rediss://`` URL and a CA setting are tested
against."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.polling import poll
from support.redis_servers import pick_port

PASSWORD = "s3cret"


@contextlib.contextmanager
def tls_redis_server() -> Iterator[tuple[str, int]]:
    """(the CA's PEM file, the TLS port) of a redis-server on 127.0.0.1 with ``requirepass``
    :data:`PASSWORD`; stopped and its files removed on the way out."""
    if not shutil.which("openssl"):
        pytest.fail("openssl is needed to make test certificates (Debian: apt-get install openssl)")
    d = Path(tempfile.mkdtemp(prefix="sluice-tls-"))

    def run(*cmd: str) -> None:
        subprocess.run(cmd, cwd=d, check=True, capture_output=True)

    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
        "ca.pem", "-days", "1", "-subj", "/CN=sluice-test-ca")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
        "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "ext")
    port = pick_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", "server.pem", "--tls-key-file", "server.key",
         "--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no", "--requirepass", PASSWORD,
         "--save", "", "--appendonly", "no"], cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5) as raw, \
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"-NOAUTH")
        except OSError:
            return False
    try:
        poll(up, "TLS redis-server", 15, interval=0.02)
        yield str(d / "ca.pem"), port
    finally:
        proc.kill()
        proc.wait(5)
        shutil.rmtree(d, ignore_errors=True)
