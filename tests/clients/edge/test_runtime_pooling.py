"""A release trained with mean pooling is served on a base that pools the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clients.edge.runtime import Runtime
from clients.task.choices import MEAN_POOLING_FENCE
from clients.task.data import Example
from clients.task.model import ModelSpec, build_model, save_adapter
from clients.task.train import encode
from registry.artifact import (
    PROVENANCE_SCHEMA,
    PROVENANCE_SCHEMA_V2,
    Provenance,
    build_release,
    release_files,
)
from registry.errors import RegistryError
from registry.keys import KeyPair, TrustStore
from tests.clients.edge.test_runtime import LABELS, signed
from tests.clients.task.test_pooling import _declare
from tests.tiny_models import make_tiny_bert

TEXTS = ["hello", "goodbye and see you again tomorrow"]


def _trained(base: Path, out: Path, *, pooling: str, seed: int) -> tuple[Path, torch.Tensor]:
    """A training output with random LoRA B and head, and its own softmax on TEXTS."""
    loaded = build_model(ModelSpec(base=str(base), labels=LABELS, lora_r=4, seed=seed,
                                   pooling=pooling))  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in loaded.model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    save_adapter(loaded, out / "adapter")
    loaded.model.eval()
    inputs = encode(loaded, [Example(text=t, label=LABELS[0]) for t in TEXTS], max_length=32)
    inputs.pop("labels")
    with torch.no_grad():
        return out, torch.softmax(loaded.model(**inputs).logits, dim=-1)


def test_mean_and_model_pooled_releases_get_their_own_base(
    tmp_path: Path, keypair: KeyPair, trust: TrustStore
) -> None:
    base = _declare(make_tiny_bert(tmp_path / "bert", dropout=0.0), mean_tokens=True)
    runtime = Runtime(base=str(base))
    served = []
    for i, pooling in enumerate(("auto", "model")):
        out, expected = _trained(base, tmp_path / f"t{i}", pooling=pooling, seed=i)
        accepted = signed(out, tmp_path / f"r{i}", keypair=keypair, trust=trust, release=i + 1)
        assert accepted.provenance.pooling == ("mean", "model")[i]
        # A reader from before the field refuses v2 by name instead of serving it wrongly.
        assert accepted.provenance.schema == (PROVENANCE_SCHEMA_V2, PROVENANCE_SCHEMA)[i]
        release = runtime.load("m", str(i + 1), accepted)
        scores = torch.tensor([list(row["scores"].values()) for row in release.predict(TEXTS)])
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
        served.append(release)
    assert served[0].base is not served[1].base  # a base pools one way
    from clients.task.errors import ModelError

    with pytest.raises(ModelError, match="pooling='mean'; this base pools with 'model'"):
        served[1].base.attach(served[0].verified)  # the other pooling's base refuses it
    runtime.close()


def test_a_release_from_before_the_field_is_served_with_the_models_pooling(
    tmp_path: Path, keypair: KeyPair, trust: TrustStore
) -> None:
    base = _declare(make_tiny_bert(tmp_path / "bert", dropout=0.0), mean_tokens=True)
    out, expected = _trained(base, tmp_path / "t", pooling="model", seed=3)
    task_file = out / "adapter" / "fedlora_task.json"
    task = json.loads(task_file.read_text(encoding="utf-8"))
    del task["pooling"]  # an adapter saved before head.pooling existed
    task_file.write_text(json.dumps(task), encoding="utf-8")
    accepted = signed(out, tmp_path / "r", keypair=keypair, trust=trust)
    assert accepted.provenance.pooling == "model"
    runtime = Runtime(base=str(base))
    rows = runtime.load("m", "1", accepted).predict(TEXTS)
    scores = torch.tensor([list(row["scores"].values()) for row in rows])
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    runtime.close()


@pytest.mark.parametrize("value", ["max", 3, None])
def test_a_provenance_naming_an_unknown_pooling_is_refused(value: object) -> None:
    data = {f: "" for f in Provenance.__dataclass_fields__} | {
        "schema": PROVENANCE_SCHEMA, "pooling": value, "labels": [], "lora": {},
    }  # fmt: skip
    with pytest.raises(RegistryError, match=r"provenance\.json: pooling=.*one of model, mean"):
        Provenance.from_dict(data)


def test_a_v1_provenance_that_says_mean_is_refused() -> None:
    data = {f: "" for f in Provenance.__dataclass_fields__} | {
        "schema": PROVENANCE_SCHEMA, "pooling": "mean", "labels": [], "lora": {},
        "task": "sequence-classification",
    }  # fmt: skip
    with pytest.raises(RegistryError, match=r"'mean' needs schema 'fedlora\.provenance/v2'"):
        Provenance.from_dict(data)
    with pytest.raises(RegistryError, match="pooling='mean' needs task 'sequence-classification'"):
        Provenance.from_dict(data | {"schema": PROVENANCE_SCHEMA_V2, "task": "causal-lm"})
    assert Provenance.from_dict(data | {"schema": PROVENANCE_SCHEMA_V2}).pooling == "mean"


@pytest.mark.parametrize("value", ["auto", None, "MEAN"])
def test_a_task_file_with_an_unservable_pooling_is_not_released(
    tmp_path: Path, value: object
) -> None:
    base = make_tiny_bert(tmp_path / "bert", dropout=0.0)
    out, _ = _trained(base, tmp_path / "t", pooling="model", seed=1)
    task_file = out / "adapter" / "fedlora_task.json"
    task_file.write_text(json.dumps(json.loads(task_file.read_text()) | {"pooling": value}))
    with pytest.raises(RegistryError, match=r"fedlora_task\.json: pooling="):
        build_release(out, tmp_path / "release", model_name="m", release=1)
    assert not (tmp_path / "release").exists()


def test_a_task_file_and_provenance_that_disagree_on_pooling_are_refused(
    tmp_path: Path, keypair: KeyPair, trust: TrustStore
) -> None:
    # A publisher from before the field copies a task file that says mean and writes a v1
    # provenance without it: served with BERT's pooler, the release would answer wrong.
    from registry.errors import VerificationError

    base = _declare(make_tiny_bert(tmp_path / "bert", dropout=0.0), mean_tokens=True)
    out, _ = _trained(base, tmp_path / "t", pooling="auto", seed=4)

    def old_publisher(release: Path) -> None:
        prov = json.loads((release / "provenance.json").read_text(encoding="utf-8"))
        del prov["pooling"]
        prov["schema"] = PROVENANCE_SCHEMA
        (release / "provenance.json").write_text(json.dumps(prov), encoding="utf-8")

    with pytest.raises(VerificationError, match=r"fedlora_task\.json says pooling='mean'"):
        signed(out, tmp_path / "r", keypair=keypair, trust=trust, edit=old_publisher)


def test_a_mean_adapter_is_fenced_from_publishers_before_the_field(tmp_path: Path) -> None:
    # A publisher from before head.pooling lists the adapter's files against its own release
    # files, which is release_files without ``also``: the fence stops it by name, before it
    # could sign the adapter under a v1 provenance that older edge nodes serve wrong.
    base = _declare(make_tiny_bert(tmp_path / "bert", dropout=0.0), mean_tokens=True)
    out, _ = _trained(base, tmp_path / "t", pooling="auto", seed=5)
    adapter = out / "adapter"
    assert (adapter / MEAN_POOLING_FENCE).is_file()
    with pytest.raises(RegistryError, match=MEAN_POOLING_FENCE.replace(".", r"\.")):
        release_files(adapter)
    # a current publisher takes it, leaves it out of the release, and writes v2
    prov = build_release(out, tmp_path / "release", model_name="m", release=1)
    assert prov.pooling == "mean" and prov.schema == PROVENANCE_SCHEMA_V2
    assert MEAN_POOLING_FENCE not in release_files(tmp_path / "release")
    # the same folder saved again by a run with the model's pooler drops the fence
    _trained(base, tmp_path / "t", pooling="model", seed=5)
    assert not (adapter / MEAN_POOLING_FENCE).exists()
    assert build_release(out, tmp_path / "again", model_name="m", release=1).pooling == "model"


def test_the_fence_is_no_release_file_and_a_release_folder_holding_one_is_refused(
    tmp_path: Path,
) -> None:
    from registry.artifact import RELEASE_FILES, copy_release_files
    from registry.lifecycle import _sizes

    assert MEAN_POOLING_FENCE not in RELEASE_FILES
    base = _declare(make_tiny_bert(tmp_path / "bert", dropout=0.0), mean_tokens=True)
    out, _ = _trained(base, tmp_path / "t", pooling="auto", seed=8)
    adapter = out / "adapter"
    assert MEAN_POOLING_FENCE not in _sizes(adapter, adapter=True)
    with pytest.raises(RegistryError, match="is not a file of an adapter release"):
        _sizes(adapter)  # a release folder takes release files only
    with pytest.raises(RegistryError, match="is not a file of an adapter release"):
        copy_release_files(adapter, tmp_path / "copy")  # a signed release's copy, too


def test_saving_never_writes_through_a_link_named_like_the_fence(tmp_path: Path) -> None:
    base = _declare(make_tiny_bert(tmp_path / "bert", dropout=0.0), mean_tokens=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n", encoding="utf-8")
    (tmp_path / "t" / "adapter").mkdir(parents=True)
    (tmp_path / "t" / "adapter" / MEAN_POOLING_FENCE).symlink_to(victim)
    out, _ = _trained(base, tmp_path / "t", pooling="auto", seed=9)
    fence = out / "adapter" / MEAN_POOLING_FENCE
    assert victim.read_text(encoding="utf-8") == "keep me\n"
    assert fence.is_file() and not fence.is_symlink()


def test_a_fence_over_a_task_file_that_says_model_is_refused(tmp_path: Path) -> None:
    base = make_tiny_bert(tmp_path / "bert", dropout=0.0)
    out, _ = _trained(base, tmp_path / "t", pooling="model", seed=6)
    (out / "adapter" / MEAN_POOLING_FENCE).write_text("copied in\n", encoding="utf-8")
    with pytest.raises(RegistryError, match=r"marks a mean-pooled head, but fedlora_task\.json"):
        build_release(out, tmp_path / "release", model_name="m", release=1)
    assert not (tmp_path / "release").exists()


def test_a_v2_provenance_without_pooling_is_refused() -> None:
    data = {f: "" for f in Provenance.__dataclass_fields__ if f != "pooling"} | {
        "schema": PROVENANCE_SCHEMA_V2, "labels": [], "lora": {},
    }  # fmt: skip
    with pytest.raises(RegistryError, match="needs a pooling field"):
        Provenance.from_dict(data)


def test_an_inapplicable_pooling_is_refused_before_any_weights_load(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The seam: SharedBase is what loads a base's weights; replacing it with one that fails
    # the test shows the refusal comes first (loading a large base to refuse it, on every
    # retry, is the failure this prevents).
    import clients.edge.runtime as runtime_module
    from clients.task.errors import ModelError

    def never(**_: object) -> None:
        raise AssertionError("the base's weights were loaded")

    monkeypatch.setattr(runtime_module, "SharedBase", never)
    runtime = Runtime(base=str(tiny_llama))
    with pytest.raises(ModelError, match=r"head\.pooling='mean': LlamaForSequenceClassification"):
        runtime.shared_base("sequence-classification", 2, "mean")
