"""A real Kubernetes control plane on loopback for tests, the way controller-runtime's envtest does it.

:class:`ControlPlane` starts ``etcd``, ``kube-apiserver`` and ``kube-controller-manager`` (built
from Go modules by ``hack/k8s/build.sh`` into ``${SLUICE_CACHE:-~/.cache/sluice}/bin``) on free
127.0.0.1 ports, with a CA generated for the occasion (``cryptography``, EC P-256), a serving
certificate for the API server, client certificates for the admin (``system:masters``) and the
controller-manager, a service-account signing key, and an admin kubeconfig file.

It is ready once etcd is healthy, ``/readyz`` of the API server answers ``ok``, the
controller-manager's ``/healthz`` answers ``ok`` and the ``default`` ServiceAccount of the
``default`` namespace exists (Pods are refused until it does). Every wait polls with a deadline.
There is no scheduler and no kubelet: Pods stay ``Pending``.

Logs of the three processes are in ``<dir>/logs``; :meth:`ControlPlane.log_report` gives their
tails (the pytest fixture adds it to the report of a failing test, and a failed start-up raises
:class:`ControlPlaneStartError` carrying it). ``close()`` stops the processes in reverse start
order (SIGTERM, then SIGKILL after a grace period) and removes the directory unless asked to keep
it. As in ``redis_servers``, the processes are killed at interpreter exit and, when started from
the main thread on Linux, when the Python process dies abruptly (``PR_SET_PDEATHSIG``).

Flags and gotchas are those measured in ``hack/k8s/NOTES.md`` (``start-control-plane.sh`` is
the shell version of the same bring-up).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from support.redis_servers import death_signal_preexec, pick_port

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")
SERVICE_CIDR = "10.0.0.0/24"  # its first address, 10.0.0.1, is the 'kubernetes' Service
START_TIMEOUT = 90.0
STOP_GRACE = 15.0

_LIVE: set[ControlPlane] = set()
_LIVE_LOCK = threading.Lock()


class ControlPlaneNotInstalled(RuntimeError):
    """A binary is missing from the cache's bin directory."""


class ControlPlaneStartError(RuntimeError):
    """The control plane did not come up; the message carries the tails of the logs."""


class KubectlError(subprocess.CalledProcessError):
    """``kubectl`` exited non-zero; ``str()`` shows the command, stdout and stderr."""

    def __str__(self) -> str:
        return (f"kubectl {' '.join(self.cmd[3:])} exited {self.returncode}\n"
                f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}")


def cache_dir() -> Path:
    return Path(os.environ.get("SLUICE_CACHE") or Path.home() / ".cache" / "sluice")


def bin_dir() -> Path:
    return cache_dir() / "bin"


def require_binaries(bin_path: Path | None = None, names: Sequence[str] = COMPONENTS) -> Path:
    """The bin directory, or :class:`ControlPlaneNotInstalled` saying what to run."""
    bin_path = bin_path or bin_dir()
    missing = [n for n in names if not os.access(bin_path / n, os.X_OK)]
    if missing:
        raise ControlPlaneNotInstalled(
            f"missing {', '.join(missing)} in {bin_path}: run `make setup-k8s` (it runs "
            f"hack/k8s/build.sh, which builds the Kubernetes control plane from Go modules; "
            f"cold ~20+ min, then a no-op)")
    return bin_path


# ---------------------------------------------------------------------------------------------
# PKI


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, *,
             ca: bool) -> x509.CertificateBuilder:
    """Valid two days (from five minutes ago); a CA signs certificates, a leaf enciphers keys."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=not ca,
            data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
            encipher_only=False, decipher_only=False), critical=True))


class CertificateAuthority:
    """A throw-away CA (valid two days) that signs serving and client certificates."""

    def __init__(self, directory: Path, cn: str = "sluice-test-ca") -> None:
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (
            _builder(_name(cn), _name(cn), self.key.public_key(), ca=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256()))
        self.cert_path = directory / "ca.crt"
        self.key_path = directory / "ca.key"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        _write_key(self.key_path, self.key)

    def issue(self, name: str, cn: str, *, org: str | None = None,
              hosts: Sequence[str] = (), server: bool = False) -> tuple[Path, Path]:
        """Sign ``<dir>/<name>.crt`` + ``.key``: a serving certificate for ``hosts`` (IPs or DNS
        names) when ``server``, a client certificate (CN = user, O = group) otherwise."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            _builder(_name(cn, org), self.cert.subject, key.public_key(), ca=False)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False))
        if hosts:
            sans: list[x509.GeneralName] = []
            for h in hosts:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    sans.append(x509.DNSName(h))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        crt, key_path = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return crt, key_path


# ---------------------------------------------------------------------------------------------
# processes


class _Proc:
    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, cwd=cwd,
                                      preexec_fn=death_signal_preexec())

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = STOP_GRACE) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(timeout=10)
        self._log.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        self._log.close()


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on 127.0.0.1.

    Attributes once started: ``server`` (``https://127.0.0.1:<port>``), ``kubeconfig`` (admin,
    ``system:masters``), ``ca_cert``/``ca_key``, ``client_cert``/``client_key`` (admin),
    ``ca`` (:class:`CertificateAuthority`, to sign e.g. a webhook's serving certificate),
    ``dir`` and ``log_dir``. ``kubectl(...)`` runs the matching kubectl against it.
    """

    def __init__(self, *, bin_path: Path | None = None, start: bool = True,
                 timeout: float = START_TIMEOUT) -> None:
        self.bin = require_binaries(bin_path)
        self.dir = Path(tempfile.mkdtemp(prefix="sluice-k8s-"))
        self.dir.chmod(0o700)
        self.log_dir = self.dir / "logs"
        self.pki_dir = self.dir / "pki"
        self.log_dir.mkdir()
        self.pki_dir.mkdir()
        self.procs: list[_Proc] = []
        self.timings: dict[str, float] = {}
        self.api_port = self.etcd_port = self.etcd_peer_port = self.kcm_port = 0
        self.kubeconfig = self.dir / "admin.kubeconfig"
        self._make_pki()
        if start:
            self.start(timeout)

    # -- public API ---------------------------------------------------------------------------
    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``kubectl --kubeconfig=<admin> *args`` (discovery cache in the control plane's
        directory); text in and out. ``check`` raises
        :class:`KubectlError` (whose message includes stderr) on a non-zero exit."""
        cmd = [str(self.bin / "kubectl"), f"--kubeconfig={self.kubeconfig}",
               f"--cache-dir={self.dir / 'kube-cache'}", *args]  # not ~/.kube/cache
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        res = subprocess.run(cmd, input=input, capture_output=True, text=True,
                             timeout=timeout, env=env, check=False,
                             stdin=None if input is not None else subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise KubectlError(res.returncode, cmd, res.stdout, res.stderr)
        return res

    def kubectl_json(self, *args: str) -> Any:
        """``kubectl <args> -o json``, parsed."""
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def log_report(self, lines: int = 30) -> str:
        """The last ``lines`` lines of every component's log, with the directory they are in."""
        parts = [f"control plane logs in {self.log_dir} (server {self.server})"]
        for p in sorted(self.log_dir.glob("*.log")):
            parts.append(f"==== tail -n {lines} {p.name}\n{_tail(p, lines)}")
        return "\n".join(parts)

    def pids(self) -> dict[str, int]:
        return {p.name: p.popen.pid for p in self.procs}

    # -- PKI and kubeconfigs --------------------------------------------------------------------
    def _make_pki(self) -> None:
        self.ca = CertificateAuthority(self.pki_dir)
        self.ca_cert, self.ca_key = self.ca.cert_path, self.ca.key_path
        self.apiserver_cert, self.apiserver_key = self.ca.issue(
            "apiserver", "kube-apiserver", server=True,
            hosts=["127.0.0.1", "10.0.0.1", "localhost", "kubernetes", "kubernetes.default",
                   "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"])
        self.client_cert, self.client_key = self.ca.issue(
            "admin", "sluice-admin", org="system:masters")
        # bound to its roles by the API server's bootstrap RBAC policy
        self.kcm_cert, self.kcm_key = self.ca.issue("kcm", "system:kube-controller-manager")
        sa_key = ec.generate_private_key(ec.SECP256R1())
        self.sa_key = self.pki_dir / "sa.key"
        self.sa_pub = self.pki_dir / "sa.pub"
        _write_key(self.sa_key, sa_key)
        self.sa_pub.write_bytes(sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def _write_kubeconfig(self, path: Path, user: str, cert: Path, key: Path) -> None:
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "sluice", "cluster": {
                "server": self.server, "certificate-authority": str(self.ca_cert)}}],
            "users": [{"name": user, "user": {
                "client-certificate": str(cert), "client-key": str(key)}}],
            "contexts": [{"name": "sluice", "context": {"cluster": "sluice", "user": user}}],
            "current-context": "sluice",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)

    # -- start-up -------------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the three processes and wait until the control plane is usable. A port taken
        meanwhile by another process ('address already in use') means a retry on new ports."""
        with _LIVE_LOCK:
            _LIVE.add(self)
        t0 = time.monotonic()
        for attempt in range(3):
            try:
                self._start_once(time.monotonic() + timeout)
                self.timings["startup"] = time.monotonic() - t0
                return
            except BaseException as exc:
                in_use = isinstance(exc, ControlPlaneStartError) and any(
                    "address already in use" in _tail(p.log_path, 200).lower()
                    for p in self.procs)
                self._stop_procs()
                if not in_use or attempt == 2:
                    with _LIVE_LOCK:  # the directory (logs) is kept for the post-mortem
                        _LIVE.discard(self)
                    raise
                for p in self.log_dir.glob("*.log"):
                    p.rename(p.with_suffix(f".log.attempt{attempt}"))
                shutil.rmtree(self.dir / "etcd-data", ignore_errors=True)

    def _start_once(self, deadline: float) -> None:
        self.etcd_port, self.etcd_peer_port = pick_port(), pick_port()
        self.api_port, self.kcm_port = pick_port(), pick_port()
        self._write_kubeconfig(self.kubeconfig, "sluice-admin", self.client_cert, self.client_key)
        kcm_kubeconfig = self.dir / "kube-controller-manager.kubeconfig"
        self._write_kubeconfig(kcm_kubeconfig, "system:kube-controller-manager",
                               self.kcm_cert, self.kcm_key)
        t = time.monotonic()

        data = self.dir / "etcd-data"
        data.mkdir(mode=0o700, exist_ok=True)  # etcd warns about anything wider than 0700
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        self._spawn("etcd", [
            "--name=sluice", f"--data-dir={data}",
            f"--listen-client-urls={self.etcd_url}", f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=sluice={peer}", "--unsafe-no-fsync=true", "--log-level=warn"])
        self._wait("etcd /health", deadline, self._etcd_healthy)
        self.timings["etcd"] = time.monotonic() - t

        self._spawn("kube-apiserver", [
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",
            f"--secure-port={self.api_port}", f"--cert-dir={self.dir / 'apiserver-certs'}",
            f"--tls-cert-file={self.apiserver_cert}",
            f"--tls-private-key-file={self.apiserver_key}",
            f"--client-ca-file={self.ca_cert}",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={self.sa_pub}",
            f"--service-account-signing-key-file={self.sa_key}",
            "--v=1"])
        self._wait("kube-apiserver /readyz", deadline,
                   lambda: self._api_get("/readyz") == (200, b"ok"))
        self.timings["kube-apiserver"] = time.monotonic() - t

        self._spawn("kube-controller-manager", [
            f"--kubeconfig={kcm_kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={self.kcm_port}",
            f"--cert-dir={self.dir / 'kcm-certs'}", "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={self.sa_key}",
            f"--root-ca-file={self.ca_cert}",
            f"--cluster-signing-cert-file={self.ca_cert}",
            f"--cluster-signing-key-file={self.ca_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--v=1"])
        self._wait("kube-controller-manager /healthz", deadline, self._kcm_healthy)
        self._wait("ServiceAccount default/default (created by the controller-manager)",
                   deadline,
                   lambda: self._api_get("/api/v1/namespaces/default/serviceaccounts/default")[0]
                   == 200)
        self.timings["kube-controller-manager"] = time.monotonic() - t

    def _spawn(self, name: str, args: list[str]) -> None:
        self.procs.append(_Proc(name, [str(self.bin / name), *args],
                                self.log_dir / f"{name}.log", self.dir))

    def _wait(self, what: str, deadline: float, ready: Any) -> None:
        last: object = None
        while True:
            for p in self.procs:
                if not p.running:
                    raise ControlPlaneStartError(
                        f"{p.name} exited with code {p.popen.returncode} while waiting for "
                        f"{what}\n{self.log_report()}")
            try:
                if ready():
                    return
            except (OSError, ssl.SSLError, ValueError) as exc:
                last = exc
            if time.monotonic() > deadline:
                raise ControlPlaneStartError(
                    f"timed out waiting for {what} (last error: {last!r})\n{self.log_report()}")
            time.sleep(0.1)

    # -- HTTP probes ----------------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx

    def _api_get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.server + path, timeout=2,
                                        context=self._ssl_context()) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _etcd_healthy(self) -> bool:
        with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as r:
            return bool(json.loads(r.read()).get("health") == "true")

    def _kcm_healthy(self) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # self-signed serving certificate of its own
        with urllib.request.urlopen(f"https://127.0.0.1:{self.kcm_port}/healthz", timeout=2,
                                    context=ctx) as r:
            return bool(r.read() == b"ok")

    # -- teardown -------------------------------------------------------------------------------
    def _stop_procs(self) -> None:
        """Reverse start order (controller-manager, API server, etcd): each with SIGTERM and a
        grace period; stopping them all at once makes the API server wait on a dead etcd."""
        while self.procs:
            self.procs.pop().stop()

    def close(self, *, keep: bool = False) -> None:
        """Stop everything; remove the directory unless ``keep`` (or ``SLUICE_KEEP=1``)."""
        t = time.monotonic()
        self._stop_procs()
        self.timings["teardown"] = time.monotonic() - t
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if not keep and os.environ.get("SLUICE_KEEP") != "1":
            shutil.rmtree(self.dir, ignore_errors=True)

    def _kill(self) -> None:
        while self.procs:
            self.procs.pop().kill()

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(keep=e is not None)

    def __repr__(self) -> str:
        return f"<ControlPlane {self.server} {self.pids()}>"


def _kill_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for cp in live:
        with contextlib.suppress(Exception):
            cp._kill()


atexit.register(_kill_all)

__all__ = ["CertificateAuthority", "ControlPlane", "ControlPlaneNotInstalled",
           "ControlPlaneStartError", "KubectlError", "bin_dir", "cache_dir", "require_binaries"]

if __name__ == "__main__":  # manual smoke test: cd tests && python -m support.control_plane
    with ControlPlane() as cp:
        print(cp, cp.timings)
        print(cp.kubectl("get", "ns").stdout)


def table(out: str) -> list[dict[str, str]]:
    """Rows of ``kubectl get`` output as {HEADER: cell}; empty cells stay (as '')."""
    lines = [line for line in out.splitlines() if line.strip()]
    starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
    names = lines[0].split()
    ends = [*starts[1:], None]
    return [{n: line[a:b].strip() for n, a, b in zip(names, starts, ends, strict=True)}
            for line in lines[1:]]
