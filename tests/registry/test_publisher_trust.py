"""A publisher decides from the signed index, not from what a registry account can edit.

The adversary writes MLflow (tags, versions, artifacts, the index run's files) through
MLflow's embedded SQLite store here; none of these attacks needs an HTTP server. Each test
states what a publisher believed before from MLflow's own state.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from registry.artifact import adapter_digest, adapter_dir
from registry.errors import PromotionRefused, RegistryError, VerificationError
from registry.keys import KeyPair, TrustStore
from registry.lifecycle import SigningKey, promote, publish, revoke
from registry.mlflow_store import MlflowStore
from registry.policy import Policy
from registry.pull import pull
from server.cli import main
from tests.conftest import PASSPHRASE

pytestmark = pytest.mark.integration


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The publisher's default state lives under ~; keep it inside the test."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def store(tmp_path: Path) -> MlflowStore:
    return MlflowStore(f"sqlite:///{tmp_path / 'registry' / 'mlflow.db'}")


@pytest.fixture
def key(keypair: KeyPair, home: Path) -> SigningKey:
    return SigningKey(keypair.private_path, PASSPHRASE)


def _pull(store: MlflowStore, trust: TrustStore, tmp_path: Path, alias: str):
    return pull(
        store, model="intents", alias=alias, trust=trust,
        out=tmp_path / "serving" / alias, state=tmp_path / "edge-state",
    )  # fmt: skip


def _versions(store: MlflowStore) -> list[str]:
    return [str(v.version) for v in store.versions("intents")]


def _junk_version(store: MlflowStore, tags: dict[str, str]) -> str:
    """A model version an account with EDIT creates by hand: empty files, forged tags."""
    run = store.client.create_run(store.experiment_id(create=True))
    source = f"{run.info.artifact_uri}/release"
    mv = store.client.create_model_version("intents", source, run_id=run.info.run_id, tags=tags)
    return str(mv.version)


def _index_files(store: MlflowStore) -> Path:
    run = store.index_run(create=False)
    assert run is not None
    return Path(store.client.get_run(run).info.artifact_uri.removeprefix("file://")) / "tuf"


def test_revoke_by_version_revokes_what_the_index_records_not_what_a_tag_claims(
    store: MlflowStore, key: SigningKey, trust: TrustStore, outputs: list[Path],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    v1 = publish(store, outputs[0], model="intents", key=key)
    promote(store, model="intents", version=v1.version, key=key, trust=trust, policy=Policy())
    v2 = publish(store, outputs[1], model="intents", key=key)  # candidate
    # An account with EDIT on the model makes version 1's tag name the candidate release.
    store.client.set_model_version_tag("intents", v1.version, "fedlora.digest", v2.digest)

    monkeypatch.setenv("FEDLORA_KEY_PASSPHRASE", PASSPHRASE)
    code = main(["registry", "revoke", "--model", "intents", "--version", v1.version,
                 "--key", str(key.path), "--registry", store.uri])  # fmt: skip

    assert code == 0
    with pytest.raises(VerificationError) as err:
        _pull(store, trust, tmp_path, "production")
    assert err.value.reason == "revoked-release"
    assert _pull(store, trust, tmp_path, "candidate").digest == v2.digest


def test_a_junk_version_tagged_as_the_next_release_does_not_stop_a_publish(
    store: MlflowStore, key: SigningKey, trust: TrustStore, outputs: list[Path], tmp_path: Path
) -> None:
    publish(store, outputs[0], model="intents", key=key)
    _junk_version(store, {
        "fedlora.adapter_digest": adapter_digest(adapter_dir(outputs[1])),
        "fedlora.digest": "0" * 64, "fedlora.release": "2",
    })  # fmt: skip

    second = publish(store, outputs[1], model="intents", key=key)

    assert second.created and second.release == 2 and second.version == "3"
    assert _pull(store, trust, tmp_path, "candidate").digest == second.digest


def test_release_numbers_come_from_the_signed_index_not_from_tags(
    store: MlflowStore, key: SigningKey, outputs: list[Path]
) -> None:
    publish(store, outputs[0], model="intents", key=key)
    store.client.set_model_version_tag("intents", "1", "fedlora.release", "1000")
    _junk_version(store, {"fedlora.release": "5000"})

    assert publish(store, outputs[1], model="intents", key=key).release == 2


# Publish as `fedlora registry publish` would, but SIGKILL the process at the moment it has
# created the model version and is about to move the alias and write the index.
_KILLED_PUBLISH = """
import os, signal, sys
from pathlib import Path
import registry.lifecycle as lifecycle
lifecycle.move_alias = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
store = lifecycle.MlflowStore(sys.argv[1])
key = lifecycle.SigningKey(Path(sys.argv[3]), sys.argv[4])
lifecycle.publish(store, Path(sys.argv[2]), model="intents", key=key)
"""


def test_an_interrupted_publish_is_completed_by_running_it_again(
    store: MlflowStore, key: SigningKey, trust: TrustStore, outputs: list[Path],
    tmp_path: Path, home: Path,
) -> None:  # fmt: skip
    env = dict(os.environ, HOME=str(home))
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_PUBLISH, store.uri, str(outputs[0]), str(key.path),
         PASSPHRASE], env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    assert _versions(store) == ["1"]  # the version exists, nothing points at it

    again = publish(store, outputs[0], model="intents", key=key)

    assert again.created and again.version == "1" and again.release == 1
    assert _versions(store) == ["1"]
    assert _pull(store, trust, tmp_path, "candidate").digest == again.digest
    assert str(store.alias_version("intents", "candidate")) == "1"


def test_the_publisher_refuses_an_index_older_than_it_saw(
    store: MlflowStore, key: SigningKey, trust: TrustStore, outputs: list[Path], tmp_path: Path
) -> None:
    v1 = publish(store, outputs[0], model="intents", key=key)
    before = {f.name: f.read_bytes() for f in _index_files(store).iterdir()}
    revoke(store, key=key, digests={v1.digest})

    # Whoever can write the index run puts back the validly signed index from before the
    # revocation; a publisher that signed on top of it would erase the revocation.
    for name, data in before.items():
        (_index_files(store) / name).write_bytes(data)
    with pytest.raises(VerificationError) as err:
        publish(store, outputs[1], model="intents", key=key)

    assert err.value.reason == "stale"
    assert _versions(store) == ["1"]
    # ... and an index removed altogether is not started afresh either.
    shutil.rmtree(_index_files(store))
    with pytest.raises(RegistryError, match="will not start a new index"):
        publish(store, outputs[1], model="intents", key=key)
    assert _versions(store) == ["1"]


def test_promote_refuses_a_version_that_holds_another_models_release(
    store: MlflowStore, key: SigningKey, trust: TrustStore, outputs: list[Path]
) -> None:
    publish(store, outputs[0], model="intents", key=key)
    other = publish(store, outputs[1], model="other", key=key)
    # An account with EDIT creates an `intents` version over the other model's signed files.
    held = store.client.get_model_version("other", other.version)
    mv = store.client.create_model_version("intents", held.source, run_id=held.run_id)

    with pytest.raises(PromotionRefused):
        promote(store, model="intents", version=str(mv.version), key=key, trust=trust,
                policy=Policy())  # fmt: skip

    assert store.alias_version("intents", "production") is None


def test_a_publish_that_loses_a_race_writes_nothing_and_its_rerun_completes(
    store: MlflowStore, key: SigningKey, trust: TrustStore, outputs: list[Path],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from registry.index_publisher import IndexRepository

    publish(store, outputs[0], model="intents", key=key)
    other = SigningKey(key.path, PASSPHRASE)  # a second process of the same publisher
    racing: dict[str, object] = {}
    set_alias = IndexRepository.set_alias

    # A second publisher writes the index between this one's load and its write: MLflow
    # has no lock, so the race is provoked at that point instead of left to timing.
    def race(self, *args, **kwargs):
        if not racing:
            racing["started"] = True
            racing["result"] = publish(MlflowStore(store.uri), outputs[2], model="intents",
                                       key=other, alias="staging")  # fmt: skip
        return set_alias(self, *args, **kwargs)

    monkeypatch.setattr(IndexRepository, "set_alias", race)
    with pytest.raises(RegistryError, match="run the command again"):
        publish(store, outputs[1], model="intents", key=key)
    monkeypatch.setattr(IndexRepository, "set_alias", set_alias)

    assert _pull(store, trust, tmp_path, "staging").digest == racing["result"].digest
    again = publish(store, outputs[1], model="intents", key=key)
    assert again.created
    assert _pull(store, trust, tmp_path, "candidate").digest == again.digest
    assert _pull(store, trust, tmp_path, "staging").digest == racing["result"].digest
