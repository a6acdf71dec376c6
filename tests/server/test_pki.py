"""The federation's CA, SuperLink certificate and node keys (cryptography, no openssl)."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from clients.task.errors import ConfigError
from server import pki


def test_the_server_certificate_names_every_san_and_chains_to_the_ca() -> None:
    ca = pki.make_ca("test CA")
    cert, key = pki.make_server_certificate(ca, sans=["superlink.example.org", "10.1.2.3"])
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    cert.verify_directly_issued_by(ca.certificate)  # raises if the CA did not sign it
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(key.curve, ec.SECP384R1)
    with pytest.raises(ConfigError, match="neither a host name nor an IP"):
        pki.make_server_certificate(ca, sans=["bad name"])


def test_private_keys_are_0600_and_never_overwritten(tmp_path: Path) -> None:
    key = pki.make_node_key()
    path = tmp_path / "node.key"
    pki.write_private_key(path, key, openssh=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        pki.write_private_key(path, pki.make_node_key(), openssh=True)


def test_the_node_public_key_is_what_flwr_supernode_register_reads() -> None:
    key = pki.make_node_key()
    line = pki.node_public_openssh(key.public_key())
    assert line.startswith(b"ecdsa-sha2-nistp384 ")
    loaded = load_ssh_public_key(line)
    assert isinstance(loaded, ec.EllipticCurvePublicKey)
    assert loaded.public_numbers() == key.public_key().public_numbers()
    assert pki.fingerprint(line).startswith("sha256:") and len(pki.fingerprint(line)) == 71
