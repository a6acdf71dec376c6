"""The release index: signed, versioned, expiring metadata that says which release each alias is.

A validly signed release can still be the wrong one: whoever can edit the MLflow registry
can move ``production`` back to an old version (a rollback attack) or keep serving stale
metadata (a freeze attack). fedlora keeps a TUF repository (The Update Framework, via
python-tuf) beside the registry: its targets metadata maps every ``MODEL/ALIAS`` to the
release number and manifest digest it must resolve to, and lists revoked keys and
releases. Publishers change it with every publish, promote, rollback and revoke
(`registry.index_publisher`); a consumer refreshes it with python-tuf's client, which
refuses metadata that is unsigned, older than what it has already seen, or expired
(`registry.index_consumer`). This module holds what both sides share: the targets they
read and write, and the two questions `registry.accept` asks of either side.

    repo = IndexRepository.load(fetch, signer_key)          # publisher
    repo.set_alias("intents", "production", entry); repo.files()
    client = IndexClient(fetch, cache_dir, trust)           # consumer
    client.refresh(); client.alias("intents", "production")
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from tuf.api.metadata import Root, Snapshot, TargetFile, Targets, Timestamp

from registry.errors import VerificationError

# name -> bytes, or None when the file does not exist (a 404)
Fetch = Callable[[str], bytes | None]
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


class ReleaseIndex(Protocol):
    """What `registry.accept` asks of an index, publisher's or consumer's side alike."""

    def alias(self, model: str, alias: str) -> AliasEntry | None: ...

    def revocations(self) -> Revocations: ...


def alias_path(model: str, alias: str) -> str:
    return f"models/{model}/aliases/{alias}"


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


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)
