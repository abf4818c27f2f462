"""The Redis image `make image` writes for the chart's in-cluster Redis (Debian's redis-server,
hack/image/build.sh), checked without a node: a numeric non-root user, redis-server as the
entrypoint, a data directory that user owns, and a server that really starts there and answers
a client, with no tools beyond redis-server and redis-cli."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.oci_image import (
    REDIS_ARCHIVE,
    Image,
    build_images,
    images_dir,
    rootfs_command,
    run_in_rootfs,
    unpack,
    user_ids,
)
from support.paths import ROOT
from support.redis_servers import pick_port

pytestmark = [pytest.mark.image, pytest.mark.slow, pytest.mark.timeout(1800)]

VERSION = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Image, Path]]:
    build_images()
    rootfs = tmp_path_factory.mktemp("redis-rootfs")
    yield unpack(images_dir() / REDIS_ARCHIVE, rootfs), rootfs


def test_config_names_a_numeric_non_root_user_and_redis_server(redis: tuple[Image, Path]) -> None:
    image, rootfs = redis
    assert image.name == f"docker.io/library/sluice-redis:{VERSION}"
    assert user_ids(image) == (999, 999)
    assert image.runtime["Entrypoint"] == ["redis-server"]
    assert image.runtime["WorkingDir"] == "/data"
    data = (rootfs / "data").stat()
    assert (data.st_uid, data.st_gid) == (999, 999)
    assert "redis:x:999:999:" in (rootfs / "etc/passwd").read_text()
    assert not any((rootfs / "usr/bin" / tool).exists() for tool in ("gcc", "cc", "make", "apt-get"))


def test_redis_server_starts_as_its_user_and_answers(redis: tuple[Image, Path]) -> None:
    image, rootfs = redis
    assert run_in_rootfs(rootfs, image, ["redis-server", "--version"]).returncode == 0
    port = pick_port()
    uid, gid = user_ids(image)
    # the image's own command line plus a loopback port (the host's network: no namespace of its own)
    argv = [*image.runtime["Entrypoint"], *image.runtime["Cmd"], "--port", str(port),
            "--bind", "127.0.0.1"]
    proc = subprocess.Popen(rootfs_command(rootfs, argv, uid=uid, gid=gid, workdir=image.workdir), env=image.env,
                            cwd="/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        assert ping(port, deadline=time.monotonic() + 20), "redis-server in the image never answered"
        res = run_in_rootfs(rootfs, image, ["redis-cli", "-p", str(port), "CONFIG", "GET", "dir"])
        assert res.stdout.split() == ["dir", "/data"], res
        # unshare ignores SIGTERM while it waits: the server is stopped the way a client can
        run_in_rootfs(rootfs, image, ["redis-cli", "-p", str(port), "SHUTDOWN", "NOSAVE"])
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()  # unshare --kill-child takes redis-server with it
            proc.communicate(timeout=20)
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    assert b"ready to exit" in out, out.decode(errors="replace")[-2000:]

def ping(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return True
        except OSError:
            time.sleep(0.05)
    return False
