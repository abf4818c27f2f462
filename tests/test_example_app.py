"""The example app (examples/app.yaml) stops on SIGTERM as its container's PID 1.

A process that is PID 1 of its PID namespace gets no default-action signal: a SIGTERM it has no
handler for is dropped, so an app that relies on the default (``python3 -m http.server``) is
only stopped by the SIGKILL at the end of terminationGracePeriodSeconds, and every rollout of the
example waited 30 s per Pod (found by tests/e2e). Here the example's own command runs as PID 1
of a new PID namespace (``unshare``), as the kubelet runs it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml
from support.paths import ROOT
from support.polling import poll


def _app_command() -> list[str]:
    docs = [d for d in yaml.safe_load_all((ROOT / "examples" / "app.yaml").read_text()) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    app = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "app")
    return [str(a) for a in app["command"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_example_app_exits_on_sigterm_as_pid_1(tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed to run the app as PID 1"
    port = _free_port()
    # The container's command, on a free port, serving an empty directory, with this Python.
    argv = [a.replace("8000", str(port)).replace("/tmp", str(tmp_path)) for a in _app_command()]
    assert argv[0] == "python3"
    argv[0] = sys.executable
    userns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    proc = subprocess.Popen([unshare, *userns, "--pid", "--fork", "--kill-child", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        poll(lambda: _answers(port) or proc.poll() is not None, "the example app to listen",
             timeout=30)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        os.kill(int(children[0]), signal.SIGTERM)  # PID 1 inside the new namespace
        poll(lambda: proc.poll() is not None, "the app (PID 1) to exit on SIGTERM", timeout=15)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
