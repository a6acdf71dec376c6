from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry.artifact import Provenance, build_release, read_provenance
from registry.errors import RegistryError


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
    summary = json.loads((outputs[0] / "metrics.json").read_text())
    summary["privacy"] = {"client-level": {"epsilon": 7.5, "delta": 1e-5, "clip-norm": 1.0}}
    (outputs[0] / "metrics.json").write_text(json.dumps(summary))

    prov = build_release(outputs[0], tmp_path / "r", model_name="intents", release=1)

    assert prov.privacy["client-level"]["clip-norm"] == 1.0
    assert prov.epsilon() == 7.5


def test_not_an_adapter_is_refused(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    with pytest.raises(RegistryError, match=r"no adapter_config\.json"):
        build_release(tmp_path / "src", tmp_path / "r", model_name="m", release=1)


def test_provenance_of_another_schema_is_refused() -> None:
    with pytest.raises(RegistryError, match="schema=None"):
        Provenance.from_dict({"model_name": "m"})
