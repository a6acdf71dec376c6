"""The publisher's side of the release index: create, change, re-sign, hand back the files.

Every publish, promote, rollback and revoke loads the index with a key its root metadata
lists, changes targets (an alias entry, the revocation list) or root (a signer added or
removed), and uploads the files `IndexRepository.files` returns: each changed role gets a
new version and a fresh expiry date, signed again (see `registry.index`).

    repo = IndexRepository.load(store.fetch_index_file, private_key)
    repo.set_alias("intents", "production", entry)
    store.upload_index(repo.files())
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp

from registry.errors import RegistryError
from registry.index import (
    EXPIRY,
    REVOCATIONS_TARGET,
    TOP_LEVEL,
    AliasEntry,
    Fetch,
    Revocations,
    alias_entry,
    alias_path,
    revocations_of,
    target_file,
    utc_now,
)
from registry.keys import key_id


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
        now, lifetimes = utc_now(), dict(EXPIRY) | (expiry or {})
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
        return alias_entry(self.targets.targets.get(alias_path(model, alias)))

    def revocations(self) -> Revocations:
        return revocations_of(self.targets.targets.get(REVOCATIONS_TARGET))

    def set_alias(self, model: str, alias: str, entry: AliasEntry) -> None:
        path = alias_path(model, alias)
        self.targets.targets[path] = target_file(path, entry.as_custom())
        self._changed.add(Targets.type)

    def revoke(self, *, keys: set[str] = frozenset(), releases: set[str] = frozenset()) -> None:
        old_keys, old_releases = self.revocations()
        custom = {
            "keys": sorted(old_keys | set(keys)),
            "releases": sorted(old_releases | set(releases)),
        }
        self.targets.targets[REVOCATIONS_TARGET] = target_file(REVOCATIONS_TARGET, custom)
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
        now = utc_now()
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
