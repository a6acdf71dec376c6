"""EdgeNode refresh logic against MLflow's embedded SQLite store (no HTTP)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from clients.edge.node import EdgeNode
from clients.edge.settings import EdgeSettings, ModelRef
from registry.keys import KeyPair, TrustStore
from registry.lifecycle import SigningKey, promote, publish, rollback
from registry.mlflow_store import MlflowStore
from registry.policy import Policy
from registry.signing import verify_release
from server.harness.process import free_port
from tests.conftest import PASSPHRASE

pytestmark = pytest.mark.integration


def test_rollback_swaps_back_to_the_loaded_previous_release_without_reloading(
    tmp_path: Path, outputs: list[Path], keypair: KeyPair, trust: TrustStore, tiny_llama: Path
) -> None:
    store = MlflowStore(f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}")
    key = SigningKey(keypair.private_path, PASSPHRASE)
    for source in outputs[:2]:
        version = publish(store, source, model="intents", key=key).version
        promote(store, model="intents", version=version, key=key, trust=trust, policy=Policy())
    settings = EdgeSettings(
        models=(ModelRef("intents"),),
        trust=trust.directory,
        cache=tmp_path / "cache",
        registry_uri=store.uri,
        base=str(tiny_llama),
    )
    node = EdgeNode(settings)
    node.start()
    two = node.slots["intents"].active
    assert two is not None and two.version == "2"

    rollback(store, model="intents", key=key)  # production: 2 -> 1, loaded fresh
    assert node.refresh("intents") is True
    one = node.slots["intents"].active
    assert one is not None and one.version == "1"

    # Forward again to 2, which the node still holds as `previous`: swapped back, no reload.
    promote(store, model="intents", version="2", key=key, trust=trust, policy=Policy())
    assert node.refresh("intents") is True

    slot = node.slots["intents"]
    assert slot.active is two
    assert slot.previous is one
    assert node.refresh("intents") is False  # nothing new


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The publisher's default state lives under ~; keep it inside the test."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _node(tmp_path: Path, uri: str, trust: TrustStore, tiny_llama: Path, **kw) -> EdgeNode:
    settings = EdgeSettings(
        models=(ModelRef("intents"),), trust=trust.directory, cache=tmp_path / "cache",
        registry_uri=uri, base=str(tiny_llama), **kw,
    )  # fmt: skip
    return EdgeNode(settings)


def _released(store: MlflowStore, key: SigningKey, trust: TrustStore, sources: list[Path]):
    done = []
    for source in sources:
        done.append(publish(store, source, model="intents", key=key))
        promote(store, model="intents", version=done[-1].version, key=key, trust=trust,
                policy=Policy())  # fmt: skip
    return done


def test_a_node_serves_what_the_signed_index_names_not_the_mlflow_alias(
    tmp_path: Path, outputs: list[Path], keypair: KeyPair, trust: TrustStore, tiny_llama: Path
) -> None:
    store = MlflowStore(f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}")
    key = SigningKey(keypair.private_path, PASSPHRASE)
    v1, v2 = _released(store, key, trust, outputs[:2])
    node = _node(tmp_path, store.uri, trust, tiny_llama)
    node.start()
    assert node.slots["intents"].active.version == v2.version

    # A signed rollback, then an account with EDIT puts MLflow's alias back on v2.
    rollback(store, model="intents", key=key)
    store.client.set_registered_model_alias("intents", "production", v2.version)
    node.refresh("intents")

    assert node.slots["intents"].active.version == v1.version
    assert node.health()["models"]["intents"]["status"] == "ok"
    # ... and the other way round: MLflow's alias moved by hand changes nothing either.
    promote(store, model="intents", version=v2.version, key=key, trust=trust, policy=Policy())
    store.client.set_registered_model_alias("intents", "production", v1.version)
    node.refresh("intents")
    assert node.slots["intents"].active.version == v2.version
    assert node.health()["models"]["intents"]["status"] == "ok"


def test_a_cached_release_is_accepted_again_before_it_is_loaded(
    tmp_path: Path, outputs: list[Path], keypair: KeyPair, trust: TrustStore, tiny_llama: Path
) -> None:
    store = MlflowStore(f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}")
    key = SigningKey(keypair.private_path, PASSPHRASE)
    v1, v2 = _released(store, key, trust, outputs[:2])
    rollback(store, model="intents", key=key)  # production: v1
    node = _node(tmp_path, store.uri, trust, tiny_llama, max_loaded=0)  # keeps no previous
    node.start()
    promote(store, model="intents", version=v2.version, key=key, trust=trust, policy=Policy())
    node.refresh("intents")
    assert node.slots["intents"].active.version == v2.version

    # v1's folder in the cache is changed while v1 is not loaded; then v1 comes back.
    weights = tmp_path / "cache" / "releases" / "intents" / v1.digest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    rollback(store, model="intents", key=key)
    node.refresh("intents")

    active = node.slots["intents"].active
    assert active.version == v1.version
    assert verify_release(active.verified.directory, trust).digest == v1.digest


def test_a_cache_folder_holding_another_release_is_refused_at_restart(
    tmp_path: Path, outputs: list[Path], keypair: KeyPair, trust: TrustStore, tiny_llama: Path
) -> None:
    store = MlflowStore(f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}")
    key = SigningKey(keypair.private_path, PASSPHRASE)
    v1, v2 = _released(store, key, trust, outputs[:2])
    _node(tmp_path, store.uri, trust, tiny_llama).start()  # serves v2, caches it
    home = tmp_path / "cache" / "releases" / "intents" / v2.digest
    old = Path(store.client.get_model_version("intents", v1.version).source.removeprefix("file://"))
    for f in old.iterdir():  # v2's cache folder now holds v1's validly signed files
        shutil.copy(f, home / f.name)

    offline = _node(tmp_path, f"http://127.0.0.1:{free_port()}", trust, tiny_llama)
    offline.start()

    slot = offline.slots["intents"]
    assert slot.active is None
    assert "wrong-release" in str(slot.last_error)
    assert offline.health()["models"]["intents"]["status"] == "unavailable"
