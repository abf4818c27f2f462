"""TLS for the webhook server.

Two modes, decided by :func:`ensure_certificates` at start-up:

``provided`` (cert-manager, the recommended setup): when ``tls.crt`` and ``tls.key`` exist in
``provided_dir`` (a cert-manager Certificate's Secret mounted into the operator pod), they are
used as they are. ``ca_pem`` is that directory's ``ca.crt`` (empty when absent). With
cert-manager's CA injector annotating the webhook configurations, the operator need not
patch ``caBundle`` at all; otherwise it patches ``ca_pem`` in.

``self-signed`` (no cert-manager): the operator manages its own CA. A CA (ECDSA P-256, 10
years) and a serving certificate for the given DNS names / IPs (1 year) are generated into
``directory`` and reused on the next start while they still cover those names and are not
within ``renew_before`` of expiry. ``ca_pem`` must be patched into the webhook
configurations' ``caBundle`` (by the reconcile loop). Each replica generating its own CA is
only safe with one replica: run cert-manager, or share ``directory`` (e.g. from a Secret),
when the operator runs highly available.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
CA_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"


@dataclass(frozen=True)
class CertBundle:
    cert_path: Path
    key_path: Path
    ca_pem: bytes  # PEM CA bundle for the webhook configurations' caBundle (may be empty)
    mode: str  # "provided" (cert-manager / mounted) or "self-signed" (operator-managed)


def ensure_certificates(
    directory: str | Path,
    dns_names: Sequence[str],
    ips: Sequence[str] = (),
    *,
    provided_dir: str | Path | None = None,
    validity: dt.timedelta = dt.timedelta(days=365),
    renew_before: dt.timedelta = dt.timedelta(days=30),
) -> CertBundle:
    """Return the serving certificate to use, generating a self-signed one when needed."""
    if provided_dir is not None:
        p = Path(provided_dir)
        if (p / CERT_FILE).is_file() and (p / KEY_FILE).is_file():
            ca = p / CA_FILE
            return CertBundle(p / CERT_FILE, p / KEY_FILE,
                              ca.read_bytes() if ca.is_file() else b"", "provided")
    if not dns_names and not ips:
        raise ValueError("a self-signed webhook certificate needs at least one DNS name or IP")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    if _reusable(d, dns_names, ips, now + renew_before):
        return CertBundle(d / CERT_FILE, d / KEY_FILE, (d / CA_FILE).read_bytes(), "self-signed")
    ca_key, ca_cert = _load_ca(d, now + renew_before) or _new_ca(now)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                    (list(dns_names) or list(ips))[0][:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + validity, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                     content_commitment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(d / CA_KEY_FILE, _key_pem(ca_key), private=True)
    _write(d / CA_FILE, ca_pem)
    _write(d / KEY_FILE, _key_pem(key), private=True)
    _write(d / CERT_FILE, cert.public_bytes(serialization.Encoding.PEM))
    return CertBundle(d / CERT_FILE, d / KEY_FILE, ca_pem, "self-signed")


def _new_ca(now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sluice-webhook-ca")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                     content_commitment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _load_ca(d: Path, valid_until: dt.datetime
             ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """Keep an existing CA (so caBundle stays the same) while it is valid long enough."""
    try:
        cert = x509.load_pem_x509_certificate((d / CA_FILE).read_bytes())
        key = serialization.load_pem_private_key((d / CA_KEY_FILE).read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.not_valid_after_utc < valid_until:
        return None
    return key, cert


def _reusable(d: Path, dns_names: Sequence[str], ips: Sequence[str],
              valid_until: dt.datetime) -> bool:
    try:
        cert = x509.load_pem_x509_certificate((d / CERT_FILE).read_bytes())
        ca = x509.load_pem_x509_certificate((d / CA_FILE).read_bytes())
        serialization.load_pem_private_key((d / KEY_FILE).read_bytes(), password=None)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    have_dns = set(san.get_values_for_type(x509.DNSName))
    have_ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    return (cert.issuer == ca.subject and cert.not_valid_after_utc >= valid_until
            and set(dns_names) <= have_dns
            and {str(ipaddress.ip_address(i)) for i in ips} <= have_ips)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Atomic replace, so a reader never sees half a file; private keys are 0600."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
