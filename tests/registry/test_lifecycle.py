"""Publish, promote, roll back, revoke and pull against MLflow's embedded SQLite store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from registry.errors import (
    KeyFileError,
    PromotionRefused,
    RegistryError,
    RegistryUnavailable,
    VerificationError,
)
from registry.index import AliasEntry
from registry.keys import KeyPair, TrustStore, generate_keypair
from registry.lifecycle import (
    SigningKey,
    add_signer,
    load_index,
    promote,
    publish,
    revoke,
    rollback,
    write_index,
)
from registry.mlflow_store import MlflowStore
from registry.policy import LocalPolicy, Policy
from registry.pull import pull
from server.harness.process import free_port
from tests.conftest import PASSPHRASE, record_client_dp

pytestmark = pytest.mark.integration


@pytest.fixture
def store(tmp_path: Path) -> MlflowStore:
    return MlflowStore(f"sqlite:///{tmp_path / 'registry' / 'mlflow.db'}")


@pytest.fixture
def key(keypair: KeyPair) -> SigningKey:
    return SigningKey(keypair.private_path, PASSPHRASE)


def _pull(store: MlflowStore, trust: TrustStore, tmp_path: Path, alias: str = "production", **kw):
    return pull(
        store, model="intents", alias=alias, trust=trust,
        out=tmp_path / "serving" / "intents", state=tmp_path / "edge-state", **kw,
    )  # fmt: skip


def _state(store: MlflowStore) -> tuple[list[str], dict[str, str]]:
    model = store.registered("intents")
    versions = [str(v.version) for v in store.versions("intents")] if model else []
    return versions, {a: str(v) for a, v in (model.aliases if model else {}).items()}


def test_publish_is_idempotent_and_promote_rollback_move_the_alias(
    store: MlflowStore, key: SigningKey, trust: TrustStore, outputs: list[Path], tmp_path: Path
) -> None:
    first = publish(store, outputs[0], model="intents", key=key)
    again = publish(store, outputs[0], model="intents", key=key)
    second = publish(store, outputs[1], model="intents", key=key)

    assert (first.created, again.created, second.created) == (True, False, True)
    assert again.version == first.version
    assert _state(store) == (["1", "2"], {"candidate": "2"})
    tags = store.client.get_model_version("intents", "2").tags
    assert tags["fedlora.digest"] == second.digest and tags["fedlora.release"] == "2"
    assert tags["fedlora.metric.accuracy"] == "0.9"

    promote(store, model="intents", version="1", key=key, trust=trust, policy=Policy())
    promote(store, model="intents", version="2", key=key, trust=trust, policy=Policy())
    assert _pull(store, trust, tmp_path).digest == second.digest

    back = rollback(store, model="intents", key=key)

    assert back.version == "1" and back.event == "rollback"
    assert _state(store)[1]["production"] == "1"
    assert _pull(store, trust, tmp_path).digest == first.digest  # a signed rollback is fresh


def test_a_refused_promotion_changes_nothing(
    store: MlflowStore, key: SigningKey, trust: TrustStore, outputs: list[Path]
) -> None:
    publish(store, outputs[0], model="intents", key=key)
    before = _state(store)

    with pytest.raises(PromotionRefused) as err:
        promote(store, model="intents", version="1", key=key, trust=trust,
                policy=Policy(min_metric=0.8))  # fmt: skip

    assert err.value.gate == "min-metric"
    assert _state(store) == before


def test_an_untrusted_signer_is_refused_promotion(
    store: MlflowStore, key: SigningKey, outputs: list[Path], tmp_path: Path, make_trust
) -> None:
    publish(store, outputs[0], model="intents", key=key)
    other = make_trust("other-trust", generate_keypair(tmp_path / "other-key"))
    with pytest.raises(PromotionRefused) as err:
        promote(store, model="intents", version="1", key=key, trust=other, policy=Policy())
    assert err.value.gate == "signer"


def _files_of(store: MlflowStore, version: str) -> Path:
    """Where the embedded store keeps a version's files (what a registry account can edit)."""
    source = store.client.get_model_version("intents", version).source
    return Path(source.removeprefix("file://"))


def test_registry_side_attacks_are_refused_at_pull(
    store: MlflowStore, key: SigningKey, trust: TrustStore, outputs: list[Path], tmp_path: Path
) -> None:
    v1 = publish(store, outputs[0], model="intents", key=key)
    v2 = publish(store, outputs[1], model="intents", key=key)
    promote(store, model="intents", version="1", key=key, trust=trust, policy=Policy())
    promote(store, model="intents", version="2", key=key, trust=trust, policy=Policy())
    served = _pull(store, trust, tmp_path)
    assert served.digest == v2.digest

    # An account with EDIT on the model moves production back to the older, signed release:
    # consumers follow the signed index, so nothing changes.
    store.client.set_registered_model_alias("intents", "production", v1.version)
    assert _pull(store, trust, tmp_path).digest == v2.digest
    store.client.set_registered_model_alias("intents", "production", v2.version)

    # ... or puts the older release's signed files where the index says v2's files are.
    old, current = _files_of(store, v1.version), _files_of(store, v2.version)
    sizes = {f.name: f.stat().st_size for f in current.iterdir()}
    assert {f.name: f.stat().st_size for f in old.iterdir()} == sizes  # only digests differ
    kept = {f.name: f.read_bytes() for f in current.iterdir()}
    for f in old.iterdir():
        shutil.copy(f, current / f.name)
    with pytest.raises(VerificationError) as err:
        _pull(store, trust, tmp_path)
    assert err.value.reason == "stale"
    for name, data in kept.items():
        (current / name).write_bytes(data)

    # ... or rewrites bytes in the artifact store.
    weights = current / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(VerificationError) as err:
        _pull(store, trust, tmp_path)
    assert err.value.reason == "signature"
    weights.write_bytes(original)

    # The last verified release stays where it was through all of this.
    assert (tmp_path / "serving" / "intents" / "adapter_model.safetensors").read_bytes() == (
        original
    )


def test_revoked_releases_and_keys_are_refused(
    store: MlflowStore, key: SigningKey, trust: TrustStore, outputs: list[Path], tmp_path: Path,
    keypair: KeyPair,
) -> None:  # fmt: skip
    v1 = publish(store, outputs[0], model="intents", key=key)
    promote(store, model="intents", version="1", key=key, trust=trust, policy=Policy())
    revoke(store, key=key, digests={v1.digest})
    with pytest.raises(VerificationError) as err:
        _pull(store, trust, tmp_path)
    assert err.value.reason == "revoked-release"
    with pytest.raises(PromotionRefused, match="revoked"):
        promote(store, model="intents", version="1", key=key, trust=trust, policy=Policy())
    with pytest.raises(RegistryError, match="refusing to revoke the key that signs"):
        revoke(store, key=key, key_ids={keypair.key_id})

    # A second publisher is let in (rotation), then revoked: it loses the index as well.
    other = generate_keypair(tmp_path / "second")
    add_signer(store, key=key, public_key=other.public_path)
    # Its first use starts from the root the first key signed, so it trusts that key once.
    publish(store, outputs[1], model="intents", key=SigningKey(other.private_path), trust=trust)
    revoke(store, key=key, key_ids={other.key_id})
    with pytest.raises(RegistryError, match="may not sign the release index"):
        publish(store, outputs[2], model="intents", key=SigningKey(other.private_path))


def test_local_policy_refuses_a_foreign_base_or_too_much_epsilon(
    store: MlflowStore, key: SigningKey, trust: TrustStore, outputs: list[Path], tmp_path: Path
) -> None:
    assert record_client_dp(outputs[0]) > 8.0
    publish(store, outputs[0], model="intents", key=key)

    with pytest.raises(VerificationError) as err:
        _pull(store, trust, tmp_path, alias="candidate",
              policy=LocalPolicy(base_digest="sha256:" + "0" * 64))  # fmt: skip
    assert err.value.reason == "base-mismatch"
    with pytest.raises(VerificationError) as err:
        _pull(store, trust, tmp_path, alias="candidate", policy=LocalPolicy(max_epsilon=8.0))
    assert err.value.reason == "policy"
    assert not (tmp_path / "serving").exists()


def test_failures_leave_no_version_and_no_alias_change(
    store: MlflowStore, key: SigningKey, outputs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(store, outputs[0], model="intents", key=key)
    before = _state(store)

    with pytest.raises(KeyFileError, match="wrong passphrase"):
        publish(store, outputs[1], model="intents", key=SigningKey(key.path, "wrong"))
    assert _state(store) == before

    # A fake, because the embedded store cannot be made to fail an upload on cue (tests run
    # as root, so file permissions do not stop it): the index upload fails after the model
    # version and the alias were created, so both must be undone.
    def broken_upload(files: dict[str, bytes]) -> None:
        raise RegistryUnavailable("connection reset while uploading targets.json")

    monkeypatch.setattr(store, "upload_index", broken_upload)
    with pytest.raises(RegistryUnavailable):
        publish(store, outputs[1], model="intents", key=key)
    assert _state(store) == before


@pytest.mark.parametrize(
    "stop",
    [
        RegistryUnavailable("connection reset while reading back timestamp.json"),
        KeyboardInterrupt(),
    ],
)
def test_a_publish_stopped_after_its_index_landed_keeps_the_version_the_index_names(
    store: MlflowStore,
    key: SigningKey,
    trust: TrustStore,
    outputs: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stop: BaseException,
) -> None:
    publish(store, outputs[0], model="intents", key=key)
    # A fake, because neither a dropped connection nor Ctrl-C can be made to land on cue
    # between the upload and its read-back: the whole index is uploaded, then reading it
    # back stops. The registry now holds an index whose candidate is the new version.
    real_upload, real_fetch = store.upload_index, store.fetch_index_file
    uploaded: list[dict[str, bytes]] = []

    def upload(files: dict[str, bytes]) -> None:
        real_upload(files)
        uploaded.append(files)

    def fetch(name: str, max_length: int) -> bytes | None:
        if uploaded:
            raise stop
        return real_fetch(name, max_length)

    monkeypatch.setattr(store, "upload_index", upload)
    monkeypatch.setattr(store, "fetch_index_file", fetch)
    with pytest.raises(type(stop)):
        publish(store, outputs[1], model="intents", key=key)
    monkeypatch.undo()

    # The version the signed index names is still there: consumers get it, and running
    # the publish again finds it published.
    assert _pull(store, trust, tmp_path, alias="candidate").provenance.release == 2
    again = publish(store, outputs[1], model="intents", key=key)
    assert (again.created, again.version, again.release) == (False, "2", 2)


@pytest.mark.parametrize("alias", ["v1", "Latest", "", "prod/eu", "prod uction", "a" * 256])
def test_an_alias_mlflow_refuses_is_named_before_anything_is_written(
    store: MlflowStore, key: SigningKey, trust: TrustStore, outputs: list[Path], alias: str
) -> None:
    with pytest.raises(RegistryError, match=f"alias {alias!r}"):
        publish(store, outputs[0], model="intents", key=key, alias=alias)
    # No registered model, no release run, not even the registry's experiment.
    assert store.registered("intents") is None
    assert store.experiment_id(create=False) is None

    publish(store, outputs[0], model="intents", key=key)
    with pytest.raises(RegistryError, match=f"alias {alias!r}"):
        promote(store, model="intents", version="1", key=key, trust=trust, policy=Policy(),
                alias=alias)  # fmt: skip
    assert _state(store) == (["1"], {"candidate": "1"})


def test_an_unreachable_registry_is_a_clear_error() -> None:
    with pytest.raises(RegistryUnavailable, match="is unreachable"):
        MlflowStore(f"http://127.0.0.1:{free_port()}")


def test_stock_mlflow_download_loads_with_stock_peft(
    store: MlflowStore, key: SigningKey, outputs: list[Path], tmp_path: Path, tiny_llama: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import mlflow.artifacts
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    publish(store, outputs[0], model="intents", key=key)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)  # how a stock user points MLflow
    local = mlflow.artifacts.download_artifacts(
        artifact_uri="models:/intents@candidate", dst_path=str(tmp_path / "dl")
    )
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=2)

    model = PeftModel.from_pretrained(base, local)

    assert any("lora_B" in name for name, _ in model.named_parameters())
    shutil.rmtree(tmp_path / "dl")


def test_a_version_links_to_its_training_run_and_the_index_run_is_finished(
    store: MlflowStore, key: SigningKey, outputs: list[Path]
) -> None:
    """As MLflow's own log_model does: the release is a logged model of the run that
    trained it, and the version's run is that run; a run from another store is not linked."""
    client = store.client
    training = client.create_run(client.create_experiment("fedlora")).info.run_id
    client.set_terminated(training)
    summary = json.loads((outputs[0] / "metrics.json").read_text())
    (outputs[0] / "metrics.json").write_text(json.dumps(summary | {"mlflow_run_id": training}))

    linked = publish(store, outputs[0], model="intents", key=key)
    unlinked = publish(store, outputs[1], model="intents", key=key)  # run-2: not in this store

    first, second = (client.get_model_version("intents", v.version) for v in (linked, unlinked))
    assert first.run_id == training
    (output,) = client.get_run(training).outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == training
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "intents", "version": "1"}]
    assert second.run_id != training and client.get_run(second.run_id).info.run_name == (
        "intents-release-2"
    )
    index_run = client.get_run(store.index_run(create=False))
    assert index_run.info.status == "FINISHED"


@pytest.mark.parametrize("change", ["labels renamed", "pooling mean"])
def test_the_same_tensors_with_another_task_file_are_a_new_release(
    store: MlflowStore,
    key: SigningKey,
    trust: TrustStore,
    outputs: list[Path],
    tmp_path: Path,
    change: str,
) -> None:
    # The adapter digest covers the weights and config, not the task file beside them: a
    # re-publish after the labels were renamed, or after a publisher from before
    # head.pooling signed a mean head as v1 (served with the model's pooler), must not be
    # answered with the old release.
    from clients.task.choices import MEAN_POOLING_FENCE
    from registry.artifact import read_provenance

    first = publish(store, outputs[0], model="intents", key=key)
    task_file = outputs[0] / "adapter" / "fedlora_task.json"
    original = task_file.read_bytes()
    task = json.loads(original)
    if change == "labels renamed":
        task["labels"] = [f"{label}-v2" for label in task["labels"]]
    else:
        task["pooling"] = "mean"
        (outputs[0] / "adapter" / MEAN_POOLING_FENCE).write_text("mean\n", encoding="utf-8")
    task_file.write_text(json.dumps(task), encoding="utf-8")

    second = publish(store, outputs[0], model="intents", key=key)
    again = publish(store, outputs[0], model="intents", key=key)

    assert (first.release, second.release, second.created) == (1, 2, True)
    assert (again.created, again.version) == (False, second.version)
    pulled = _pull(store, trust, tmp_path, alias="candidate")
    assert pulled.digest == second.digest
    served = read_provenance(tmp_path / "serving" / "intents")
    assert served.labels == task["labels"]
    assert served.pooling == ("mean" if change == "pooling mean" else "model")
    if change == "labels renamed":  # back to the first labels after release 1 was revoked
        revoke(store, key=key, digests={first.digest})
        task_file.write_bytes(original)
        third = publish(store, outputs[0], model="intents", key=key)
        assert (third.created, third.release) == (True, 3)  # never the revoked release


def test_a_mean_head_signed_as_v1_is_not_the_same_release(
    outputs: list[Path], tmp_path: Path
) -> None:
    # What a publisher from before head.pooling made of a mean adapter: the task file
    # copied as it was (it says mean), a v1 provenance (read as the model's pooling).
    from registry.artifact import build_release
    from registry.lifecycle import _same_task

    adapter = outputs[0] / "adapter"
    build_release(outputs[0], tmp_path / "old", model_name="intents", release=1)
    assert _same_task(tmp_path / "old", (adapter / "fedlora_task.json").read_bytes())
    task = json.loads((adapter / "fedlora_task.json").read_text(encoding="utf-8"))
    task["pooling"] = "mean"
    for folder in (adapter, tmp_path / "old"):
        (folder / "fedlora_task.json").write_text(json.dumps(task), encoding="utf-8")

    assert not _same_task(tmp_path / "old", (adapter / "fedlora_task.json").read_bytes())


def test_a_recorded_release_changed_in_mlflow_stops_a_republish(
    store: MlflowStore, key: SigningKey, outputs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whether a recorded release of the same tensors has this task file is read from its
    # files in MLflow, which a registry account can edit: they must match the signed
    # record, or the publisher can tell nothing and publishes nothing.
    first = publish(store, outputs[0], model="intents", key=key)
    recorded = _files_of(store, first.version) / "fedlora_task.json"
    source = outputs[0] / "adapter" / "fedlora_task.json"
    task = json.loads(source.read_text(encoding="utf-8"))
    task["labels"] = [f"{label}-v2" for label in task["labels"]]
    source.write_text(json.dumps(task), encoding="utf-8")
    recorded.write_bytes(source.read_bytes())  # "already published", says the registry
    before = _state(store)

    with pytest.raises(RegistryError, match="do not match its signed record"):
        publish(store, outputs[0], model="intents", key=key)
    recorded.unlink()
    with pytest.raises(RegistryError, match="do not match its signed record"):
        publish(store, outputs[0], model="intents", key=key)

    # A fake, because the embedded store cannot be made unreachable between two calls.
    def down(*args: object, **kwargs: object) -> None:
        raise RegistryUnavailable("connection refused")

    download = store.download_release
    monkeypatch.setattr(store, "download_release", down)
    with pytest.raises(RegistryError, match=r"could not serve it.*connection refused"):
        publish(store, outputs[0], model="intents", key=key)
    assert _state(store) == before

    # Revoking the release that cannot be compared lets these tensors publish anew.
    monkeypatch.setattr(store, "download_release", download)
    revoke(store, key=key, digests={first.digest})
    second = publish(store, outputs[0], model="intents", key=key)
    assert (second.created, second.release) == (True, 2)


def test_an_interrupted_publish_is_not_completed_for_another_task_file(
    store: MlflowStore, key: SigningKey, trust: TrustStore, outputs: list[Path],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from registry.index_publisher import IndexRepository
    from registry.lifecycle import IndexRace

    # The index write loses a race after the version was created: the version stays for
    # the re-run to complete (a fake: a lost race cannot be caused on cue).
    def lost(self, *args, **kwargs):
        raise IndexRace("another publisher wrote the index")

    add_release = IndexRepository.add_release
    monkeypatch.setattr(IndexRepository, "add_release", lost)
    with pytest.raises(IndexRace):
        publish(store, outputs[1], model="intents", key=key)
    monkeypatch.setattr(IndexRepository, "add_release", add_release)
    assert _state(store)[0] == ["1"]
    source = outputs[1] / "adapter" / "fedlora_task.json"
    task = json.loads(source.read_text(encoding="utf-8"))
    task["labels"] = [f"{label}-v2" for label in task["labels"]]
    source.write_text(json.dumps(task), encoding="utf-8")

    again = publish(store, outputs[1], model="intents", key=key)

    assert again.created and again.version == "2"  # not version 1 with the old labels
    pulled = _pull(store, trust, tmp_path, alias="candidate")
    assert pulled.digest == again.digest
    from registry.artifact import read_provenance

    assert read_provenance(tmp_path / "serving" / "intents").labels == task["labels"]


def test_a_mean_adapter_publishes_without_its_fence_and_pulls_as_mean(
    store: MlflowStore, key: SigningKey, trust: TrustStore, outputs: list[Path], tmp_path: Path
) -> None:
    # The default base pools by mean, so every default run's adapter holds the fence: the
    # publisher takes it, leaves it out of the version, and a re-publish finds the version.
    from clients.task.choices import MEAN_POOLING_FENCE
    from registry.artifact import read_provenance
    from tests.clients.edge.test_runtime_pooling import _declare, _trained
    from tests.tiny_models import make_tiny_bert

    base = _declare(make_tiny_bert(tmp_path / "bert", dropout=0.0), mean_tokens=True)
    out, _ = _trained(base, tmp_path / "mean-run", pooling="auto", seed=7)
    assert (out / "adapter" / MEAN_POOLING_FENCE).is_file()

    first = publish(store, out, model="intents", key=key)
    again = publish(store, out, model="intents", key=key)

    assert (first.created, again.created, again.version) == (True, False, first.version)
    pulled = _pull(store, trust, tmp_path, alias="candidate")
    assert pulled.digest == first.digest
    served = tmp_path / "serving" / "intents"
    assert not (served / MEAN_POOLING_FENCE).exists()
    assert read_provenance(served).pooling == "mean"

    # A fence copied next to a task file that says model is refused, on the re-publish of
    # a recorded adapter too (checked before the digest lookup), and adds no version.
    model_out = outputs[0]
    publish(store, model_out, model="intents", key=key)
    (model_out / "adapter" / MEAN_POOLING_FENCE).write_text("copied in\n", encoding="utf-8")
    versions = _state(store)[0]
    with pytest.raises(RegistryError, match="marks a mean-pooled head"):
        publish(store, model_out, model="intents", key=key)
    assert _state(store)[0] == versions


def test_writing_an_unchanged_index_writes_nothing(store: MlflowStore, key: SigningKey) -> None:
    index = load_index(store, key, create=True)
    index.set_alias("intents", "production", AliasEntry(1, "1", "d1", "k"))
    write_index(store, index)
    timestamp = store.fetch_index_file("timestamp.json", 16384)

    write_index(store, load_index(store, key, create=False))  # loaded, nothing changed

    assert store.fetch_index_file("timestamp.json", 16384) == timestamp


@pytest.mark.parametrize(
    "field, value",
    [
        ("digests", "27b28bcca8e85e75"),  # the 16 characters `publish` and `promote` print
        ("key_ids", "c34d7919bd79b42c"),
        ("digests", "sha256:" + "a" * 64),
        ("digests", "A" * 63 + "g"),
        ("key_ids", " " + "b" * 64),
    ],
)
def test_a_revocation_that_names_no_whole_digest_or_key_id_is_refused(
    store: MlflowStore, key: SigningKey, field: str, value: str
) -> None:
    # A prefix or a typo revokes nothing a consumer checks (revocation compares whole ids),
    # so signing it into the list would leave the release it meant loadable.
    index = load_index(store, key, create=True)
    index.set_alias("intents", "production", AliasEntry(1, "1", "d" * 64, "k" * 64))
    write_index(store, index)
    timestamp = store.fetch_index_file("timestamp.json", 16384)

    with pytest.raises(RegistryError, match=f"{field[:-1].replace('_', ' ')} {value!r}"):
        revoke(store, key=key, **{field: {value}})

    assert store.fetch_index_file("timestamp.json", 16384) == timestamp
