"""Sign and verify release directories in the OpenSSF model-signing format.

The signature is ``DIR/model.sig``: a Sigstore bundle (key-based, EC P-256) whose in-toto
statement lists the SHA-256 of every other file in the directory. The stock command
``model_signing verify key DIR --signature DIR/model.sig --public_key KEY.pub`` accepts it.
A file added, removed or changed after signing fails verification.

    sign_release(Path("release"), private_key=Path("keys/signing-key.pem"))
    verified = verify_release(Path("release"), TrustStore.load(Path("trust")))
    verified.key_id, verified.digest
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_signing import hashing, signing, verifying

from registry.artifact import SIGNATURE_FILE, Provenance, read_provenance
from registry.errors import RegistryError, VerificationError
from registry.keys import TrustStore, key_id, load_private_key


@dataclass(frozen=True)
class VerifiedRelease:
    """A release directory whose every file matched a signature by a trusted key.

    Only step 1 of `registry.accept.accept`; nothing loads this type.
    """

    directory: Path
    key_id: str
    digest: str
    provenance: Provenance


def _hashing_config() -> hashing.Config:
    # Only the signature itself is left out; git files are covered like any other file.
    return hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=False)


def sign_release(directory: Path, *, private_key: Path, passphrase: str | None = None) -> str:
    """Sign every file of ``directory`` into ``directory/model.sig``; return the key id."""
    key = load_private_key(private_key, passphrase=passphrase)  # clear errors first
    signature = directory / SIGNATURE_FILE
    signature.unlink(missing_ok=True)
    config = signing.Config().use_elliptic_key_signer(
        # model-signing hands the password to cryptography, which wants bytes.
        private_key=private_key,
        password=passphrase.encode() if passphrase else None,  # type: ignore[arg-type]
    )
    config.set_hashing_config(_hashing_config()).sign(directory, signature)
    return key_id(key.public_key())


def _statement(signature: Path) -> tuple[str, dict[str, Any]]:
    """(public key hint, in-toto statement) of a bundle, before any trust decision."""
    try:
        bundle = json.loads(signature.read_text(encoding="utf-8"))
        hint = bundle["verificationMaterial"]["publicKey"]["hint"]
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise VerificationError("signature", f"{signature} is not a key-based bundle") from exc
    return str(hint), statement


def manifest_digest(statement: dict[str, Any]) -> str:
    """SHA-256 over the sorted (file name, file digest) pairs of a signed statement.

    Unlike the statement's subject digest, this also binds the file names; it does not
    depend on the signature bytes, so re-signing the same files keeps the digest.
    """
    resources = statement.get("predicate", {}).get("resources", [])
    return _pairs_digest((str(r["name"]), str(r["digest"])) for r in resources)


def files_digest(files: Mapping[str, bytes]) -> str:
    """`manifest_digest` of files held in memory: {path relative to the release: bytes}.

    A consumer that read a release's files once compares this with the digest `accept`
    returned, so what it loads are exactly the bytes whose signature was checked
    (model-signing's default file serialization: SHA-256 of each file, POSIX names).
    """
    return _pairs_digest((name, hashlib.sha256(data).hexdigest()) for name, data in files.items())


def _pairs_digest(pairs: Iterable[tuple[str, str]]) -> str:
    return hashlib.sha256(json.dumps(sorted(pairs)).encode()).hexdigest()


def verify_release(directory: Path, trust: TrustStore) -> VerifiedRelease:
    """Verify ``directory`` against the trust store; raise `VerificationError` otherwise.

    This is step 1 of `registry.accept.accept`, which runs the remaining checks (model,
    revocation, alias freshness, base model, local policy) in their fixed order.
    """
    signature = directory / SIGNATURE_FILE
    if not signature.is_file():
        raise VerificationError("unsigned", f"{directory} has no {SIGNATURE_FILE}")
    hint, statement = _statement(signature)
    kid = trust.by_hint(hint)
    if kid is None:
        raise VerificationError(
            "untrusted-key", f"{directory} is signed by a key not in {trust.directory}"
        )
    config = verifying.Config().use_elliptic_key_verifier(public_key=trust.paths[kid])
    try:
        config.set_hashing_config(_hashing_config()).verify(directory, signature)
    except ValueError as exc:
        # model-signing says which files differ, but as reprs of digest bytes. Only its
        # "Signature mismatch" comes after the statement's signature verified; any other
        # ValueError (a bundle that fails its schema) leaves the statement unverified, and
        # a message is never built from what an attacker wrote.
        verified = str(exc).startswith("Signature mismatch")
        differences = _differences(directory, statement) if verified else []
        detail = "; ".join(differences) if differences else str(exc)
        raise VerificationError("signature", f"{directory}: {detail}") from exc
    except Exception as exc:  # malformed bundles raise from deep inside sigstore/protobuf
        raise VerificationError("signature", f"{directory}: {type(exc).__name__}: {exc}") from exc
    try:
        provenance = read_provenance(directory)
    except RegistryError as exc:
        raise VerificationError("signature", f"signed but unreadable provenance: {exc}") from exc
    return VerifiedRelease(directory, kid, manifest_digest(statement), provenance)


# How many names of added or missing files an error lists.
LISTED_NAMES = 3


def _differences(directory: Path, statement: dict[str, Any]) -> list[str]:
    """How the files of ``directory`` differ from those a statement lists, for an error
    message only (the verdict is model-signing's): ``README.md: sha256 expected <hex>,
    got <hex>``, then files not signed and signed files missing."""
    try:
        signed = {
            str(r["name"]): (str(r["algorithm"]), str(r["digest"]))
            for r in statement["predicate"]["resources"]
        }
    except Exception:  # a message helper: any odd statement gives no detail
        return []
    if any(algorithm != "sha256" for algorithm, _ in signed.values()):
        return []  # what fedlora signs (_hashing_config); anything else: model-signing's words
    present = set()
    for root, _dirs, names in os.walk(directory):
        for name in names:
            path = Path(root) / name
            relative = path.relative_to(directory).as_posix()
            if relative != SIGNATURE_FILE and path.is_file() and not path.is_symlink():
                present.add(relative)
    differences = []
    for name in sorted(present & signed.keys()):
        algorithm, expected = signed[name]
        try:
            with (directory / name).open("rb") as fh:
                actual = hashlib.file_digest(fh, algorithm).hexdigest()
        except OSError:  # unreadable
            continue
        if actual != expected:
            differences.append(f"{name}: {algorithm} expected {expected}, got {actual}")
    for what, names in (
        ("not signed", present - signed.keys()),
        ("signed but missing", signed.keys() - present),
    ):
        if names:
            listed = sorted(names)
            more = f" and {len(listed) - LISTED_NAMES} more" if len(listed) > LISTED_NAMES else ""
            differences.append(f"{what}: {', '.join(listed[:LISTED_NAMES])}{more}")
    return differences


__all__ = [
    "VerifiedRelease",
    "files_digest",
    "manifest_digest",
    "sign_release",
    "verify_release",
]
