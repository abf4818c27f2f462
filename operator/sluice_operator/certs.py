"""TLS for the webhook server.

Three modes, decided at start-up (:func:`ensure_certificates` here, or
:func:`sluice_operator.certstore.ensure_shared_certificates` when a Secret is configured):

``provided`` (cert-manager, the recommended setup): when ``tls.crt`` and ``tls.key`` exist in
``provided_dir`` (a cert-manager Certificate's Secret mounted into the operator pod), they are
used as they are. ``ca_pem`` is that directory's ``ca.crt`` (empty when absent). With
cert-manager's CA injector annotating the webhook configurations, the operator need not
patch ``caBundle`` at all; otherwise it patches ``ca_pem`` in.

``self-signed`` (no cert-manager, one replica): the operator manages its own CA. A CA (ECDSA
P-256, 10 years) and a serving certificate for the given DNS names / IPs (1 year) are generated
into ``directory`` and reused on the next start while they still cover those names and are not
within ``renew_before`` of expiry. ``ca_pem`` must be patched into the webhook configurations'
``caBundle``. Each replica generating its own CA is only safe with one replica.

``secret`` (no cert-manager, several replicas): the same material, kept in a Kubernetes Secret
that every replica reads (see :mod:`sluice_operator.certstore`), so that all replicas serve one
certificate and patch one ``caBundle``.

:class:`CertMaterial`, :func:`issue` and :func:`reusable` are the PEM-level pieces both the
directory and the Secret modes use.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
CA_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
VALIDITY = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class CertBundle:
    cert_path: Path
    key_path: Path
    ca_pem: bytes  # PEM CA bundle for the webhook configurations' caBundle (may be empty)
    mode: str  # "provided" (cert-manager / mounted), "self-signed" (local dir) or "secret"


@dataclass(frozen=True)
class CertMaterial:
    """A self-signed setup in PEM: the CA (certificate and key) and the serving pair."""

    ca_cert: bytes
    ca_key: bytes
    cert: bytes
    key: bytes


def provided_bundle(provided_dir: str | Path | None) -> CertBundle | None:
    """cert-manager's mounted files, when they are there."""
    if provided_dir is None:
        return None
    p = Path(provided_dir)
    if not ((p / CERT_FILE).is_file() and (p / KEY_FILE).is_file()):
        return None
    ca = p / CA_FILE
    return CertBundle(p / CERT_FILE, p / KEY_FILE, ca.read_bytes() if ca.is_file() else b"",
                      "provided")


def ensure_certificates(
    directory: str | Path,
    dns_names: Sequence[str],
    ips: Sequence[str] = (),
    *,
    provided_dir: str | Path | None = None,
    validity: dt.timedelta = VALIDITY,
    renew_before: dt.timedelta = RENEW_BEFORE,
) -> CertBundle:
    """Return the serving certificate to use, generating a self-signed one when needed."""
    provided = provided_bundle(provided_dir)
    if provided is not None:
        return provided
    if not dns_names and not ips:
        raise ValueError("a self-signed webhook certificate needs at least one DNS name or IP")
    d = Path(directory)
    now = dt.datetime.now(dt.UTC)
    current = read_material(d)
    if current is not None and reusable(current, dns_names, ips, now + renew_before):
        return bundle_in(d, current, "self-signed")
    material = issue(dns_names, ips, previous=current, now=now, validity=validity,
                     renew_before=renew_before)
    return write_material(d, material, "self-signed")


def issue(
    dns_names: Iterable[str],
    ips: Iterable[str] = (),
    *,
    previous: CertMaterial | None = None,
    now: dt.datetime | None = None,
    validity: dt.timedelta = VALIDITY,
    renew_before: dt.timedelta = RENEW_BEFORE,
) -> CertMaterial:
    """A new serving certificate for exactly these names, signed by ``previous``'s CA while that
    CA stays valid beyond ``renew_before`` (so ``caBundle`` does not change), else by a new CA."""
    dns_names, ips = list(dns_names), list(ips)
    if not dns_names and not ips:
        raise ValueError("a self-signed webhook certificate needs at least one DNS name or IP")
    now = now or dt.datetime.now(dt.UTC)
    ca = _load_ca(previous, now + renew_before) if previous is not None else None
    ca_key, ca_cert = ca or _new_ca(now)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                    (dns_names or ips)[0][:64])]))
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
    return CertMaterial(ca_cert=ca_cert.public_bytes(serialization.Encoding.PEM),
                        ca_key=_key_pem(ca_key),
                        cert=cert.public_bytes(serialization.Encoding.PEM), key=_key_pem(key))


def reusable(material: CertMaterial, dns_names: Iterable[str], ips: Iterable[str],
             valid_until: dt.datetime) -> bool:
    """The serving certificate covers the names, is valid until ``valid_until``, is signed by
    the CA and matches its key (anything unreadable: not reusable)."""
    try:
        cert = x509.load_pem_x509_certificate(material.cert)
        ca = x509.load_pem_x509_certificate(material.ca_cert)
        key = serialization.load_pem_private_key(material.key, password=None)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    have_dns, have_ips = certificate_names(material)
    return (cert.not_valid_after_utc >= valid_until
            and key.public_key() == cert.public_key()
            and set(dns_names) <= have_dns
            and {str(ipaddress.ip_address(i)) for i in ips} <= have_ips)


def certificate_names(material: CertMaterial) -> tuple[set[str], set[str]]:
    """The DNS names and IPs the serving certificate covers (empty when unreadable)."""
    try:
        cert = x509.load_pem_x509_certificate(material.cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return set(), set()
    return (set(san.get_values_for_type(x509.DNSName)),
            {str(i) for i in san.get_values_for_type(x509.IPAddress)})


def read_material(d: Path) -> CertMaterial | None:
    """What ``d`` holds; a missing file reads as empty (a CA without a serving pair is kept)."""
    def read(name: str) -> bytes:
        try:
            return (d / name).read_bytes()
        except OSError:
            return b""

    material = CertMaterial(ca_cert=read(CA_FILE), ca_key=read(CA_KEY_FILE), cert=read(CERT_FILE),
                            key=read(KEY_FILE))
    return material if any((material.ca_cert, material.ca_key, material.cert, material.key)) else None


def write_material(d: Path, material: CertMaterial, mode: str) -> CertBundle:
    """Write the files the TLS server loads (private keys 0600), each atomically."""
    d.mkdir(parents=True, exist_ok=True)
    _write(d / CA_KEY_FILE, material.ca_key, private=True)
    _write(d / CA_FILE, material.ca_cert)
    _write(d / KEY_FILE, material.key, private=True)
    _write(d / CERT_FILE, material.cert)
    return bundle_in(d, material, mode)


def bundle_in(d: Path, material: CertMaterial, mode: str) -> CertBundle:
    return CertBundle(d / CERT_FILE, d / KEY_FILE, material.ca_cert, mode)


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


def _load_ca(material: CertMaterial, valid_until: dt.datetime
             ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """Keep an existing CA (so caBundle stays the same) while it is valid long enough."""
    try:
        cert = x509.load_pem_x509_certificate(material.ca_cert)
        key = serialization.load_pem_private_key(material.ca_key, password=None)
    except (ValueError, TypeError):
        return None
    if (not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key()
            or cert.not_valid_after_utc < valid_until):
        return None
    return key, cert


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
