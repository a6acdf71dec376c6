"""The release index: signed, versioned, expiring metadata that says which release each alias is.

A validly signed release can still be the wrong one: whoever can edit the MLflow registry
can move ``production`` back to an old version (a rollback attack) or keep serving stale
metadata (a freeze attack). fedlora keeps a TUF repository (The Update Framework, via
python-tuf) beside the registry: its targets metadata maps every ``MODEL/ALIAS`` to the
release number and manifest digest it must resolve to, records every published release
(`ReleaseRecord`: its MLflow version, digest and the exact size of every file), and lists
revoked keys and releases. Publishers change it with every publish, promote, rollback and
revoke (`registry.index_publisher`) and decide from it alone, never from MLflow's tags;
a consumer refreshes it with python-tuf's client, which refuses metadata that is
unsigned, older than what it has already seen, or expired (`registry.index_consumer`),
and fetches only the files a record names. This module holds what both sides share: the
targets they read and write, and the questions `registry.accept` asks of either side.

    repo = IndexRepository.load(fetch, signer_key)          # publisher
    repo.set_alias("intents", "production", entry); repo.files()
    client = IndexClient(fetch, cache_dir, trust)           # consumer
    client.refresh(); client.alias("intents", "production")
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.ngclient import UpdaterConfig

from registry.errors import VerificationError
from registry.keys import key_id

# (name, max_length) -> bytes, or None when the file does not exist (a 404). A file the
# registry lists as longer than max_length is refused before it is downloaded
# (`VerificationError` ``fetch``).
Fetch = Callable[[str, int], bytes | None]
# (revoked key ids, revoked release digests)
Revocations = tuple[set[str], set[str]]

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
# python-tuf's own length limits for metadata files, used by publishers and consumers alike.
_LIMITS = UpdaterConfig()
MAX_LENGTH = {
    Root.type: _LIMITS.root_max_length,
    Targets.type: _LIMITS.targets_max_length,
    Snapshot.type: _LIMITS.snapshot_max_length,
    Timestamp.type: _LIMITS.timestamp_max_length,
}

# Upload order of the index's roles (`index_upload_order`): a reader that races a publisher
# may see new targets before the timestamp that points at them, never a timestamp without
# its targets. The root goes last: every role is signed by the publisher's key, which the
# loaded root lists (`IndexRepository.load` checks), so the new files verify under the old
# root until the new one lands, where a root written first would refuse the old timestamp
# if it removed the key that signed it.
UPLOAD_ORDER = (Targets.type, Snapshot.type, Timestamp.type, Root.type)


def index_file(name: str) -> tuple[str, bool]:
    """The role an index file holds, and whether the name is a numbered copy (consistent
    snapshots): ``("targets", True)`` for ``4.targets.json``, ``("root", False)`` for
    ``root.json``."""
    prefix, _, role = name.removesuffix(".json").rpartition(".")
    return role, prefix.isdigit()


def index_upload_order(names: Iterable[str]) -> list[str]:
    """Index file names in the order they are uploaded: by role (`UPLOAD_ORDER`), each
    role's numbered copy before its ``ROLE.json``."""

    def rank(name: str) -> tuple[int, bool]:
        role, numbered = index_file(name)
        return UPLOAD_ORDER.index(role), not numbered

    return sorted(names, key=rank)


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


@dataclass(frozen=True)
class ReleaseRecord:
    """One published release as signed into the targets metadata.

    Everything a publisher decides (the next release number, whether a release is already
    published, which digest ``revoke --version`` means, which version ``promote`` may take)
    and everything a consumer fetches (which MLflow version, which files, how large) comes
    from these records, never from MLflow's tags.
    """

    release: int
    version: str  # the MLflow model version that holds the files
    digest: str  # manifest digest (`registry.signing.manifest_digest`)
    key_id: str
    adapter_digest: str
    files: dict[str, int]  # every file of the release, model.sig included -> size in bytes

    def as_custom(self) -> dict[str, Any]:
        return asdict(self)


class ReleaseIndex(Protocol):
    """What `registry.accept` and the fetchers ask of an index, either side alike."""

    def alias(self, model: str, alias: str) -> AliasEntry | None: ...

    def release(self, model: str, release: int) -> ReleaseRecord | None: ...

    def revocations(self) -> Revocations: ...


def alias_path(model: str, alias: str) -> str:
    return f"models/{model}/aliases/{alias}"


def release_path(model: str, release: int) -> str:
    return f"models/{model}/releases/{release}"


def models_of(paths: Iterable[str]) -> dict[str, list[str]]:
    """{model: its aliases, sorted} of the target paths of an index; a model with
    releases but no alias yet has an empty list."""
    models: dict[str, set[str]] = {}
    for path in paths:
        parts = path.split("/")
        if len(parts) == 4 and parts[0] == "models" and parts[2] in ("aliases", "releases"):
            aliases = models.setdefault(parts[1], set())
            if parts[2] == "aliases":
                aliases.add(parts[3])
    return {model: sorted(aliases) for model, aliases in sorted(models.items())}


def release_record(target: TargetFile | None) -> ReleaseRecord | None:
    return ReleaseRecord(**target.custom) if target else None


def target_file(path: str, custom: dict[str, Any]) -> TargetFile:
    """A target whose signed ``custom`` field is the payload; it is never downloaded."""
    # Length and hash describe the canonical JSON of the payload so they stay truthful.
    body = json.dumps(custom, sort_keys=True).encode()
    return TargetFile(
        length=len(body),
        hashes={"sha256": hashlib.sha256(body).hexdigest()},
        path=path,
        unrecognized_fields={"custom": custom},
    )


def alias_entry(target: TargetFile | None) -> AliasEntry | None:
    return AliasEntry(**target.custom) if target else None


def revocations_of(target: TargetFile | None) -> Revocations:
    custom = target.custom if target else {}
    return set(custom.get("keys", [])), set(custom.get("releases", []))


def check_not_revoked(revocations: Revocations, *, key: str, digest: str) -> None:
    """Raise `VerificationError` if the signing key or the release digest is revoked."""
    revoked_keys, revoked_releases = revocations
    if key in revoked_keys:
        raise VerificationError("revoked-key", f"signing key {key[:16]} is revoked")
    if digest in revoked_releases:
        raise VerificationError("revoked-release", f"release {digest[:16]} is revoked")


def check_alias(index: ReleaseIndex, *, model: str, alias: str, digest: str, release: int) -> None:
    """Raise `VerificationError` unless the signed index points ``model@alias`` at ``digest``.

    This refuses a replay: an older, validly signed release aliased again by whoever can
    edit the registry.
    """
    entry = index.alias(model, alias)
    if entry is None:
        raise VerificationError("index", f"the release index has no {model}@{alias}")
    if entry.digest != digest:
        raise VerificationError(
            "stale",
            f"{model}@{alias} must be release {entry.release} ({entry.digest[:16]}), "
            f"the registry offered release {release} ({digest[:16]})",
        )


def check_trusted_root(data: bytes, trusted: set[str]) -> Metadata[Root]:
    """A root accepted without an earlier one: valid signatures of ``trusted`` keys alone
    must meet its root threshold.

    Counting the keys a root merely lists would let a root that names a trusted key beside
    a key of the attacker's, threshold 1, pass on the attacker's signature alone.

    Raises:
        VerificationError: ``index`` for a malformed root, ``untrusted-key`` otherwise.
    """
    try:
        root_md = Metadata[Root].from_bytes(data)
        root = root_md.signed
        result = root.get_verification_result(Root.type, root_md.signed_bytes, root_md.signatures)
    except (tuf_errors.RepositoryError, ValueError, KeyError, TypeError) as exc:
        raise VerificationError("index", f"release index root is malformed: {exc}") from exc
    by_trusted = [kid for kid in result.signed if kid in trusted]
    for kid in by_trusted:
        pem = root.keys[kid].keyval.get("public", "")
        if _key_id_of_pem(pem) != kid:
            raise VerificationError("index", f"root key {kid[:16]} does not match its key id")
    if len(by_trusted) < root.roles[Root.type].threshold:
        raise VerificationError(
            "untrusted-key", "the release index root is not signed by keys in the trust store"
        )
    return root_md


def _key_id_of_pem(pem: str) -> str:
    key = serialization.load_pem_public_key(pem.encode())
    return key_id(key)  # type: ignore[arg-type]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)
