"""EdgeNode refresh logic against MLflow's embedded SQLite store (no HTTP)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.edge.node import EdgeNode
from clients.edge.settings import EdgeSettings, ModelRef
from registry.keys import KeyPair, TrustStore
from registry.lifecycle import SigningKey, promote, publish, rollback
from registry.mlflow_store import MlflowStore
from registry.policy import Policy
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
