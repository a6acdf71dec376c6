"""The consumer's side of the release index: refresh it with python-tuf, answer from it.

An edge node or ``fedlora edge pull`` keeps the last metadata it verified in a cache
folder. `IndexClient.refresh` asks python-tuf's Updater for the newest files, which it
refuses when they are unsigned, older than the cache (a replay) or expired;
`IndexClient.load_cached` re-checks the cached signatures for a node that restarts while
the registry is down. Either way the client then answers `registry.accept`'s questions:
which release an alias is, and which keys and releases are revoked.

    client = IndexClient(store.fetch_index_file, Path("~/.cache/fedlora/tuf"), trust)
    client.refresh()
    client.alias("intents", "production").digest

The trust store bootstraps the chain: a consumer accepts the repository's first root only
if valid signatures of trusted keys meet its threshold, and python-tuf follows root
rotations from there. Every metadata file is refused before download when the registry
lists it as longer than python-tuf's limit for it (``fetch``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

from securesystemslib.exceptions import StorageError
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets
from tuf.api.serialization import DeserializationError
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from registry.errors import RegistryError, RegistryUnavailable, VerificationError
from registry.index import (
    MAX_LENGTH,
    REVOCATIONS_TARGET,
    AliasEntry,
    Fetch,
    ReleaseRecord,
    Revocations,
    alias_entry,
    alias_path,
    check_trusted_root,
    index_file,
    models_of,
    release_path,
    release_record,
    revocations_of,
)
from registry.keys import TrustStore

log = logging.getLogger(__name__)
# How long to wait before reading the index again when a file of it did not parse: MLflow
# rewrites timestamp.json in place (its local artifact store copies over the old file), so
# a read in the middle of a publish can get a truncated file. A KB-sized copy takes
# microseconds; this leaves it ample time and costs a refresh nothing otherwise.
REREAD_AFTER_S = 0.2


class _IndexFetcher(FetcherInterface):
    """Hands python-tuf the metadata files the registry holds, within python-tuf's limits.

    python-tuf passes each file's length limit to `download_bytes` but checks it only
    while reading the bytes; the registry's listing is checked first instead, so a file
    grown past its limit is refused before any of it is downloaded.
    """

    PREFIX = "fedlora-index:/"

    def __init__(self, fetch: Fetch) -> None:
        self._fetch_file = fetch

    def download_bytes(self, url: str, max_length: int) -> bytes:
        name = url.removeprefix(self.PREFIX)
        try:
            data = self._fetch_file(name, max_length)
            role, numbered = index_file(name)
            if data is None and numbered and role in (Snapshot.type, Targets.type):
                # A publisher from before consistent snapshots (2026-12-03) writes only
                # ROLE.json. python-tuf checks the version it asked for either way, so this
                # reads a snapshot or targets as the index did before: a file of another
                # version is refused as it would be under any name.
                data = self._fetch_file(f"{role}.json", max_length)
        except RegistryUnavailable as exc:
            raise tuf_errors.DownloadError(str(exc)) from exc
        if data is None:
            raise tuf_errors.DownloadHTTPError(f"{name} not found", 404)
        if len(data) > max_length:
            raise tuf_errors.DownloadLengthMismatchError(
                f"{name}: {len(data)} bytes, over the {max_length}-byte limit"
            )
        return data

    def _fetch(self, url: str) -> Iterator[bytes]:
        yield self.download_bytes(url, MAX_LENGTH[Targets.type])


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
            data = self._fetch("root.json", MAX_LENGTH[Root.type])
            if data is None:
                raise VerificationError("index", "the registry holds no release index")
            check_trusted_root(data, set(self._trust.keys))
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
        """Fetch and verify the newest metadata; raise `VerificationError` if it is not.

        A file that does not parse is read once more after `REREAD_AFTER_S` (a publish may
        have been rewriting it in place) before it is refused: what the second read gets
        is checked in full, so this only spares a consumer a false refusal.
        """
        try:
            try:
                updater = self._make_updater()
                updater.refresh()
            except DeserializationError as exc:
                log.info("release index: a file did not parse (%s); reading it again", exc)
                time.sleep(REREAD_AFTER_S)
                updater = self._make_updater()  # from what the cache holds verified
                updater.refresh()
        except tuf_errors.ExpiredMetadataError as exc:
            raise VerificationError("expired", f"release index: {exc}") from exc
        except tuf_errors.BadVersionNumberError as exc:
            raise VerificationError("stale", f"release index replayed: {exc}") from exc
        except tuf_errors.RepositoryError as exc:
            raise VerificationError("index", f"release index: {exc}") from exc
        except tuf_errors.DownloadLengthMismatchError as exc:
            raise VerificationError("fetch", f"release index: {exc}") from exc
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
        # securesystemslib reports a missing or unreadable file as its own StorageError.
        except (OSError, StorageError, tuf_errors.RepositoryError, ValueError) as exc:
            raise VerificationError("index", f"no usable cached release index: {exc}") from exc
        self._offline = targets.signed

    def _target(self, path: str) -> TargetFile | None:
        if self._updater is not None:
            return self._updater.get_targetinfo(path)
        if self._offline is not None:
            return self._offline.targets.get(path)
        raise RegistryError("IndexClient.refresh() has not succeeded yet")

    def alias(self, model: str, alias: str) -> AliasEntry | None:
        return alias_entry(self._target(alias_path(model, alias)))

    def models(self) -> dict[str, list[str]]:
        """{model: its aliases} of every model the index records (`models_of`)."""
        if self._updater is not None:
            # python-tuf lists no targets; the top-level targets it just verified are
            # persisted in the cache (the index has no delegations).
            try:
                targets = Metadata[Targets].from_file(str(self._cache / "targets.json")).signed
            except (OSError, StorageError, tuf_errors.RepositoryError, ValueError) as exc:
                raise VerificationError("index", f"cached release index: {exc}") from exc
        elif self._offline is not None:
            targets = self._offline
        else:
            raise RegistryError("IndexClient.refresh() has not succeeded yet")
        return models_of(targets.targets)

    def release(self, model: str, release: int) -> ReleaseRecord | None:
        return release_record(self._target(release_path(model, release)))

    def revocations(self) -> Revocations:
        return revocations_of(self._target(REVOCATIONS_TARGET))
