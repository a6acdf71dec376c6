"""The federation's keys and certificates, made with the `cryptography` package.

A federation has one certificate authority (CA). The CA signs the SuperLink's TLS
certificate, which names the host names and addresses sites reach it by (subject
alternative names, RFC 5280 §4.2.1.6); sites and the ``flwr`` CLI trust the CA's
certificate (``--root-certificates``). Each site has an EC P-384 key pair in OpenSSH
format: the SuperLink knows the public key (``flwr supernode register``) and the
SuperNode signs its Fleet API requests with the private key
(``--auth-supernode-private-key``), which is how Flower's SuperNode authentication
tells one node from another (Flower 1.41 accepts NIST EC curves in OpenSSH format).

Private keys are created with mode 0600 and never overwritten; nothing here prints or
logs a key.

Usage::

    ca = make_ca("fedlora federation")
    write_private_key(out / "ca.key", ca.key)
    cert, key = make_server_certificate(ca, sans=["superlink.example.org", "10.0.0.5"])
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clients.task.errors import ConfigError

CURVE = ec.SECP384R1()  # P-384: what Flower's docs use for node keys; fine for TLS too
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest server-certificate lifetime browsers and CAs accept


@dataclass(frozen=True)
class Authority:
    """A CA: its key and self-signed certificate."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(common_name: str, *, days: int = CA_DAYS) -> Authority:
    """A new CA key and its self-signed certificate (may sign certificates, nothing else)."""
    key = ec.generate_private_key(CURVE)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return Authority(key=key, certificate=cert)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not name or any(c.isspace() for c in name) or "/" in name:
        raise ConfigError(f"--san {name!r} is neither a host name nor an IP address")
    return x509.DNSName(name)


def make_server_certificate(
    ca: Authority, *, sans: list[str], days: int = SERVER_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A TLS server certificate signed by ``ca`` for every name in ``sans``.

    Raises:
        ConfigError: If ``sans`` is empty or holds something that is not a name or address.
    """
    if not sans:
        raise ConfigError("the SuperLink certificate needs at least one --san")
    key = ec.generate_private_key(CURVE)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(sans[0]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA384())
    )
    return cert, key


def make_node_key() -> ec.EllipticCurvePrivateKey:
    """A site's SuperNode authentication key (EC P-384)."""
    return ec.generate_private_key(CURVE)


def node_public_openssh(key: ec.EllipticCurvePublicKey) -> bytes:
    """The public key as one OpenSSH line, the format ``flwr supernode register`` reads."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def fingerprint(public_openssh: bytes) -> str:
    """SHA-256 of an OpenSSH public key line (its key blob), as ``sha256:HEX``."""
    return "sha256:" + hashlib.sha256(public_openssh.split()[1]).hexdigest()


def fingerprint_pem(public_pem: bytes) -> str:
    """`fingerprint` of a PEM public key (how Flower's SuperLink stores a node's key).

    Raises:
        ValueError: If it is not a PEM EC public key.
    """
    key = serialization.load_pem_public_key(public_pem)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"not an EC public key: {type(key).__name__}")
    return fingerprint(node_public_openssh(key))


def write_private_key(
    path: Path, key: ec.EllipticCurvePrivateKey, *, openssh: bool = False
) -> None:
    """Write an unencrypted private key, mode 0600; an existing file is never replaced.

    The key is unencrypted because Flower's processes read it without a passphrase; the
    file mode and the directory's owner protect it.

    Raises:
        ConfigError: If ``path`` exists.
    """
    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"{path} exists; refusing to overwrite a key") from exc
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate or public key (not secret), mode 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_authority(key_path: Path, cert_path: Path) -> Authority:
    """Read a CA written by `write_private_key` and `write_public`.

    Raises:
        ConfigError: If either file is missing or unreadable.
    """
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the federation CA ({key_path}, {cert_path}): {exc}"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path} is not an EC private key")
    return Authority(key=key, certificate=cert)
