"""Publish, promote, roll back and revoke releases; every change is a signed index event.

Each operation checks everything it can before it changes anything, changes MLflow in the
order version -> alias -> release index, and undoes its own earlier steps if a later one
fails, so a failure leaves no new model version and no alias change.

    store = MlflowStore("http://127.0.0.1:5000")
    result = publish(store, Path("fedlora-out"), model="intents", key=signing_key)
    promote(store, model="intents", version=result.version, key=signing_key, trust=trust)
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.accept import AcceptedRelease, accept
from registry.artifact import SIGNATURE_FILE, adapter_digest, adapter_dir, build_release
from registry.errors import PromotionRefused, RegistryError, VerificationError
from registry.index import AliasEntry
from registry.index_publisher import IndexRepository
from registry.keys import TrustStore, key_id, load_private_key, load_public_key, public_pem
from registry.mlflow_store import TAG, MlflowStore, staging
from registry.policy import Policy
from registry.signing import sign_release

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
PRODUCTION = "production"
# The promotion gate named when `accept` refuses a release for this reason.
GATE_OF_REASON = {
    "unsigned": "signer",
    "untrusted-key": "signer",
    "signature": "signature",
    "index": "model",
    "revoked-key": "revocation",
    "revoked-release": "revocation",
}


@dataclass(frozen=True)
class SigningKey:
    path: Path
    passphrase: str | None = None


@dataclass(frozen=True)
class PublishResult:
    model: str
    version: str
    release: int
    digest: str
    key_id: str
    created: bool  # False when the same release was already published


def load_index(store: MlflowStore, key: SigningKey, *, create: bool) -> IndexRepository:
    private = load_private_key(key.path, passphrase=key.passphrase)
    found = IndexRepository.load(store.fetch_index_file, private)
    if found is not None:
        return found
    if not create:
        raise RegistryError(f"{store.uri} has no release index yet; publish a release first")
    return IndexRepository.create(private)


def _own_trust(key: SigningKey, tmp: Path) -> TrustStore:
    """A trust store holding just the publisher's key, to check our own signature."""
    private = load_private_key(key.path, passphrase=key.passphrase)
    (tmp / "trust").mkdir()
    (tmp / "trust" / "self.pub").write_bytes(public_pem(private.public_key()))
    return TrustStore.load(tmp / "trust")


def _tags(accepted: AcceptedRelease) -> dict[str, str]:
    prov = accepted.provenance
    eps = prov.epsilon()
    tags = {
        f"{TAG}digest": accepted.digest,
        f"{TAG}adapter_digest": prov.adapter_digest,
        f"{TAG}key_id": accepted.key_id,
        f"{TAG}release": str(prov.release),
        f"{TAG}epsilon": "none" if eps is None else f"{eps:.6g}",
        f"{TAG}base_digest": prov.base_digest,
        f"{TAG}base_model": prov.base_model,
        f"{TAG}training_run": str(prov.training.get("mlflow_run_id") or ""),
    }
    headline = prov.headline_metric()
    if headline:
        tags[f"{TAG}metric.{headline[0]}"] = f"{headline[1]:.6g}"
    return tags


def _next_release(versions: list[Any]) -> int:
    numbers = [int(v.tags.get(f"{TAG}release", 0)) for v in versions]
    return max(numbers, default=0) + 1


def publish(
    store: MlflowStore,
    source: Path,
    *,
    model: str,
    key: SigningKey,
    trust: TrustStore | None = None,
    alias: str = CANDIDATE,
) -> PublishResult:
    """Sign (unless already signed by a trusted key), upload, version, alias, index."""
    index = load_index(store, key, create=True)  # wrong passphrase or foreign key: stop here
    versions = store.versions(model) if store.registered(model) is not None else []
    with staging("fedlora-publish-") as tmp:
        release_dir = tmp / "release"
        if (source / SIGNATURE_FILE).is_file():
            if trust is None:
                raise RegistryError(f"{source} is already signed; pass --trust to verify it")
            shutil.copytree(source, release_dir)
            signers = trust
        else:
            adapter = adapter_dir(source)  # names the missing file of a non-adapter
            known = _find(versions, f"{TAG}adapter_digest", adapter_digest(adapter))
            if known is not None:
                return _existing(model, known)
            build_release(source, release_dir, model_name=model, release=_next_release(versions))
            sign_release(release_dir, private_key=key.path, passphrase=key.passphrase)
            signers = _own_trust(key, tmp)
        accepted = accept(release_dir, trust=signers, model=model, index=index, alias=None)
        known = _find(versions, f"{TAG}digest", accepted.digest)
        if known is not None:
            return _existing(model, known)

        release = accepted.provenance.release
        run_id = store.upload_release(release_dir, model=model, release=release)
    if store.registered(model) is None:
        store.call("create model", lambda: store.client.create_registered_model(model))
    artifact_uri = store.call("look up run", lambda: store.client.get_run(run_id).info.artifact_uri)
    # The version's files are the signed release; its run is the one that trained it.
    trained = accepted.provenance.training.get("mlflow_run_id")
    linked = store.link_training_run(trained, release=f"release-{release}")
    mv = store.call(
        "create model version",
        # The files are already uploaded, so the version is READY at once; MLflow's default
        # polls its status every 3 s, which would triple the time of a publish.
        lambda: store.client.create_model_version(
            model,
            f"{artifact_uri}/release",
            run_id=linked[0] if linked else run_id,
            tags=_tags(accepted),
            await_creation_for=0,
            model_id=linked[1] if linked else None,
        ),
    )
    if linked:
        store.record_version(linked[1], model=model, version=str(mv.version))
    entry = AliasEntry(
        release=release, version=str(mv.version), digest=accepted.digest, key_id=accepted.key_id
    )
    try:
        move_alias(store, index, model=model, alias=alias, entry=entry)
    except BaseException:
        store.quietly(lambda: store.client.delete_model_version(model, str(mv.version)))
        raise
    return PublishResult(model, str(mv.version), release, accepted.digest, accepted.key_id, True)


def _find(versions: list[Any], tag: str, value: str) -> Any | None:
    for v in versions:
        if v.tags.get(tag) == value:
            return v
    return None


def _existing(model: str, version: Any) -> PublishResult:
    log.info("%s version %s already holds this release", model, version.version)
    return PublishResult(
        model,
        str(version.version),
        int(version.tags.get(f"{TAG}release", 0)),
        str(version.tags.get(f"{TAG}digest", "")),
        str(version.tags.get(f"{TAG}key_id", "")),
        False,
    )


def move_alias(
    store: MlflowStore,
    index: IndexRepository,
    *,
    model: str,
    alias: str,
    entry: AliasEntry,
    replace_history: bool = False,
) -> None:
    """Point ``alias`` at ``entry`` in MLflow and in the signed index; undo MLflow on failure."""
    before = store.alias_version(model, alias)
    current = index.alias(model, alias)
    new = entry if (current is None or replace_history) else current.succeeding(entry)
    store.call(
        f"set alias {alias!r}",
        lambda: store.client.set_registered_model_alias(model, alias, entry.version),
    )
    try:
        index.set_alias(model, alias, new)
        store.upload_index(index.files())
    except BaseException:
        if before is None:
            store.quietly(lambda: store.client.delete_registered_model_alias(model, alias))
        else:
            store.quietly(lambda: store.client.set_registered_model_alias(model, alias, before))
        raise


def promote(
    store: MlflowStore,
    *,
    model: str,
    version: str,
    key: SigningKey,
    trust: TrustStore,
    policy: Policy,
    alias: str = PRODUCTION,
) -> AliasEntry:
    """Move ``alias`` to ``version`` if every gate passes; the gate that fails is named."""
    index = load_index(store, key, create=False)
    with staging("fedlora-promote-") as tmp:
        directory = store.download_version(model, version, tmp)
        try:
            # No alias check: moving the alias is what a promotion does.
            accepted = accept(
                directory, trust=trust, model=model, index=index, alias=None, policy=policy
            )
        except VerificationError as exc:
            raise PromotionRefused(GATE_OF_REASON.get(exc.reason, exc.reason), exc.detail) from exc
    entry = AliasEntry(
        release=accepted.provenance.release,
        version=str(version),
        digest=accepted.digest,
        key_id=accepted.key_id,
        event="promote",
    )
    move_alias(store, index, model=model, alias=alias, entry=entry)
    return entry


def rollback(
    store: MlflowStore, *, model: str, key: SigningKey, alias: str = PRODUCTION
) -> AliasEntry:
    """Point ``alias`` back at its previous release, as a signed ``rollback`` event."""
    index = load_index(store, key, create=False)
    current = index.alias(model, alias)
    if current is None or not current.previous:
        raise RegistryError(f"{model}@{alias} has no previous release to roll back to")
    revoked_keys, revoked_releases = index.revocations()
    history = list(current.previous)
    while history:
        target = history.pop()
        if target["digest"] not in revoked_releases and target["key_id"] not in revoked_keys:
            break
    else:
        raise RegistryError(f"every earlier release of {model}@{alias} is revoked")
    entry = AliasEntry(**(target | {"event": "rollback", "previous": history}))
    move_alias(store, index, model=model, alias=alias, entry=entry, replace_history=True)
    return entry


def revoke(
    store: MlflowStore,
    *,
    key: SigningKey,
    key_ids: set[str] = frozenset(),
    digests: set[str] = frozenset(),
) -> tuple[set[str], set[str]]:
    """Add keys and release digests to the signed revocation list; return the whole list."""
    if not key_ids and not digests:
        raise RegistryError("nothing to revoke: give --key-id, --digest or --version")
    index = load_index(store, key, create=False)
    own = key_id(load_private_key(key.path, passphrase=key.passphrase).public_key())
    if own in key_ids:
        raise RegistryError("refusing to revoke the key that signs this revocation")
    index.revoke(keys=set(key_ids), releases=set(digests))
    for kid in key_ids:  # a revoked key also loses the right to sign the index
        index.remove_signer(kid)
    store.upload_index(index.files())
    return index.revocations()


def add_signer(store: MlflowStore, *, key: SigningKey, public_key: Path) -> str:
    """Let another key publish (rotation); signed by a current signer, a new root version."""
    index = load_index(store, key, create=False)
    kid = index.add_signer(load_public_key(public_key))
    store.upload_index(index.files())
    return kid


def renew(store: MlflowStore, *, key: SigningKey) -> int:
    """Renew the release index's expiry dates; return the new timestamp version."""
    index = load_index(store, key, create=False)
    index.renew()
    store.upload_index(index.files())
    return index.timestamp_version
