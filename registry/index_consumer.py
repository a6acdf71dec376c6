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
if trusted keys signed it, and python-tuf follows root rotations from there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from registry.errors import RegistryError, RegistryUnavailable, VerificationError
from registry.index import (
    REVOCATIONS_TARGET,
    AliasEntry,
    Fetch,
    Revocations,
    alias_entry,
    alias_path,
    revocations_of,
)
from registry.keys import TrustStore, key_id


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
        return alias_entry(self._target(alias_path(model, alias)))

    def revocations(self) -> Revocations:
        return revocations_of(self._target(REVOCATIONS_TARGET))
