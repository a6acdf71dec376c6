from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from registry.artifact import Provenance, build_release, read_provenance
from registry.errors import RegistryError
from registry.keys import KeyPair
from tests.conftest import record_client_dp

NAN = float("nan")


def test_provenance_records_training_base_and_lora(outputs: list[Path], tmp_path: Path) -> None:
    task = json.loads((outputs[0] / "adapter" / "fedlora_task.json").read_text())

    prov = build_release(outputs[0], tmp_path / "r", model_name="intents", release=7)

    assert read_provenance(tmp_path / "r") == prov
    assert prov.release == 7
    assert prov.base_digest == task["base_digest"]
    assert prov.base_digest.startswith("sha256:")
    assert prov.training == {"mlflow_run_id": "run-1", "rounds": 2, "sites": 3}
    assert prov.metrics["accuracy"] == pytest.approx(0.7)
    assert prov.lora["r"] == 4
    assert prov.privacy == {}
    assert prov.epsilon() is None


def test_privacy_block_is_copied_verbatim(outputs: list[Path], tmp_path: Path) -> None:
    epsilon = record_client_dp(outputs[0])
    summary = json.loads((outputs[0] / "metrics.json").read_text())

    prov = build_release(outputs[0], tmp_path / "r", model_name="intents", release=1)

    assert prov.privacy == summary["privacy"]
    assert prov.privacy["client-level"]["clip-norm"] == 1.0
    assert prov.epsilon() == epsilon == prov.verified_epsilon()


def test_not_an_adapter_is_refused(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    with pytest.raises(RegistryError, match=r"no adapter_config\.json"):
        build_release(tmp_path / "src", tmp_path / "r", model_name="m", release=1)


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_source_that_is_no_directory_says_so(tmp_path: Path, kind: str) -> None:
    source = tmp_path / "out"
    if kind == "file":
        source.write_text("x")
    why = "does not exist" if kind == "missing" else "is not a directory"
    with pytest.raises(RegistryError, match=f"out {why}; expected a training output"):
        build_release(source, tmp_path / "release", model_name="m", release=1)


def test_provenance_of_another_schema_is_refused() -> None:
    with pytest.raises(RegistryError, match="schema=None"):
        Provenance.from_dict({"model_name": "m"})


def _edit(out: Path, change) -> None:  # type: ignore[no-untyped-def]
    summary = json.loads((out / "metrics.json").read_text())
    change(summary)
    (out / "metrics.json").write_text(json.dumps(summary))


@pytest.mark.parametrize(
    ("private", "change", "message"),
    [
        # A non-private run whose summary says it was private.
        (
            False,
            lambda s: s.update(privacy={"client-level": {"epsilon": 0.5, "delta": 1e-5}}),
            "disagree on client-level DP",
        ),
        # A private run whose summary ε was lowered, or whose last round's ε was.
        (True, lambda s: s["privacy"]["client-level"].update(epsilon=1.0), "add up to"),
        (True, lambda s: s["rounds"][-1].update(epsilon=1.0), "add up to"),
        # A round's noise raised after the fact: the rounds no longer add up to the ε.
        (True, lambda s: s["rounds"][0].update(noise_multiplier=50.0), "add up to"),
        # Sample-level DP claimed for a site that has no round of it.
        (
            True,
            lambda s: s["privacy"].update(
                {"sample-level": {"sites": {"site-a": {"epsilon": 0.1}}}}
            ),
            "sample-level sites",
        ),
        (True, lambda s: s["rounds"][0].update(noise_multiplier="x"), "unreadable privacy"),
        # An integer past float range (JSON reads it exactly): float() raised OverflowError.
        (True, lambda s: s["rounds"][0].update(noise_multiplier=10**400), "unreadable privacy"),
        (True, lambda s: s["privacy"]["client-level"].update(delta=10**400), "unreadable privacy"),
        # NaN (Python's JSON reader takes it): Opacus' RDP accountant looped forever on it.
        (True, lambda s: s["rounds"][0].update(noise_multiplier=NAN), "unreadable privacy"),
        (True, lambda s: s["rounds"][0].update(sampling_rate=NAN), "unreadable privacy"),
    ],
)
def test_privacy_that_is_not_what_the_rounds_add_up_to_is_refused(
    outputs: list[Path],
    tmp_path: Path,
    private: bool,
    change,
    message: str,  # type: ignore[no-untyped-def]
) -> None:
    if private:
        record_client_dp(outputs[0])
    _edit(outputs[0], change)
    with pytest.raises(RegistryError, match=message):
        build_release(outputs[0], tmp_path / "r", model_name="intents", release=1)
    assert not (tmp_path / "r").exists()


def test_a_final_metric_past_float_range_is_recorded_as_nan(
    outputs: list[Path], tmp_path: Path
) -> None:
    # float(10**400) raised OverflowError out of build_release; NaN fails every gate.
    _edit(outputs[0], lambda s: s["final"].update(accuracy=10**400))

    prov = build_release(outputs[0], tmp_path / "r", model_name="intents", release=1)

    assert math.isnan(prov.metrics["accuracy"])
    assert read_provenance(tmp_path / "r").headline_metric() is not None


def test_a_json_file_python_cannot_read_is_a_registry_error_naming_it(
    outputs: list[Path], tmp_path: Path
) -> None:
    # json.loads raised ValueError past Python's 4,300-digit integer limit, and
    # RecursionError on deep nesting.
    for text in (
        '{"final": {"accuracy": 1' + "0" * 5000 + "}}",
        '{"final": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ):
        (outputs[0] / "metrics.json").write_text(text)
        with pytest.raises(RegistryError, match=r"metrics\.json: .* is not valid JSON"):
            build_release(outputs[0], tmp_path / "r", model_name="intents", release=1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update(final=5), "'final' is int, expected an object"),
        (lambda s: s.update(final=["accuracy", 0.9]), "'final' is list, expected an object"),
        (lambda s: s.update(privacy=[1]), "'privacy' is list, expected an object"),
        (lambda s: s.update(privacy="x"), "'privacy' is str, expected an object"),
        (lambda s: s.update(rounds={"1": {}}), "'rounds' is dict, expected a list"),
        (lambda s: s["rounds"][0].update(site_ids=5), r"'rounds\[0\].site_ids' is int"),
        (lambda s: s["rounds"][1].update(site_ids=[1]), r"'rounds\[1\].site_ids' is list"),
        (lambda s: s.update(mlflow_run_id=["x"]), "'mlflow_run_id' is list, expected a string"),
    ],
)
def test_a_metrics_file_of_the_wrong_shape_is_refused_naming_the_field(
    outputs: list[Path],
    tmp_path: Path,
    change,  # type: ignore[no-untyped-def]
    message: str,
) -> None:
    # A hand-edited or half-written metrics.json raised AttributeError or TypeError out of
    # build_release, or signed a wrong summary (a dict of rounds counted as none).
    _edit(outputs[0], change)
    with pytest.raises(RegistryError, match=f"metrics.json: {message}"):
        build_release(outputs[0], tmp_path / "r", model_name="intents", release=1)
    assert not (tmp_path / "r").exists()


def _link_to_key(adapter: Path, keys: Path) -> str:
    (adapter / "notes.txt").symlink_to(keys / "signing-key.pem")
    return "notes.txt"


def _weights_as_link(adapter: Path, keys: Path) -> str:
    weights = adapter / "adapter_model.safetensors"
    (keys / "weights").write_bytes(weights.read_bytes())
    weights.unlink()
    weights.symlink_to(keys / "weights")
    return "adapter_model.safetensors"


def _foreign_file(adapter: Path, keys: Path) -> str:
    (adapter / "id_ed25519").write_text("not a release file")
    return "id_ed25519"


def _folder(adapter: Path, keys: Path) -> str:
    (adapter / "checkpoints").mkdir()
    return "checkpoints"


def _adapter_folder_as_link(adapter: Path, keys: Path) -> str:
    moved = keys / "adapter"
    adapter.rename(moved)
    adapter.symlink_to(moved)
    return "adapter"


def _metrics_as_link(adapter: Path, keys: Path) -> str:
    metrics = adapter.parent / "metrics.json"
    elsewhere = keys / "elsewhere.json"  # valid JSON, so only the link itself can refuse it
    elsewhere.write_bytes(metrics.read_bytes())
    metrics.unlink()
    metrics.symlink_to(elsewhere)
    return "metrics.json"


@pytest.mark.parametrize(
    "plant",
    [_link_to_key, _weights_as_link, _foreign_file, _folder, _adapter_folder_as_link,
     _metrics_as_link],
)  # fmt: skip
def test_a_release_takes_only_release_files_and_never_follows_a_link(
    outputs: list[Path], tmp_path: Path, keypair: KeyPair, plant
) -> None:
    name = plant(outputs[0] / "adapter", keypair.private_path.parent)

    with pytest.raises(RegistryError, match=re.escape(name)):
        build_release(outputs[0], tmp_path / "r", model_name="intents", release=1)

    assert not (tmp_path / "r").exists()


def test_a_signed_release_folder_is_copied_without_links(tmp_path: Path, keypair: KeyPair) -> None:
    from registry.artifact import copy_release_files

    (tmp_path / "signed").mkdir()
    (tmp_path / "signed" / "model.sig").write_text("{}")
    (tmp_path / "signed" / "provenance.json").symlink_to(keypair.private_path)

    with pytest.raises(RegistryError, match=r"provenance\.json is a symbolic link"):
        copy_release_files(tmp_path / "signed", tmp_path / "copy")
