"""Certificates of the Incus driver: the controller's client certificate (mTLS to the Incus API)
and one server certificate per VM (TLS to its guest agent, pinned by the controller).

Both are self-signed EC P-256 certificates made with ``cryptography``. Keys are written 0600 and
never logged. A pinned context trusts exactly one certificate (it is its only trust anchor) and
checks no host name: the address of a member may change when a VM moves, the key does not.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=3650)


@dataclass(frozen=True)
class CertPair:
    """A PEM certificate and its PEM private key (never shown in ``repr``)."""

    cert_pem: str
    key_pem: str = field(repr=False)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate's DER form, hex (what Incus calls a fingerprint)."""
        return fingerprint(self.cert_pem)


def fingerprint(cert_pem: str) -> str:
    der = x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def make_self_signed(common_name: str, *, server: bool, dns_names: tuple[str, ...] = ()) -> CertPair:
    """A new self-signed certificate for ``common_name`` (server or client use)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    if dns_names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]),
                                        critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return CertPair(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()).decode(),
    )


def _write_private(path: Path, data: str, mode: int) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_client_cert(cert_path: Path, key_path: Path, *, name: str = "remotecli-controller") -> CertPair:
    """The controller's Incus client certificate, made on first use (key 0600, certificate 0644).
    The operator adds the certificate to the cluster's trust store (docs/incus-operators-guide.md)."""
    if cert_path.is_file() and key_path.is_file():
        return CertPair(cert_path.read_text(), key_path.read_text())
    pair = make_self_signed(name, server=False)
    _write_private(key_path, pair.key_pem, 0o600)
    _write_private(cert_path, pair.cert_pem, 0o644)
    return pair


def pinned_client_context(pinned_cert_pem: str, *, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """A TLS client context that accepts exactly the server certificate ``pinned_cert_pem``
    (its only trust anchor; host names are not checked), optionally presenting a client cert."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=pinned_cert_pem)
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    return context


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The guest-agent TLS forward's server context (used inside the container; tests too)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context
