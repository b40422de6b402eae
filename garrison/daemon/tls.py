"""TLS for a daemon listening beyond loopback: the server context, its reload, and self-signed pairs.

Modern TLS only (1.2 and 1.3, OpenSSL's default cipher choice for them). The certificate and key
come from the configuration (`tls_cert_file`, `tls_key_file`); SIGHUP loads them again into the same
context, so new connections get a renewed certificate without a restart. `garrison tls new-cert`
(and `install.sh --system`) make a self-signed pair for this host and print its fingerprint, which
clients pin or trust as their CA file.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from garrison.config import Config
from garrison.errors import ConfigError, Conflict


def server_context(config: Config) -> ssl.SSLContext | None:
    """The listening socket's TLS context, or None when no certificate is configured."""
    if not config.tls_cert_file:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    load_certificate(context, config)
    return context


def load_certificate(context: ssl.SSLContext, config: Config) -> None:
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {config.tls_cert_file} / key {config.tls_key_file}: "
                          f"{exc}", code="tls_certificate_invalid", param="tls_cert_file") from None


def fingerprint(cert_file: Path) -> str:
    """SHA-256 of the certificate (DER), as `openssl x509 -fingerprint -sha256` prints it."""
    der = ssl.PEM_cert_to_DER_cert(cert_file.read_text())
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def new_self_signed(cert_file: Path, key_file: Path, hosts: list[str] | None = None, days: int = 825) -> str:
    """A self-signed certificate for this host (its name, localhost, its loopback addresses and `hosts`);
    the key is written 0600. Returns the certificate's fingerprint."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if cert_file.exists() or key_file.exists():
        raise Conflict(f"{cert_file} or {key_file} exists; choose new files", code="file_exists")
    names = [socket.gethostname(), "localhost", "127.0.0.1", "::1", *(hosts or [])]
    alt: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return fingerprint(cert_file)
