"""Freshness: signed, versioned, expiring metadata that says which release each alias is.

A validly signed release can still be the wrong one: whoever can edit the MLflow registry
can move ``production`` back to an old version (a rollback attack) or keep serving stale
metadata (a freeze attack). fedlora keeps a TUF repository (The Update Framework, via
python-tuf) beside the registry: its targets metadata maps every ``MODEL/ALIAS`` to the
release number and manifest digest it must resolve to, and lists revoked keys and
releases. Publishers change it with every publish, promote, rollback and revoke; a
consumer refreshes it with python-tuf's client, which refuses metadata that is unsigned,
older than what it has already seen, or expired.

    repo = IndexRepository.load(fetch, signer_key)          # publisher
    repo.set_alias("intents", "production", entry); repo.files()
    client = IndexClient(fetch, cache_dir, trust)           # consumer
    client.refresh(); client.alias("intents", "production")

The trust store bootstraps the chain: a consumer accepts the repository's first root only
if trusted keys signed it, and python-tuf follows root rotations from there.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from registry.errors import RegistryError, RegistryUnavailable, VerificationError
from registry.keys import TrustStore, key_id

log = logging.getLogger(__name__)

# name -> bytes, or None when the file does not exist (a 404)
Fetch = Callable[[str], bytes | None]

REVOCATIONS_TARGET = "revocations"
# Why these lifetimes: root and targets change rarely and are signed by the release key;
# timestamp bounds how long a frozen (not updated) view can go unnoticed.
EXPIRY = {
    Root.type: dt.timedelta(days=365),
    Targets.type: dt.timedelta(days=365),
    Snapshot.type: dt.timedelta(days=30),
    Timestamp.type: dt.timedelta(days=7),
}
TOP_LEVEL = (Root.type, Targets.type, Snapshot.type, Timestamp.type)


@dataclass(frozen=True)
class AliasEntry:
    """What an alias must resolve to, as signed into the targets metadata."""

    release: int
    version: str
    digest: str
    key_id: str
    event: str = "publish"  # publish | promote | rollback
    # earlier entries of this alias, oldest first, without their own history
    previous: list[dict[str, Any]] = field(default_factory=list)

    def as_custom(self) -> dict[str, Any]:
        return asdict(self)

    def succeeding(self, entry: AliasEntry) -> AliasEntry:
        """``entry`` as the alias's new value, with this one pushed onto the history."""
        me = self.as_custom()
        me.pop("previous")
        return AliasEntry(**(entry.as_custom() | {"previous": [*self.previous, me]}))


def _alias_path(model: str, alias: str) -> str:
    return f"models/{model}/aliases/{alias}"


def _target(path: str, custom: dict[str, Any]) -> TargetFile:
    # The targets are never downloaded: the signed `custom` field is the payload. Length
    # and hash describe the canonical JSON of that payload so they stay truthful.
    body = json.dumps(custom, sort_keys=True).encode()
    return TargetFile(
        length=len(body),
        hashes={"sha256": hashlib.sha256(body).hexdigest()},
        path=path,
        unrecognized_fields={"custom": custom},
    )


def _entry(target: TargetFile | None) -> AliasEntry | None:
    return AliasEntry(**target.custom) if target else None


def _revocations(target: TargetFile | None) -> tuple[set[str], set[str]]:
    custom = target.custom if target else {}
    return set(custom.get("keys", [])), set(custom.get("releases", []))


def check_not_revoked(revocations: tuple[set[str], set[str]], *, key: str, digest: str) -> None:
    """Raise `VerificationError` if the signing key or the release digest is revoked."""
    revoked_keys, revoked_releases = revocations
    if key in revoked_keys:
        raise VerificationError("revoked-key", f"signing key {key[:16]} is revoked")
    if digest in revoked_releases:
        raise VerificationError("revoked-release", f"release {digest[:16]} is revoked")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


class IndexRepository:
    """The publisher's side: load, change, re-sign and hand back the metadata files."""

    def __init__(
        self,
        roles: dict[str, Metadata[Any]],
        signer: CryptoSigner,
        *,
        expiry: dict[str, dt.timedelta] | None = None,
    ) -> None:
        self._roles = roles
        self._signer = signer
        self._expiry = dict(EXPIRY) | (expiry or {})
        self._changed: set[str] = set()

    @staticmethod
    def signer_for(private_key: ec.EllipticCurvePrivateKey) -> CryptoSigner:
        # TUF key ids are fedlora key ids, so one id names a key everywhere.
        public = SSlibKey.from_crypto(
            private_key.public_key(), keyid=key_id(private_key.public_key())
        )
        return CryptoSigner(private_key, public)

    @classmethod
    def create(
        cls,
        private_key: ec.EllipticCurvePrivateKey,
        *,
        expiry: dict[str, dt.timedelta] | None = None,
    ) -> IndexRepository:
        """A new repository whose four top-level roles are held by one release key."""
        signer = cls.signer_for(private_key)
        now, lifetimes = _now(), dict(EXPIRY) | (expiry or {})
        root = Root(expires=now + lifetimes[Root.type], consistent_snapshot=False)
        for role in TOP_LEVEL:
            root.add_key(signer.public_key, role)
        roles: dict[str, Metadata[Any]] = {
            Root.type: Metadata(root),
            Targets.type: Metadata(Targets(expires=now + lifetimes[Targets.type])),
            Snapshot.type: Metadata(Snapshot(expires=now + lifetimes[Snapshot.type])),
            Timestamp.type: Metadata(Timestamp(expires=now + lifetimes[Timestamp.type])),
        }
        repo = cls(roles, signer, expiry=expiry)
        repo._changed = set(TOP_LEVEL)
        repo._resign(bump=False)
        repo._changed.clear()
        return repo

    @classmethod
    def load(
        cls,
        fetch: Fetch,
        private_key: ec.EllipticCurvePrivateKey,
        *,
        expiry: dict[str, dt.timedelta] | None = None,
    ) -> IndexRepository | None:
        """The current repository from the registry, or None if there is none yet."""
        roles: dict[str, Metadata[Any]] = {}
        for role in TOP_LEVEL:
            data = fetch(f"{role}.json")
            if data is None:
                if role == Root.type:
                    return None
                raise RegistryError(f"release index is incomplete: {role}.json is missing")
            roles[role] = Metadata.from_bytes(data)
        signer = cls.signer_for(private_key)
        root = roles[Root.type].signed
        for role in (Targets.type, Snapshot.type, Timestamp.type):
            if signer.public_key.keyid not in root.roles[role].keyids:
                raise RegistryError(
                    f"key {signer.public_key.keyid[:16]} may not sign the release index "
                    f"({role} role); sign with a key listed in its root metadata"
                )
            root.verify_delegate(role, roles[role].signed_bytes, roles[role].signatures)
        return cls(roles, signer, expiry=expiry)

    @property
    def targets(self) -> Targets:
        return self._roles[Targets.type].signed

    def alias(self, model: str, alias: str) -> AliasEntry | None:
        return _entry(self.targets.targets.get(_alias_path(model, alias)))

    def revocations(self) -> tuple[set[str], set[str]]:
        return _revocations(self.targets.targets.get(REVOCATIONS_TARGET))

    def set_alias(self, model: str, alias: str, entry: AliasEntry) -> None:
        path = _alias_path(model, alias)
        self.targets.targets[path] = _target(path, entry.as_custom())
        self._changed.add(Targets.type)

    def revoke(self, *, keys: set[str] = frozenset(), releases: set[str] = frozenset()) -> None:
        old_keys, old_releases = self.revocations()
        custom = {
            "keys": sorted(old_keys | set(keys)),
            "releases": sorted(old_releases | set(releases)),
        }
        self.targets.targets[REVOCATIONS_TARGET] = _target(REVOCATIONS_TARGET, custom)
        self._changed.add(Targets.type)

    def renew(self) -> None:
        """Re-sign targets, snapshot and timestamp with fresh expiry dates (new versions).

        Consumers refuse metadata past its expiry, so a registry that publishes nothing for
        longer than the timestamp's lifetime (7 days) must be renewed on a schedule.
        """
        self._changed |= {Targets.type, Snapshot.type, Timestamp.type}

    @property
    def timestamp_version(self) -> int:
        return int(self._roles[Timestamp.type].signed.version)

    def add_signer(self, public_key: ec.EllipticCurvePublicKey) -> str:
        """Let another key sign the index (key rotation); a new root version records it."""
        kid = key_id(public_key)
        key = SSlibKey.from_crypto(public_key, keyid=kid)
        root = self._roles[Root.type].signed
        for role in TOP_LEVEL:
            root.add_key(key, role)
        self._changed.add(Root.type)
        return kid

    def remove_signer(self, kid: str) -> bool:
        """Take a key's right to sign the index away (a revoked key must not keep it)."""
        root = self._roles[Root.type].signed
        if kid not in root.keys:
            return False
        if kid == self._signer.public_key.keyid:
            raise RegistryError("refusing to remove the key that signs this change")
        for role in TOP_LEVEL:
            if kid in root.roles[role].keyids:
                root.revoke_key(kid, role)
        self._changed.add(Root.type)
        return True

    def _resign(self, *, bump: bool = True) -> None:
        now = _now()
        if Root.type in self._changed:
            # Roles signed under the old root are signed again under the new one.
            self._changed |= set(TOP_LEVEL)
        if Targets.type in self._changed:
            self._changed |= {Snapshot.type, Timestamp.type}
        for role in TOP_LEVEL:
            if role not in self._changed:
                continue
            signed = self._roles[role].signed
            if bump:
                signed.version += 1
            signed.expires = now + self._expiry[role]
            if role == Snapshot.type:
                signed.meta["targets.json"] = MetaFile(
                    version=self._roles[Targets.type].signed.version
                )
            if role == Timestamp.type:
                signed.snapshot_meta = MetaFile(version=self._roles[Snapshot.type].signed.version)
            self._roles[role].signatures.clear()
            self._roles[role].sign(self._signer, append=False)

    def files(self) -> dict[str, bytes]:
        """Re-sign what changed (new versions); the files to upload.

        Root is written twice, as ``root.json`` and ``N.root.json``, because python-tuf
        walks root versions by number.
        """
        if self._changed:
            self._resign()
            self._changed.clear()
        root = self._roles[Root.type]
        out = {f"{role}.json": self._roles[role].to_bytes() for role in TOP_LEVEL}
        out[f"{root.signed.version}.root.json"] = root.to_bytes()
        return out


class _IndexFetcher(FetcherInterface):
    """Hands python-tuf the metadata files the registry holds."""

    PREFIX = "fedlora-index:/"

    def __init__(self, fetch: Fetch) -> None:
        self._fetch_file = fetch

    def _fetch(self, url: str) -> Iterator[bytes]:
        name = url.removeprefix(self.PREFIX)
        try:
            data = self._fetch_file(name)
        except RegistryUnavailable as exc:
            raise tuf_errors.DownloadError(str(exc)) from exc
        if data is None:
            raise tuf_errors.DownloadHTTPError(f"{name} not found", 404)
        yield data


def _trusted_root(data: bytes, trust: TrustStore) -> None:
    """Accept a first root only if keys of our trust store meet its root threshold."""
    try:
        root_md = Metadata[Root].from_bytes(data)
    except Exception as exc:
        raise VerificationError("index", f"release index root is malformed: {exc}") from exc
    root = root_md.signed
    trusted = [kid for kid in root.roles[Root.type].keyids if kid in trust.keys]
    for kid in trusted:
        pem = root.keys[kid].keyval.get("public", "")
        if key_id_of_pem(pem) != kid:
            raise VerificationError("index", f"root key {kid[:16]} does not match its key id")
    if len(trusted) < root.roles[Root.type].threshold:
        raise VerificationError(
            "untrusted-key", "the release index root is not held by keys in the trust store"
        )
    try:
        root.verify_delegate(Root.type, root_md.signed_bytes, root_md.signatures)
    except tuf_errors.UnsignedMetadataError as exc:
        raise VerificationError("index", f"release index root signature: {exc}") from exc


def key_id_of_pem(pem: str) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(pem.encode())
    return key_id(key)  # type: ignore[arg-type]


class IndexClient:
    """The consumer's side: refresh with python-tuf, then answer alias and revocation queries.

    ``cache`` keeps the last trusted metadata, so a restart still refuses anything older.
    """

    def __init__(self, fetch: Fetch, cache: Path, trust: TrustStore) -> None:
        self._fetch = fetch
        self._cache = cache
        self._trust = trust
        self._updater: Updater | None = None
        self._offline: Targets | None = None

    def _make_updater(self) -> Updater:
        self._cache.mkdir(parents=True, exist_ok=True)
        bootstrap: bytes | None = None
        if not (self._cache / "root.json").is_file():
            # The newest root, accepted only if trusted keys hold it: a consumer whose trust
            # store has only a rotated-in key can start after the rotation.
            data = self._fetch("root.json")
            if data is None:
                raise VerificationError("index", "the registry holds no release index")
            _trusted_root(data, self._trust)
            bootstrap = data
        else:
            bootstrap = (self._cache / "root.json").read_bytes()
        return Updater(
            metadata_dir=str(self._cache),
            metadata_base_url=_IndexFetcher.PREFIX,
            fetcher=_IndexFetcher(self._fetch),
            config=UpdaterConfig(),
            bootstrap=bootstrap,
        )

    def refresh(self) -> None:
        """Fetch and verify the newest metadata; raise `VerificationError` if it is not."""
        try:
            updater = self._make_updater()
            updater.refresh()
        except tuf_errors.ExpiredMetadataError as exc:
            raise VerificationError("expired", f"release index: {exc}") from exc
        except tuf_errors.BadVersionNumberError as exc:
            raise VerificationError("stale", f"release index replayed: {exc}") from exc
        except tuf_errors.RepositoryError as exc:
            raise VerificationError("index", f"release index: {exc}") from exc
        except tuf_errors.DownloadError as exc:
            raise RegistryUnavailable(f"cannot fetch the release index: {exc}") from exc
        self._updater = updater
        self._offline = None

    def load_cached(self) -> None:
        """Use the last metadata this client verified, without the registry (offline).

        Signatures are checked again against the cached root; expiry is not, because an
        offline node knowingly serves its last verified state (and reports ``degraded``).
        """
        try:
            root = Metadata[Root].from_file(str(self._cache / "root.json"))
            targets = Metadata[Targets].from_file(str(self._cache / "targets.json"))
            root.signed.verify_delegate(Targets.type, targets.signed_bytes, targets.signatures)
        except (OSError, tuf_errors.RepositoryError, ValueError) as exc:
            raise VerificationError("index", f"no usable cached release index: {exc}") from exc
        self._offline = targets.signed

    def _target(self, path: str) -> TargetFile | None:
        if self._updater is not None:
            return self._updater.get_targetinfo(path)
        if self._offline is not None:
            return self._offline.targets.get(path)
        raise RegistryError("IndexClient.refresh() has not succeeded yet")

    def alias(self, model: str, alias: str) -> AliasEntry | None:
        return _entry(self._target(_alias_path(model, alias)))

    def revocations(self) -> tuple[set[str], set[str]]:
        return _revocations(self._target(REVOCATIONS_TARGET))

    def check(self, *, model: str, alias: str | None, key: str, digest: str, release: int) -> None:
        """Refuse a verified release that is revoked or is not what ``alias`` points to."""
        check_not_revoked(self.revocations(), key=key, digest=digest)
        if alias is None:
            return
        entry = self.alias(model, alias)
        if entry is None:
            raise VerificationError("index", f"the release index has no {model}@{alias}")
        if entry.digest != digest:
            raise VerificationError(
                "stale",
                f"{model}@{alias} must be release {entry.release} ({entry.digest[:16]}), "
                f"the registry offered release {release} ({digest[:16]})",
            )
