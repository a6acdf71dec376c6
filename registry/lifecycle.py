"""Publish, promote, roll back and revoke releases; every change is a signed index event.

Each operation checks everything it can before it changes anything, changes MLflow in the
order version -> alias -> release index, and undoes its own earlier steps if a later one
fails, so a failure leaves no new model version and no alias change.

What a publisher decides comes from the signed release index and from releases it
verifies itself, never from MLflow's tags or aliases, which whoever can write the
registry may change: the next release number and "already published" come from the
index's release records, ``revoke --version`` revokes the digest the index records for
that version, ``promote`` takes only a recorded release whose files verify to the
recorded digest. A publish killed after it created the model version but before the
index recorded it leaves a version nothing serves; running it again finds that version
(tags are only a hint where to look), verifies its files, and completes the publish with
it. The index itself is loaded as `registry.index_publisher` describes, never older than
the last one this publisher saw (``SigningKey.state``).

    store = MlflowStore("http://127.0.0.1:5000")
    result = publish(store, Path("fedlora-out"), model="intents", key=signing_key)
    promote(store, model="intents", version=result.version, key=signing_key, trust=trust)
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from clients.task.choices import LEGACY_POOLING, TASK_FILE
from registry.accept import AcceptedRelease, accept
from registry.artifact import (
    ADAPTER_ONLY_FILES,
    PROVENANCE_FILE,
    SIGNATURE_FILE,
    adapter_digest,
    adapter_dir,
    build_release,
    copy_release_files,
    read_provenance,
    read_task,
    release_files,
)
from registry.errors import (
    PromotionRefused,
    RegistryError,
    RegistryUnavailable,
    VerificationError,
)
from registry.index import MAX_LENGTH, UPLOAD_ORDER, AliasEntry, ReleaseRecord, index_file
from registry.index_publisher import IndexRepository
from registry.keys import TrustStore, key_id, load_private_key, load_public_key, public_pem
from registry.mlflow_store import TAG, MlflowStore, check_alias, staging
from registry.policy import Policy
from registry.signing import files_digest, sign_release

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
PRODUCTION = "production"
DEFAULT_STATE = Path("~/.cache/fedlora/publisher")
# The promotion gate named when `accept` or the fetch refuses a release for this reason.
GATE_OF_REASON = {
    "unsigned": "signer",
    "untrusted-key": "signer",
    "signature": "signature",
    "index": "model",
    "revoked-key": "revocation",
    "revoked-release": "revocation",
    "wrong-release": "release",
    "fetch": "release",
}
# Unfinished versions verified per publish: tags are set by whoever writes the registry,
# so the number of downloads they can cause is bounded.
MAX_UNFINISHED = 3
# Largest provenance.json or model.sig accepted from an unfinished version (both are a
# few kB; the adapter's own files must match the source's sizes exactly).
MAX_METADATA_BYTES = 1 << 20
# A release digest and a key id are both SHA-256 in lowercase hex; revocation compares
# them whole, so anything else revokes nothing.
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class SigningKey:
    """A publisher: its signing key and where it keeps the last release index it saw.

    ``state`` defaults to a folder per registry and key under ``~/.cache/fedlora/publisher``.
    """

    path: Path
    passphrase: str | None = None
    state: Path | None = None


@dataclass(frozen=True)
class PublishResult:
    model: str
    version: str
    release: int
    digest: str
    key_id: str
    created: bool  # False when the same release was already published


class IndexRace(RegistryError):
    """Another publisher wrote the release index at the same time as this one."""


def publisher_state(store: MlflowStore, key: SigningKey, kid: str) -> Path:
    if key.state is not None:
        return key.state
    name = hashlib.sha256(f"{store.uri}\n{kid}".encode()).hexdigest()[:16]
    return DEFAULT_STATE.expanduser() / name


def load_index(
    store: MlflowStore, key: SigningKey, *, create: bool, trust: TrustStore | None = None
) -> IndexRepository:
    """The registry's release index, no older than this publisher last saw.

    ``trust`` lets keys besides the publisher's own vouch for a root it has never seen: a
    key added with `add_signer` starts from a root the adding key signed.
    """
    private = load_private_key(key.path, passphrase=key.passphrase)
    state = publisher_state(store, key, key_id(private.public_key()))
    trusted = frozenset(trust.keys) if trust is not None else frozenset()
    found = IndexRepository.load(store.fetch_index_file, private, state=state, trusted=trusted)
    if found is not None:
        return found
    if not create:
        raise RegistryError(f"{store.uri} has no release index yet; publish a release first")
    return IndexRepository.create(private, state=state)


def write_index(store: MlflowStore, index: IndexRepository) -> None:
    """Upload the changed index, unless another publisher changed it since it was loaded.

    Both checks narrow, without closing, the window in which two publishers race (MLflow
    has no lock to build on): the timestamp must still be the one loaded before anything
    is written, and every file must read back as written afterwards. A publisher that lost
    the race raises `IndexRace`; running the command again completes its change. One whose
    files were overwritten after its read-back is told at its next load
    (`IndexRepository.load` warns of a version it wrote that now holds other targets).

    From the moment timestamp.json starts to upload (``index.timestamp_sent``), the
    registry may serve the change even if this function then fails (a dropped connection,
    Ctrl-C), so callers keep the model version and alias it names: running the command
    again completes it.
    """
    loaded = index.loaded_timestamp
    current = store.fetch_index_file("timestamp.json", MAX_LENGTH["timestamp"])
    if current != loaded:
        raise IndexRace(
            "the release index changed while this command ran (another publisher?); "
            "the index was not written: run the command again"
        )
    files = index.files()
    if not files:
        return  # nothing was changed
    # Targets and snapshot first; nothing serves them until the timestamp names them.
    unserved = UPLOAD_ORDER.index("timestamp")
    store.upload_index({n: d for n, d in files.items() if _rank(n) < unserved})
    index.timestamp_sent = True
    store.upload_index({n: d for n, d in files.items() if _rank(n) >= unserved})
    # Every file, the version-named ones too: two publishers that raced both wrote
    # N.targets.json, and consumers read that one.
    for name, data in files.items():
        if store.fetch_index_file(name, MAX_LENGTH[index_file(name)[0]]) != data:
            raise IndexRace(
                f"another publisher wrote the release index at the same time ({name} is not "
                "what this command wrote): run the command again to complete this change"
            )
    index.loaded_timestamp = files["timestamp.json"]
    index.remember()


def _rank(name: str) -> int:
    return UPLOAD_ORDER.index(index_file(name)[0])


def _own_trust(key: SigningKey, tmp: Path) -> TrustStore:
    """A trust store holding just the publisher's key, to check our own signature."""
    private = load_private_key(key.path, passphrase=key.passphrase)
    (tmp / "trust").mkdir()
    (tmp / "trust" / "self.pub").write_bytes(public_pem(private.public_key()))
    return TrustStore.load(tmp / "trust")


def _tags(accepted: AcceptedRelease) -> dict[str, str]:
    """Tags for people and for finding an unfinished version; nothing trusts them."""
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


def _sizes(directory: Path, *, adapter: bool = False) -> dict[str, int]:
    """Each release file's size in bytes; an ``adapter`` folder's `ADAPTER_ONLY_FILES` are
    left out (a release folder holding one is refused)."""
    also = ADAPTER_ONLY_FILES if adapter else ()
    return {
        name: (directory / name).stat().st_size
        for name in release_files(directory, also=also)
        if name not in also
    }


@dataclass(frozen=True)
class _Release:
    """A release ready to be recorded: accepted, with its files' sizes, maybe a version."""

    accepted: AcceptedRelease
    files: dict[str, int]
    version: str | None = None  # an unfinished version that already holds it


def check_publish(source: Path, *, key: SigningKey, alias: str) -> None:
    """What `publish` refuses without asking the registry: the alias, the signing key (its
    file and passphrase) and an unsigned source's adapter files.

    The CLI checks them before it opens the registry, so a refused publish makes no
    registry in a new SQLite file (`MlflowStore` ``create``): a typo in ``--registry``
    with a wrong passphrase left an empty one there, which ``list`` then answered from.

    Raises:
        RegistryError: Naming the alias, the key file or the source.
    """
    check_alias(alias)
    load_private_key(key.path, passphrase=key.passphrase)
    if not (source / SIGNATURE_FILE).is_file():  # a signed release is checked as accepted
        read_task(adapter_dir(source))


def publish(
    store: MlflowStore,
    source: Path,
    *,
    model: str,
    key: SigningKey,
    trust: TrustStore | None = None,
    alias: str = CANDIDATE,
) -> PublishResult:
    """Sign (unless already signed by a trusted key), upload, version, alias, index.

    The same release published again returns its recorded version (``created`` False); a
    publish interrupted after its version was created is completed with that version.
    """
    check_alias(alias)
    # wrong passphrase, foreign key or a replayed index: stop here
    index = load_index(store, key, create=True, trust=trust)
    records = index.releases(model)
    with staging("fedlora-publish-") as tmp:
        if (source / SIGNATURE_FILE).is_file():
            if trust is None:
                raise RegistryError(f"{source} is already signed; pass --trust to verify it")
            copy_release_files(source, tmp / "release")
            accepted = accept(tmp / "release", trust=trust, model=model, index=index, alias=None)
            done = next((r for r in records if r.digest == accepted.digest), None)
            if done is not None:
                return _existing(model, done)
            ready = _unfinished(
                store, index, model=model, trust=trust, tmp=tmp, digest=accepted.digest,
                allowed=_sizes(tmp / "release"),
            ) or _Release(accepted, _sizes(tmp / "release"))  # fmt: skip
        else:
            adapter = adapter_dir(source)  # names a missing, linked or foreign file
            read_task(adapter)  # its own task file: a fault there is named before any other
            wanted = adapter_digest(adapter)
            keys, digests = index.revocations()
            # Releases of these tensors; a revoked one is never "already published".
            alike = [
                r
                for r in records
                if r.adapter_digest == wanted and r.digest not in digests and r.key_id not in keys
            ]
            done = _with_same_task(store, model, alike, adapter, tmp)
            if done is not None:
                return _existing(model, done)
            if alike:
                log.warning(
                    "%s: release(s) %s hold these adapter tensors with another task file or "
                    "pooling; publishing a new release (revoke the old one if it was wrong)",
                    model, ", ".join(str(r.release) for r in alike),
                )  # fmt: skip
            number = max((r.release for r in records), default=0) + 1
            own = _own_trust(key, tmp)
            allowed = _sizes(adapter, adapter=True) | {PROVENANCE_FILE: MAX_METADATA_BYTES}
            found = _unfinished(
                store, index, model=model, trust=own, tmp=tmp, adapter_digest=wanted,
                release=number, allowed=allowed | {SIGNATURE_FILE: MAX_METADATA_BYTES},
                adapter=adapter,
            )  # fmt: skip
            if found is None:
                build_release(source, tmp / "release", model_name=model, release=number)
                sign_release(tmp / "release", private_key=key.path, passphrase=key.passphrase)
                signed = accept(tmp / "release", trust=own, model=model, index=index, alias=None)
                found = _Release(signed, _sizes(tmp / "release"))
            ready = found
        accepted = ready.accepted
        release = accepted.provenance.release
        taken = index.release(model, release)
        if taken is not None:
            raise RegistryError(
                f"release {release} of {model!r} is already {taken.digest[:16]} "
                f"(version {taken.version}); a different release needs a new number"
            )
        version = ready.version
        if version is None:
            version = _create_version(store, tmp / "release", model=model, accepted=accepted)
        else:
            log.info("%s version %s: completing its unfinished publish", model, version)
    record = ReleaseRecord(
        release=release,
        version=version,
        digest=accepted.digest,
        key_id=accepted.key_id,
        adapter_digest=accepted.provenance.adapter_digest,
        files=ready.files,
    )
    entry = AliasEntry(
        release=release, version=version, digest=accepted.digest, key_id=accepted.key_id
    )
    try:
        index.add_release(model, record)
        move_alias(store, index, model=model, alias=alias, entry=entry)
    except BaseException as exc:
        # After a lost race, or once the timestamp was sent, the index may already name
        # this version: keep it (a version it does not name is completed by a re-run).
        if ready.version is None and not isinstance(exc, IndexRace) and not index.timestamp_sent:
            store.quietly(lambda: store.client.delete_model_version(model, version))
        raise
    return PublishResult(model, version, release, accepted.digest, accepted.key_id, True)


def _create_version(
    store: MlflowStore, directory: Path, *, model: str, accepted: AcceptedRelease
) -> str:
    """Upload a release's files as a run's artifacts, then create its model version."""
    run_id = store.upload_release(directory, model=model, release=accepted.provenance.release)
    if store.registered(model) is None:
        store.call("create model", lambda: store.client.create_registered_model(model))
    artifact_uri = store.call("look up run", lambda: store.client.get_run(run_id).info.artifact_uri)
    # The version's files are the signed release; its run is the one that trained it.
    trained = accepted.provenance.training.get("mlflow_run_id")
    linked = store.link_training_run(trained, release=f"release-{accepted.provenance.release}")
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
    return str(mv.version)


def _unfinished(
    store: MlflowStore,
    index: IndexRepository,
    *,
    model: str,
    trust: TrustStore,
    tmp: Path,
    allowed: dict[str, int],
    digest: str | None = None,
    adapter_digest: str | None = None,
    release: int | None = None,
    adapter: Path | None = None,
) -> _Release | None:
    """A version an interrupted publish of this release created, verified, or None.

    Candidates are the versions the index does not record whose tags name this release;
    each is downloaded within ``allowed`` and accepted only if its own signed files are
    this release (by ``digest``, or by adapter digest, release number and ``adapter``'s
    task file and pooling).
    """
    if store.registered(model) is None:
        return None
    recorded = {r.version for r in index.releases(model)}
    tag, value = (f"{TAG}digest", digest) if digest else (f"{TAG}adapter_digest", adapter_digest)
    candidates = [
        v for v in reversed(store.versions(model))
        if str(v.version) not in recorded and v.tags.get(tag) == value
    ][:MAX_UNFINISHED]  # fmt: skip
    for mv in candidates:
        folder = tmp / f"unfinished-{mv.version}"
        folder.mkdir()
        try:
            store.download_release(model, str(mv.version), folder, allowed=allowed)
            accepted = accept(folder, trust=trust, model=model, index=index, alias=None,
                              digest=digest)  # fmt: skip
        except RegistryError as exc:  # VerificationError included
            log.warning("%s version %s is not an unfinished publish of this release: %s",
                        model, mv.version, exc)  # fmt: skip
            continue
        prov = accepted.provenance
        if digest is None and (prov.adapter_digest != adapter_digest or prov.release != release):
            continue
        if (
            digest is None
            and adapter is not None
            and not _same_task(folder, (adapter / TASK_FILE).read_bytes())
        ):
            log.warning("%s version %s: an unfinished publish of these tensors with another "
                        "task file; left as it is (nothing serves it; it may be deleted)",
                        model, mv.version)  # fmt: skip
            continue
        return _Release(accepted, _sizes(folder), str(mv.version))
    return None


def _same_task(folder: Path, task_bytes: bytes) -> bool:
    """Whether the release in ``folder`` has the task file ``task_bytes`` and its pooling.

    The adapter digest covers the config and weights only; the task file (labels, base,
    pooling) travels beside them. A release of the same tensors with another task file
    (labels renamed), or a mean head that a publisher from before ``head.pooling`` signed
    under a v1 provenance (served with the model's pooler), is another release.
    """
    pooling = json.loads(task_bytes).get("pooling", LEGACY_POOLING)
    return (folder / TASK_FILE).read_bytes() == task_bytes and (
        read_provenance(folder).pooling == pooling
    )


def _with_same_task(
    store: MlflowStore, model: str, records: list[ReleaseRecord], adapter: Path, tmp: Path
) -> ReleaseRecord | None:
    """The first of ``records`` (releases of these adapter tensors, none revoked) that also
    has this adapter's task file and pooling (`_same_task`), or None.

    Each recorded release is downloaded within its recorded sizes and must hash to the
    digest its signed record names before its files are compared.

    Raises:
        RegistryError: when none matches and one could not be read or does not match its
            signed record (whether that one is this release cannot be told, so nothing is
            published); revoke it to publish past it.
    """
    if not records:
        return None
    task_bytes = (adapter / TASK_FILE).read_bytes()
    unknown: list[str] = []
    for record in records:
        folder = tmp / f"recorded-{record.version}"
        folder.mkdir()
        where = f"{model} version {record.version} (release {record.release})"
        try:
            store.download_release(model, record.version, folder, allowed=record.files)
            files = {
                name: (folder / name).read_bytes()
                for name in release_files(folder)
                if name != SIGNATURE_FILE
            }
            if files_digest(files) != record.digest:
                unknown.append(f"{where}: its files in MLflow do not match its signed record")
                continue
            if TASK_FILE in files and _same_task(folder, task_bytes):
                return record
        except RegistryUnavailable as exc:
            raise RegistryError(
                f"{where} holds these adapter tensors, but the registry could not serve it to "
                f"tell whether it is this release ({exc}); nothing was published, run it again"
            ) from exc
        except (RegistryError, OSError) as exc:  # VerificationError: refused listing
            unknown.append(f"{where}: {exc}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if unknown:
        raise RegistryError(
            "a recorded release holds these adapter tensors but cannot be compared with this "
            f"one ({'; '.join(unknown)}); nothing was published. Revoke it "
            "(`fedlora registry revoke`) to publish these tensors as a new release"
        )
    return None


def _existing(model: str, record: ReleaseRecord) -> PublishResult:
    log.info("%s version %s already holds this release", model, record.version)
    return PublishResult(model, record.version, record.release, record.digest, record.key_id, False)


def recorded_version(index: IndexRepository, *, model: str, version: str) -> ReleaseRecord:
    """The signed record of the release MLflow holds as ``model`` version ``version``."""
    for record in index.releases(model):
        if record.version == str(version):
            return record
    raise RegistryError(
        f"{model} version {version} is not a release in the signed index "
        "(never published, or its publish did not finish)"
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
        write_index(store, index)
    except BaseException as exc:
        if isinstance(exc, IndexRace) or index.timestamp_sent:
            raise  # the index may name ``entry`` already: the MLflow alias stays with it
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
    """Move ``alias`` to ``version`` if every gate passes; the gate that fails is named.

    ``version`` must be a release the signed index records for ``model`` (gate
    ``release``), and its files must verify to the recorded digest.
    """
    check_alias(alias)
    index = load_index(store, key, create=False, trust=trust)
    try:
        record = recorded_version(index, model=model, version=version)
    except RegistryError as exc:
        raise PromotionRefused("release", str(exc)) from exc
    with staging("fedlora-promote-") as tmp:
        try:
            directory = store.download_release(model, record.version, tmp, allowed=record.files)
            # No alias check: moving the alias is what a promotion does.
            accepted = accept(
                directory, trust=trust, model=model, index=index, alias=None, policy=policy,
                digest=record.digest,
            )  # fmt: skip
        except VerificationError as exc:
            raise PromotionRefused(GATE_OF_REASON.get(exc.reason, exc.reason), exc.detail) from exc
    entry = AliasEntry(
        release=accepted.provenance.release,
        version=record.version,
        digest=accepted.digest,
        key_id=accepted.key_id,
        event="promote",
    )
    move_alias(store, index, model=model, alias=alias, entry=entry)
    return entry


def rollback(
    store: MlflowStore,
    *,
    model: str,
    key: SigningKey,
    alias: str = PRODUCTION,
    trust: TrustStore | None = None,
) -> AliasEntry:
    """Point ``alias`` back at its previous release, as a signed ``rollback`` event."""
    index = load_index(store, key, create=False, trust=trust)
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
    versions: set[tuple[str, str]] = frozenset(),
    trust: TrustStore | None = None,
) -> tuple[set[str], set[str]]:
    """Add keys and releases to the signed revocation list; return the whole list.

    ``versions`` are (model, MLflow version) pairs; each revokes the digest the signed
    index records for that version, whatever MLflow's tags or files say now. Each of
    ``key_ids`` and ``digests`` must be whole (`SHA256_HEX`), checked before the index is
    loaded: consumers compare them whole, so a prefix would be signed in and revoke nothing.
    """
    if not key_ids and not digests and not versions:
        raise RegistryError("nothing to revoke: give --key-id, --digest or --version")
    for what, values, where in (
        ("digest", digests, "`registry show` prints"),
        ("key id", key_ids, "`registry show` and `keys id PUB` print"),
    ):
        for value in sorted(values):
            if not SHA256_HEX.fullmatch(value):
                raise RegistryError(
                    f"{what} {value!r} is not a whole {what} (64 lowercase hex digits, as "
                    f"{where} it); a prefix or a typo would revoke nothing"
                )
    index = load_index(store, key, create=False, trust=trust)
    digests = set(digests) | {
        recorded_version(index, model=model, version=version).digest for model, version in versions
    }
    own = key_id(load_private_key(key.path, passphrase=key.passphrase).public_key())
    if own in key_ids:
        raise RegistryError("refusing to revoke the key that signs this revocation")
    index.revoke(keys=set(key_ids), releases=set(digests))
    for kid in key_ids:  # a revoked key also loses the right to sign the index
        index.remove_signer(kid)
    write_index(store, index)
    return index.revocations()


def add_signer(
    store: MlflowStore, *, key: SigningKey, public_key: Path, trust: TrustStore | None = None
) -> str:
    """Let another key publish (rotation); signed by a current signer, a new root version."""
    index = load_index(store, key, create=False, trust=trust)
    kid = index.add_signer(load_public_key(public_key))
    write_index(store, index)
    return kid


def renew(store: MlflowStore, *, key: SigningKey, trust: TrustStore | None = None) -> int:
    """Renew the release index's expiry dates; return the new timestamp version."""
    index = load_index(store, key, create=False, trust=trust)
    index.renew()
    write_index(store, index)
    return index.timestamp_version
