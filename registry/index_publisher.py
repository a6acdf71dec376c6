"""The publisher's side of the release index: create, change, re-sign, hand back the files.

Every publish, promote, rollback and revoke loads the index with a key its root metadata
lists, changes targets (a release record, an alias entry, the revocation list) or root (a
signer added or removed), and uploads the files `IndexRepository.files` returns: each
changed role gets a new version and a fresh expiry date, signed again (see
`registry.index`).

A publisher trusts the registry no more than a consumer does. Loading checks what
python-tuf's client checks, except expiry (a publisher may renew an expired index):
roots are followed version by version from the last root this publisher trusted, each
signed by its predecessor; every other role must verify under that root, be of its own
type, and be no older than the version this publisher last saw. What it saw is kept in a
local state folder, like a consumer's metadata cache, so whoever can write the registry
can neither replay an older index (one before a revocation) into a publisher, which
would sign it again, nor make it start a new, empty one.

    repo = IndexRepository.load(store.fetch_index_file, private_key, state=Path("state"))
    repo.set_alias("intents", "production", entry)
    store.upload_index(repo.files())
    repo.remember()
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp

from clients.task.files import write_atomic
from registry.errors import RegistryError, VerificationError
from registry.index import (
    EXPIRY,
    MAX_LENGTH,
    REVOCATIONS_TARGET,
    TOP_LEVEL,
    AliasEntry,
    Fetch,
    ReleaseRecord,
    Revocations,
    alias_entry,
    alias_path,
    check_trusted_root,
    release_path,
    release_record,
    revocations_of,
    target_file,
    utc_now,
)
from registry.keys import key_id

log = logging.getLogger(__name__)


class IndexRepository:
    """The publisher's side: load, change, re-sign and hand back the metadata files."""

    def __init__(
        self,
        roles: dict[str, Metadata[Any]],
        signer: CryptoSigner,
        *,
        expiry: dict[str, dt.timedelta] | None = None,
        state: Path | None = None,
    ) -> None:
        self._roles = roles
        self._signer = signer
        self._expiry = dict(EXPIRY) | (expiry or {})
        self._changed: set[str] = set()
        # Roles signed since `files` last handed them out: their version-named copies are
        # still to be written (consistent snapshots).
        self._unwritten: set[str] = set()
        self._state = state
        # timestamp.json as read from the registry (None for a new index): `write_index`
        # writes only while the registry still holds it.
        self.loaded_timestamp: bytes | None = None
        # Set by `write_index` as it starts to upload timestamp.json: from then on the
        # registry may serve this change, so a failure must not undo what it names.
        self.timestamp_sent = False

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
        state: Path | None = None,
    ) -> IndexRepository:
        """A new repository whose four top-level roles are held by one release key."""
        signer = cls.signer_for(private_key)
        now, lifetimes = utc_now(), dict(EXPIRY) | (expiry or {})
        root = Root(expires=now + lifetimes[Root.type], consistent_snapshot=True)
        for role in TOP_LEVEL:
            root.add_key(signer.public_key, role)
        roles: dict[str, Metadata[Any]] = {
            Root.type: Metadata(root),
            Targets.type: Metadata(Targets(expires=now + lifetimes[Targets.type])),
            Snapshot.type: Metadata(Snapshot(expires=now + lifetimes[Snapshot.type])),
            Timestamp.type: Metadata(Timestamp(expires=now + lifetimes[Timestamp.type])),
        }
        repo = cls(roles, signer, expiry=expiry, state=state)
        repo._changed = set(TOP_LEVEL)
        repo._resign(bump=False)  # every role is unwritten
        repo._changed.clear()
        return repo

    @classmethod
    def load(
        cls,
        fetch: Fetch,
        private_key: ec.EllipticCurvePrivateKey,
        *,
        state: Path | None = None,
        trusted: frozenset[str] = frozenset(),
        expiry: dict[str, dt.timedelta] | None = None,
    ) -> IndexRepository | None:
        """The current repository from the registry, or None if there is none yet.

        Args:
            fetch: reads one metadata file of the registry within a length limit.
            private_key: the key this publisher signs with; it must hold every role.
            state: the folder where this publisher keeps the last index it saw; None only
                for a throwaway repository (tests), which then has no replay protection.
            trusted: key ids, besides the publisher's own, whose signatures may hold a root
                this publisher has never seen before.
            expiry: role lifetimes, for tests.

        Raises:
            VerificationError: ``stale`` for a role older than this publisher saw,
                ``untrusted-key``/``index`` for a root or role that does not verify.
            RegistryError: the index is gone or incomplete, or the key may not sign it.
        """
        signer = cls.signer_for(private_key)
        own = signer.public_key.keyid
        seen = _read_state(state)
        if Root.type in seen:
            root_md = seen[Root.type]
        else:
            data = fetch("root.json", MAX_LENGTH[Root.type])
            if data is None:
                return None
            _check_may_sign(_metadata(data, Root.type).signed, own)
            try:
                root_md = check_trusted_root(data, {own, *trusted})
            except VerificationError as exc:
                raise VerificationError(
                    exc.reason,
                    "the release index root is signed neither by this publisher's key nor by "
                    "a key of its trust store; a key added with add-signer passes --trust "
                    "(holding a key that signed the root) the first time it is used",
                ) from exc
        root_md = _newest_root(fetch, root_md)
        root = root_md.signed
        _check_may_sign(root, own)
        roles: dict[str, Metadata[Any]] = {Root.type: root_md}
        for role in (Targets.type, Snapshot.type, Timestamp.type):
            data = fetch(f"{role}.json", MAX_LENGTH[role])
            if data is None:
                raise RegistryError(
                    f"release index is incomplete: {role}.json is missing"
                    + (
                        f"; this publisher saw version {seen[role].signed.version} of it, so it "
                        f"will not start a new index (restore it, or remove {state} to start "
                        "over)"
                        if role in seen
                        else ""
                    )
                )
            md = _metadata(data, role)
            try:
                root.verify_delegate(role, md.signed_bytes, md.signatures)
            except tuf_errors.UnsignedMetadataError as exc:
                raise VerificationError("index", f"release index {role}: {exc}") from exc
            if role in seen and md.signed.version < seen[role].signed.version:
                raise VerificationError(
                    "stale",
                    f"release index replayed: the registry holds {role} version "
                    f"{md.signed.version}, this publisher already saw version "
                    f"{seen[role].signed.version} ({state})",
                )
            if role == Targets.type and role in seen:
                _warn_if_overwritten(fetch, root, seen[role], md)
            roles[role] = md
        repo = cls(roles, signer, expiry=expiry, state=state)
        repo.loaded_timestamp = data  # the last role read is the timestamp
        repo.remember()
        revoked_keys, _ = repo.revocations()
        if own in revoked_keys:
            raise RegistryError(
                f"key {own[:16]} is revoked in the release index; sign with another key"
            )
        for kid in sorted(revoked_keys & set(root.keys)):
            # A revoke whose upload stopped before the root (written last) left the key
            # in it: this change completes the removal.
            log.warning("key %s is revoked but may still sign the release index: this "
                        "change removes it", kid[:16])  # fmt: skip
            repo.remove_signer(kid)
        if not root.consistent_snapshot and own in root.roles[Root.type].keyids:
            # An index from before consistent snapshots (2026-12-03) takes them at its next
            # change: a new root version, so every role is signed and written by version.
            root.consistent_snapshot = True
            repo._changed.add(Root.type)
        return repo

    def remember(self) -> None:
        """Keep the current metadata as the last this publisher saw (no-op without state)."""
        if self._state is None:
            return
        for role in TOP_LEVEL:
            write_atomic(self._state / f"{role}.json", self._roles[role].to_bytes())

    @property
    def targets(self) -> Targets:
        return self._roles[Targets.type].signed

    def alias(self, model: str, alias: str) -> AliasEntry | None:
        return alias_entry(self.targets.targets.get(alias_path(model, alias)))

    def release(self, model: str, release: int) -> ReleaseRecord | None:
        return release_record(self.targets.targets.get(release_path(model, release)))

    def releases(self, model: str) -> list[ReleaseRecord]:
        """Every release of ``model`` the index records, by release number."""
        prefix = release_path(model, 0).removesuffix("0")
        found = [
            release_record(target)
            for path, target in self.targets.targets.items()
            if path.startswith(prefix)
        ]
        return sorted((r for r in found if r is not None), key=lambda r: r.release)

    def add_release(self, model: str, record: ReleaseRecord) -> None:
        path = release_path(model, record.release)
        known = self.release(model, record.release)
        if known is not None and known.digest != record.digest:
            raise RegistryError(
                f"release {record.release} of {model!r} is already {known.digest[:16]} "
                f"(version {known.version}); a different release needs a new number"
            )
        self.targets.targets[path] = target_file(path, record.as_custom())
        self._changed.add(Targets.type)

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
            self._unwritten.add(role)

    def files(self) -> dict[str, bytes]:
        """Re-sign what changed (new versions); the files to upload, in the order of
        `MlflowStore.upload_index` (timestamp after targets and snapshot, root last).

        A role signed since the last call is written as ``ROLE.json`` and, N its version,
        as ``N.ROLE.json``, which is written once (two publishers that race may both
        write one: `registry.lifecycle.write_index`). python-tuf walks root versions by
        number, and with consistent snapshots (TUF specification 1.0, 5.5 and 5.6; the
        root's ``consistent_snapshot``) its client reads the snapshot and targets versions
        the timestamp names, so a consumer that refreshes while an upload is half done reads
        the previous index whole, not targets of the new one under the old snapshot
        (which it would refuse as replayed). The timestamp has no numbered copy (the
        specification names none); roles not signed anew are not written at all.
        """
        if self._changed:
            self._resign()
            self._changed.clear()
        consistent = self._roles[Root.type].signed.consistent_snapshot
        out: dict[str, bytes] = {}
        for role in TOP_LEVEL:
            if role not in self._unwritten:
                continue
            md = self._roles[role]
            data = md.to_bytes()
            if role == Root.type or (consistent and role != Timestamp.type):
                out[f"{md.signed.version}.{role}.json"] = data
            out[f"{role}.json"] = data
        self._unwritten.clear()
        return out


def _warn_if_overwritten(
    fetch: Fetch, root: Root, seen: Metadata[Targets], now: Metadata[Targets]
) -> None:
    """Warn when the targets version this publisher last saw (usually: wrote) is now held
    by other, validly signed targets: another publisher wrote the same version at the same
    time, after this one read its own back, so this one's change may be lost. Compared
    with that version's numbered copy (written once per version, so also after later
    versions), else with ``now`` if it is that version; unreadable copies are ignored."""
    version = seen.signed.version
    other: Metadata[Targets] | None = now if now.signed.version == version else None
    if other is None and root.consistent_snapshot:
        try:
            data = fetch(f"{version}.targets.json", MAX_LENGTH[Targets.type])
            if data is not None:
                md = _metadata(data, Targets.type)
                root.verify_delegate(Targets.type, md.signed_bytes, md.signatures)
                other = md if md.signed.version == version else None
        except (RegistryError, tuf_errors.RepositoryError):
            return  # nothing a consumer reads; not this check's business
    if other is None:
        return
    old, new = seen.signed.targets, other.signed.targets
    differ = sorted(p for p in old.keys() | new.keys() if old.get(p) != new.get(p))
    if differ:
        log.warning(
            "release index targets version %d is not the one this publisher saw: another "
            "publisher wrote that version at the same time, and what differs (%s) may be a "
            "lost change of this publisher's; check `fedlora registry show` and run it again",
            version,
            ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else ""),
        )


def _metadata(data: bytes, role: str) -> Metadata[Any]:
    """Parse one role's metadata; a validly signed file of another role is refused too."""
    try:
        md = Metadata.from_bytes(data)
    except (tuf_errors.RepositoryError, ValueError, KeyError, TypeError) as exc:
        raise VerificationError("index", f"release index {role}.json is malformed: {exc}") from exc
    if md.signed.type != role:
        raise VerificationError("index", f"release index {role}.json holds {md.signed.type}")
    return md


def _check_may_sign(root: Root, own: str) -> None:
    for role in (Targets.type, Snapshot.type, Timestamp.type):
        if own not in root.roles[role].keyids:
            raise RegistryError(
                f"key {own[:16]} may not sign the release index "
                f"({role} role); sign with a key listed in its root metadata"
            )


def _newest_root(fetch: Fetch, root_md: Metadata[Root]) -> Metadata[Root]:
    """Follow ``N+1.root.json`` from a trusted root, as python-tuf's client does (5.3)."""
    for _ in range(256):  # python-tuf's default max_root_rotations
        version = root_md.signed.version + 1
        data = fetch(f"{version}.root.json", MAX_LENGTH[Root.type])
        if data is None:
            return root_md
        new = _metadata(data, Root.type)
        try:
            root_md.signed.verify_delegate(Root.type, new.signed_bytes, new.signatures)
            new.signed.verify_delegate(Root.type, new.signed_bytes, new.signatures)
        except tuf_errors.UnsignedMetadataError as exc:
            raise VerificationError("index", f"release index root {version}: {exc}") from exc
        if new.signed.version != version:
            raise VerificationError(
                "index", f"{version}.root.json holds root version {new.signed.version}"
            )
        root_md = new
    raise VerificationError("index", "release index: more than 256 root versions at once")


def _read_state(state: Path | None) -> dict[str, Metadata[Any]]:
    """The metadata this publisher last saw: its own files, trusted as they are."""
    if state is None:
        return {}
    seen: dict[str, Metadata[Any]] = {}
    for role in TOP_LEVEL:
        path = state / f"{role}.json"
        if path.is_file():
            seen[role] = _metadata(path.read_bytes(), role)
    return seen
