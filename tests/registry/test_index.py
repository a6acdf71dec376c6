from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from registry.errors import RegistryError, VerificationError
from registry.index import (
    AliasEntry,
    check_alias,
    check_not_revoked,
    index_upload_order,
    models_of,
)
from registry.index_consumer import IndexClient
from registry.index_publisher import IndexRepository
from registry.keys import (
    KeyPair,
    TrustStore,
    generate_keypair,
    load_private_key,
    load_public_key,
)
from registry.pull import aliased_release
from tests.registry.conftest import FileStore


def _entry(release: int, digest: str) -> AliasEntry:
    return AliasEntry(release=release, version=str(release), digest=digest, key_id="k")


def _publish(
    store: FileStore, key, release: int, digest: str, trusted=frozenset(), **expiry
) -> None:
    repo = IndexRepository.load(store.fetch, key, trusted=trusted) or IndexRepository.create(
        key, expiry={k: dt.timedelta(seconds=v) for k, v in expiry.items()}
    )
    repo.set_alias("intents", "production", _entry(release, digest))
    store.files.update(repo.files())


def test_a_client_follows_new_releases(publisher, trust: TrustStore, tmp_path: Path) -> None:
    store = FileStore()
    _publish(store, publisher, 1, "d1")
    client = IndexClient(store.fetch, tmp_path / "cache", trust)
    client.refresh()
    assert client.alias("intents", "production").digest == "d1"

    _publish(store, publisher, 2, "d2")
    client.refresh()

    assert client.alias("intents", "production").digest == "d2"


def test_replayed_older_metadata_is_refused_even_after_a_restart(
    publisher, trust: TrustStore, tmp_path: Path
) -> None:
    store = FileStore()
    _publish(store, publisher, 1, "d1")
    old = dict(store.files)
    _publish(store, publisher, 2, "d2")
    IndexClient(store.fetch, tmp_path / "cache", trust).refresh()

    store.files = old  # whoever can write the registry puts back the older, signed files
    restarted = IndexClient(store.fetch, tmp_path / "cache", trust)

    with pytest.raises(VerificationError) as err:
        restarted.refresh()
    assert err.value.reason == "stale"


def test_expired_metadata_is_refused(publisher, trust: TrustStore, tmp_path: Path) -> None:
    store = FileStore()
    repo = IndexRepository.create(publisher, expiry={"timestamp": dt.timedelta(seconds=-1)})
    store.files.update(repo.files())

    with pytest.raises(VerificationError) as err:
        IndexClient(store.fetch, tmp_path / "cache", trust).refresh()
    assert err.value.reason == "expired"


def test_an_index_rooted_in_a_foreign_key_is_refused(trust: TrustStore, tmp_path: Path) -> None:
    stranger = generate_keypair(tmp_path / "stranger")
    store = FileStore()
    _publish(store, load_private_key(stranger.private_path), 1, "d1")

    with pytest.raises(VerificationError) as err:
        IndexClient(store.fetch, tmp_path / "cache", trust).refresh()
    assert err.value.reason == "untrusted-key"


def test_a_key_not_in_the_root_cannot_change_the_index(publisher, tmp_path: Path) -> None:
    store = FileStore()
    _publish(store, publisher, 1, "d1")
    stranger = load_private_key(generate_keypair(tmp_path / "s").private_path)
    with pytest.raises(RegistryError, match="may not sign the release index"):
        IndexRepository.load(store.fetch, stranger)


def test_check_gives_each_refusal_its_own_reason(
    publisher, trust: TrustStore, tmp_path: Path
) -> None:
    store = FileStore()
    repo = IndexRepository.create(publisher)
    repo.set_alias("intents", "production", _entry(2, "d2"))
    repo.revoke(keys={"bad-key"}, releases={"d0"})
    store.files.update(repo.files())
    client = IndexClient(store.fetch, tmp_path / "cache", trust)
    client.refresh()
    revocation_cases = {
        "revoked-key": dict(key="bad-key", digest="d2"),
        "revoked-release": dict(key="k", digest="d0"),
    }
    alias_cases = {
        "stale": dict(digest="d1", alias="production"),
        "index": dict(digest="d2", alias="staging"),
    }
    for reason, args in revocation_cases.items():
        with pytest.raises(VerificationError) as err:
            check_not_revoked(client.revocations(), **args)
        assert err.value.reason == reason
    for reason, args in alias_cases.items():
        with pytest.raises(VerificationError) as err:
            check_alias(client, model="intents", release=1, **args)
        assert err.value.reason == reason
    check_not_revoked(client.revocations(), key="k", digest="d2")
    check_alias(client, model="intents", release=2, digest="d2", alias="production")


def test_alias_history_is_kept_for_rollback() -> None:
    first, second, third = _entry(1, "d1"), _entry(2, "d2"), _entry(3, "d3")
    history = first.succeeding(second).succeeding(third)
    assert history.digest == "d3"
    assert [p["digest"] for p in history.previous] == ["d1", "d2"]


def test_keys_rotate_through_signed_root_versions(
    publisher, trust: TrustStore, keypair: KeyPair, tmp_path: Path, make_trust
) -> None:
    store = FileStore()
    _publish(store, publisher, 1, "d1")
    client = IndexClient(store.fetch, tmp_path / "cache", trust)  # trusts the old key only
    client.refresh()
    new = generate_keypair(tmp_path / "new")
    new_key = load_private_key(new.private_path)

    repo = IndexRepository.load(store.fetch, publisher)
    repo.add_signer(load_public_key(new.public_path))
    store.files.update(repo.files())
    # The rotated-in key signs the index now, starting from the root the old key signed.
    _publish(store, new_key, 2, "d2", trusted=frozenset({keypair.key_id}))
    repo = IndexRepository.load(store.fetch, new_key, trusted=frozenset({keypair.key_id}))
    repo.remove_signer(keypair.key_id)  # ... and retires the old one
    store.files.update(repo.files())

    client.refresh()
    assert client.alias("intents", "production").digest == "d2"
    with pytest.raises(RegistryError, match="may not sign the release index"):
        IndexRepository.load(store.fetch, publisher)
    newcomer = IndexClient(store.fetch, tmp_path / "cache2", make_trust("new-trust", new))
    newcomer.refresh()  # starts from the newest root, which the new key holds
    assert newcomer.alias("intents", "production").digest == "d2"


def test_renewing_an_expired_index_makes_it_acceptable_again(
    publisher, trust: TrustStore, tmp_path: Path
) -> None:
    store = FileStore()
    repo = IndexRepository.create(publisher, expiry={"timestamp": dt.timedelta(seconds=-1)})
    repo.set_alias("intents", "production", _entry(1, "d1"))
    store.files.update(repo.files())
    client = IndexClient(store.fetch, tmp_path / "cache", trust)
    with pytest.raises(VerificationError):
        client.refresh()

    renewed = IndexRepository.load(store.fetch, publisher)  # default lifetimes
    renewed.renew()
    store.files.update(renewed.files())

    client.refresh()
    assert client.alias("intents", "production").digest == "d1"


def _forged_index(publisher, stranger, store: FileStore) -> None:
    """The registry's index as a stranger rewrites it: a root that lists the publisher's key
    beside the stranger's (threshold 1), and roles signed by the stranger alone."""
    from tuf.api.metadata import Metadata, Root

    _publish(store, publisher, 1, "d1")
    signer = IndexRepository.signer_for(stranger)
    root = Metadata[Root].from_bytes(store.files["root.json"])
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.signed.add_key(signer.public_key, role)
    root.sign(signer, append=False)
    store.files["root.json"] = store.files["1.root.json"] = root.to_bytes()
    repo = IndexRepository({"root": root, **_roles(store)}, signer)
    repo.set_alias("intents", "production", _entry(99, "forged"))
    files = repo.files()
    store.files.update({k: v for k, v in files.items() if "root" not in k})


def _roles(store: FileStore) -> dict:
    from tuf.api.metadata import Metadata

    return {r: Metadata.from_bytes(store.files[f"{r}.json"]) for r in ("targets", "snapshot",
                                                                       "timestamp")}  # fmt: skip


def test_a_first_root_must_be_signed_by_a_trusted_key_not_merely_list_one(
    publisher, trust: TrustStore, tmp_path: Path
) -> None:
    store = FileStore()
    stranger = load_private_key(generate_keypair(tmp_path / "stranger").private_path)
    _forged_index(publisher, stranger, store)

    with pytest.raises(VerificationError) as err:
        IndexClient(store.fetch, tmp_path / "fresh-cache", trust).refresh()
    assert err.value.reason == "untrusted-key"
    with pytest.raises(VerificationError) as err:  # a publisher would sign the forgery again
        IndexRepository.load(store.fetch, publisher)
    assert err.value.reason == "untrusted-key"


@pytest.mark.parametrize("name", ["timestamp.json", "2.root.json"])
def test_an_index_file_over_its_length_limit_is_refused(
    publisher, trust: TrustStore, tmp_path: Path, name: str
) -> None:
    store = FileStore()
    _publish(store, publisher, 1, "d1")
    client = IndexClient(store.fetch, tmp_path / "cache", trust)
    client.refresh()

    store.files[name] = b" " * 600_000  # over python-tuf's limits (16 KiB, 512 KB)
    with pytest.raises(VerificationError) as err:
        client.refresh()

    assert err.value.reason == "fetch"
    assert name in str(err.value)


def test_models_of_lists_each_model_with_its_aliases() -> None:
    paths = [
        "models/intents/aliases/production",
        "models/intents/aliases/candidate",
        "models/intents/releases/1",
        "models/spam/releases/1",  # published, never aliased
        "revocations",
    ]
    assert models_of(paths) == {"intents": ["candidate", "production"], "spam": []}


@pytest.mark.parametrize(
    ("model", "alias", "detail"),
    [
        (
            "intnets",
            "production",
            "the release index has no intnets@production: "
            "it has no model 'intnets' (its models: 'intents', 'spam')",
        ),
        (
            "intents",
            "prod",
            "the release index has no intents@prod ('intents' has aliases: production)",
        ),
    ],
)
def test_a_missing_alias_is_refused_saying_what_the_index_has(
    publisher, trust: TrustStore, tmp_path: Path, model: str, alias: str, detail: str
) -> None:
    store = FileStore()
    _publish(store, publisher, 1, "d1")
    repo = IndexRepository.load(store.fetch, publisher)
    assert repo is not None
    repo.set_alias("spam", "candidate", _entry(1, "s1"))
    store.files.update(repo.files())
    client = IndexClient(store.fetch, tmp_path / "cache", trust)
    client.refresh()

    with pytest.raises(VerificationError) as refused:
        aliased_release(client, model=model, alias=alias)

    assert refused.value.reason == "index"
    assert refused.value.detail == detail


def _refresh_after_each_file(
    store: FileStore, files: dict[str, bytes], warm: IndexClient, trust: TrustStore, tmp: Path
) -> list[tuple[str, set[str]]]:
    """Write ``files`` one by one in `MlflowStore.upload_index`'s order; after each, the
    ``warm`` client and a new (cold) one refresh, and any refusal fails the test. Per file:
    its name and the production digests the two clients then saw."""
    seen = []
    for name in index_upload_order(files):
        store.files[name] = files[name]
        clients = [warm, IndexClient(store.fetch, tmp / f"cold-{name}", trust)]
        for client in clients:
            client.refresh()
        seen.append((name, {c.alias("intents", "production").digest for c in clients}))
    return seen


def _switch_at_timestamp(files: dict[str, bytes], old: str, new: str) -> list:
    """What `_refresh_after_each_file` should see: ``old`` until the timestamp is written."""
    order = index_upload_order(files)
    at = order.index("timestamp.json")
    return [(name, {old} if i < at else {new}) for i, name in enumerate(order)]


def test_a_consumer_refreshing_during_an_upload_reads_the_previous_index_whole(
    publisher, trust: TrustStore, tmp_path: Path
) -> None:
    store = FileStore()
    _publish(store, publisher, 1, "d1")
    warm = IndexClient(store.fetch, tmp_path / "warm", trust)
    warm.refresh()
    repo = IndexRepository.load(store.fetch, publisher)
    repo.set_alias("intents", "production", _entry(2, "d2"))
    files = repo.files()
    # What was signed anew, also under its number (the timestamp has none); the root was
    # not signed anew, so it is not written.
    assert set(files) == {"targets.json", "3.targets.json", "snapshot.json",
                          "3.snapshot.json", "timestamp.json"}  # fmt: skip

    # Without consistent snapshots a consumer reading between the targets and the
    # timestamp would get the new targets under the old snapshot and refuse them as
    # replayed.
    seen = _refresh_after_each_file(store, files, warm, trust, tmp_path)
    assert seen == _switch_at_timestamp(files, "d1", "d2"), seen


def _second_signer(store: FileStore, publisher, directory: Path) -> KeyPair:
    """An index with release d1 whose root lets a second, new key sign it too."""
    _publish(store, publisher, 1, "d1")
    second = generate_keypair(directory)
    repo = IndexRepository.load(store.fetch, publisher)
    repo.add_signer(load_public_key(second.public_path))
    store.files.update(repo.files())
    return second


def test_removing_the_key_that_signed_the_index_refuses_no_consumer_during_the_upload(
    publisher, trust: TrustStore, keypair: KeyPair, tmp_path: Path
) -> None:
    store = FileStore()
    other = _second_signer(store, publisher, tmp_path / "other")
    # The other key signs the index last; then the publisher retires it.
    other_key = load_private_key(other.private_path)
    _publish(store, other_key, 2, "d2", trusted=frozenset({keypair.key_id}))
    warm = IndexClient(store.fetch, tmp_path / "warm", trust)
    warm.refresh()
    repo = IndexRepository.load(store.fetch, publisher)
    repo.remove_signer(other.key_id)
    repo.set_alias("intents", "production", _entry(3, "d3"))
    files = repo.files()
    assert {"3.root.json", "root.json"} <= set(files)

    # A root written first would refuse the timestamp the removed key signed.
    seen = _refresh_after_each_file(store, files, warm, trust, tmp_path)
    assert seen == _switch_at_timestamp(files, "d2", "d3"), seen


def test_a_publisher_from_before_consistent_snapshots_still_reaches_every_consumer(
    publisher, trust: TrustStore, tmp_path: Path
) -> None:
    store = FileStore()
    _publish(store, publisher, 1, "d1")  # a consistent index
    warm = IndexClient(store.fetch, tmp_path / "warm", trust)
    warm.refresh()
    repo = IndexRepository.load(store.fetch, publisher)
    repo.set_alias("intents", "production", _entry(2, "d2"))
    # What such a publisher writes: every role by name only, no numbered copies.
    store.files.update({k: v for k, v in repo.files().items() if not k[0].isdigit()})

    # The client asks for 3.snapshot.json and 3.targets.json and falls back to the names,
    # whose versions python-tuf still checks.
    for client in (warm, IndexClient(store.fetch, tmp_path / "cold", trust)):
        client.refresh()
        assert client.alias("intents", "production").digest == "d2"
    stale = dict(store.files)
    repo = IndexRepository.load(store.fetch, publisher)
    repo.set_alias("intents", "production", _entry(3, "d3"))
    new = {k: v for k, v in repo.files().items() if not k[0].isdigit()}
    store.files["timestamp.json"] = new["timestamp.json"]  # the timestamp, not yet its snapshot
    with pytest.raises(VerificationError) as err:
        IndexClient(store.fetch, tmp_path / "cold2", trust).refresh()
    assert err.value.reason == "stale"  # a snapshot of another version: refused, as before
    assert stale["snapshot.json"] == store.files["snapshot.json"]


@pytest.mark.parametrize("b_again", [False, True], ids=["same-version", "b-wrote-again"])
def test_a_publisher_whose_version_was_overwritten_by_a_racing_one_is_warned(
    publisher, tmp_path: Path, caplog: pytest.LogCaptureFixture, b_again: bool
) -> None:
    store = FileStore()
    _publish(store, publisher, 1, "d1")
    a = IndexRepository.load(store.fetch, publisher, state=tmp_path / "a")
    b = IndexRepository.load(store.fetch, publisher, state=tmp_path / "b")
    a.revoke(releases={"d1"})
    store.files.update(a.files())
    a.remember()  # A read its files back: done, as far as A can tell
    b.set_alias("intents", "production", _entry(2, "d2"))  # B checked before A wrote
    store.files.update(b.files())  # ... and now writes the same version over A's
    b.remember()
    if b_again:  # a later version on top: A's version is compared by its numbered copy
        b.set_alias("intents", "candidate", _entry(2, "d2"))
        store.files.update(b.files())
        b.remember()

    with caplog.at_level("WARNING", logger="registry.index_publisher"):
        IndexRepository.load(store.fetch, publisher, state=tmp_path / "a")
    assert "targets version 3 is not the one this publisher saw" in caplog.text
    assert "models/intents/aliases/production, revocations" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="registry.index_publisher"):
        IndexRepository.load(store.fetch, publisher, state=tmp_path / "b")  # B's own version
    assert caplog.text == ""


def test_an_index_from_before_consistent_snapshots_takes_them_at_its_next_change(
    publisher, trust: TrustStore, tmp_path: Path
) -> None:
    from tuf.api.metadata import Metadata, Root

    # What `create` wrote before 2026-12-03: a root without consistent snapshots, and
    # only root had a numbered copy.
    legacy = IndexRepository.create(publisher)
    legacy._roles["root"].signed.consistent_snapshot = False
    legacy._roles["root"].sign(legacy._signer, append=False)
    legacy.set_alias("intents", "production", _entry(1, "d1"))
    store = FileStore()
    store.files.update(legacy.files())
    assert set(store.files) == {"root.json", "1.root.json", "targets.json", "snapshot.json",
                                "timestamp.json"}  # fmt: skip
    client = IndexClient(store.fetch, tmp_path / "cache", trust)
    client.refresh()

    repo = IndexRepository.load(store.fetch, publisher)
    repo.set_alias("intents", "production", _entry(2, "d2"))
    files = repo.files()

    assert Metadata[Root].from_bytes(files["2.root.json"]).signed.consistent_snapshot
    assert {"3.targets.json", "3.snapshot.json"} <= set(files)
    store.files.update(files)
    client.refresh()  # follows root 2, then reads the numbered snapshot and targets
    assert client.alias("intents", "production").digest == "d2"
    del store.files["targets.json"], store.files["snapshot.json"]  # read by number only
    IndexClient(store.fetch, tmp_path / "fresh", trust).refresh()


def test_a_revoke_whose_upload_stopped_before_the_root_is_completed_by_the_next_change(
    publisher, keypair: KeyPair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tuf.api.metadata import Metadata, Root

    store = FileStore()
    thief = _second_signer(store, publisher, tmp_path / "thief")
    repo = IndexRepository.load(store.fetch, publisher)
    repo.revoke(keys={thief.key_id})
    repo.remove_signer(thief.key_id)
    # The upload stops after the timestamp: the root (written last) still lists the key.
    store.files.update({k: v for k, v in repo.files().items() if not k.endswith("root.json")})

    thief_key = load_private_key(thief.private_path)
    trusted = frozenset({keypair.key_id})
    with pytest.raises(RegistryError, match="is revoked in the release index"):
        IndexRepository.load(store.fetch, thief_key, trusted=trusted)
    with caplog.at_level("WARNING", logger="registry.index_publisher"):
        repo = IndexRepository.load(store.fetch, publisher)
    assert f"key {thief.key_id[:16]} is revoked but may still sign" in caplog.text
    files = repo.files()  # the next change, whatever it is
    root = Metadata[Root].from_bytes(files["root.json"]).signed
    assert thief.key_id not in root.keys and keypair.key_id in root.keys


def _warm_client_behind(publisher, trust: TrustStore, tmp_path: Path, monkeypatch):
    """A client that has seen release 1 while the store already holds release 2."""
    monkeypatch.setattr("registry.index_consumer.REREAD_AFTER_S", 0.0)
    store = FileStore()
    _publish(store, publisher, 1, "d1")
    client = IndexClient(store.fetch, tmp_path / "cache", trust)
    client.refresh()
    _publish(store, publisher, 2, "d2")
    return store, client


@pytest.mark.parametrize("cut", [0, 40])
def test_a_timestamp_read_while_mlflow_rewrites_it_is_read_again(
    publisher, trust: TrustStore, tmp_path: Path, monkeypatch, cut: int
) -> None:
    # A fake read: the in-place rewrite's window is microseconds, too short to hit on purpose.
    store, client = _warm_client_behind(publisher, trust, tmp_path, monkeypatch)
    reads = []

    def mid_write(name: str, max_length: int | None = None) -> bytes | None:
        reads.append(name)
        data = store.fetch(name, max_length)
        return data[:cut] if name == "timestamp.json" and reads.count(name) == 1 else data

    client._fetch = mid_write
    client.refresh()

    assert client.alias("intents", "production").digest == "d2"
    assert reads.count("timestamp.json") == 2


def test_a_timestamp_that_never_parses_is_still_refused(
    publisher, trust: TrustStore, tmp_path: Path, monkeypatch
) -> None:
    store, client = _warm_client_behind(publisher, trust, tmp_path, monkeypatch)
    store.files["timestamp.json"] = store.files["timestamp.json"][:-1]

    with pytest.raises(VerificationError) as err:
        client.refresh()

    assert err.value.reason == "index"
    assert client.alias("intents", "production").digest == "d1"
