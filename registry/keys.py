"""Signing keys and trust stores.

A key pair is an EC P-256 PEM pair (the only curve family OpenSSF model-signing accepts
besides P-384/P-521). A key's id is the SHA-256 of its DER SubjectPublicKeyInfo, so the id
does not depend on PEM line wrapping. A trust store is a directory of trusted public keys
(``*.pub`` or ``*.pem``); several may be trusted at once, which is how keys rotate.

    pair = generate_keypair(Path("keys"), passphrase="s3cret")
    trust = TrustStore.load(Path("trust"))
    trust.key(pair.key_id)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from registry.errors import KeyFileError, VerificationError

# Where a private key's passphrase is read from by default (never the command line).
PASSPHRASE_ENV = "FEDLORA_KEY_PASSPHRASE"

PRIVATE_NAME = "signing-key.pem"
PUBLIC_NAME = "signing-key.pub"
PUBLIC_SUFFIXES = (".pub", ".pem")
SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 (hex) of the DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def public_pem(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def signature_hint(public_key: ec.EllipticCurvePublicKey) -> str:
    """The hint model-signing writes into a key-based bundle: SHA-256 of the PEM."""
    return hashlib.sha256(public_pem(public_key)).hexdigest()


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    key_id: str


def generate_keypair(out: Path, *, passphrase: str | None = None) -> KeyPair:
    """Write a new EC P-256 pair into ``out``; the private key is created with mode 0600.

    Refuses to overwrite an existing key: losing a signing key is not recoverable.
    """
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / PRIVATE_NAME, out / PUBLIC_NAME
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
    private = ec.generate_private_key(ec.SECP256R1())
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode())
        if passphrase
        else serialization.NoEncryption()
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    # O_EXCL + mode at creation: the key is never readable by others, not even briefly.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(public_pem(private.public_key()))
    return KeyPair(private_path, public_path, key_id(private.public_key()))


def load_private_key(path: Path, *, passphrase: str | None = None) -> ec.EllipticCurvePrivateKey:
    """Load a PEM private key; a wrong or missing passphrase is a clear `KeyFileError`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read private key {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, passphrase.encode() if passphrase else None)
    except TypeError as exc:
        hint = (
            "it is encrypted; pass its passphrase (fedlora reads it from the environment: "
            f"{PASSPHRASE_ENV} by default, or the variable --passphrase-env / "
            "registry.passphrase-env names)"
            if not passphrase
            else "it is not encrypted"
        )
        raise KeyFileError(f"cannot load private key {path}: {hint}") from exc
    except ValueError as exc:
        if passphrase and b"ENCRYPTED" in data:
            raise KeyFileError(f"cannot load private key {path}: wrong passphrase") from exc
        raise KeyFileError(f"{path} is not a PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in SUPPORTED_CURVES:
        raise KeyFileError(f"{path} is not an EC P-256/384/521 key (model-signing needs one)")
    return key


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a PEM public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in SUPPORTED_CURVES:
        raise KeyFileError(f"{path} is not an EC P-256/384/521 public key")
    return key


@dataclass(frozen=True)
class TrustStore:
    """Trusted public keys by key id; built from a directory of PEM files."""

    directory: Path
    keys: dict[str, ec.EllipticCurvePublicKey]
    paths: dict[str, Path]

    @classmethod
    def load(cls, directory: Path) -> TrustStore:
        if not directory.is_dir():
            raise KeyFileError(f"trust store {str(directory)!r} is not a directory")
        keys: dict[str, ec.EllipticCurvePublicKey] = {}
        paths: dict[str, Path] = {}
        for path in sorted(directory.iterdir()):
            if path.suffix in PUBLIC_SUFFIXES and path.is_file():
                key = load_public_key(path)
                keys[key_id(key)] = key
                paths[key_id(key)] = path
        if not keys:
            raise KeyFileError(f"trust store {str(directory)!r} holds no .pub or .pem keys")
        return cls(directory, keys, paths)

    def key(self, kid: str) -> ec.EllipticCurvePublicKey:
        try:
            return self.keys[kid]
        except KeyError:
            raise VerificationError(
                "untrusted-key", f"key {kid[:16]} is not in the trust store {self.directory}"
            ) from None

    def by_hint(self, hint: str) -> str | None:
        """The key id whose model-signing hint is ``hint``, if trusted."""
        for kid, key in self.keys.items():
            if signature_hint(key) == hint:
                return kid
        return None
