from __future__ import annotations

from pathlib import Path

import pytest

from registry.artifact import Provenance
from registry.errors import PromotionRefused, RegistryError
from registry.policy import Policy


def _provenance(*, accuracy: float | None = 0.9, privacy: dict | None = None) -> Provenance:
    return Provenance(
        model_name="m", release=1, created_at="2026-01-01T00:00:00+00:00",
        fedlora_version="0", base_model="b", base_digest="0" * 64, task="t", labels=[],
        lora={}, adapter_digest="1" * 64,
        metrics={} if accuracy is None else {"accuracy": accuracy},
        privacy=privacy or {},
    )  # fmt: skip


CLIENT_DP = {"client-level": {"epsilon": 6.0, "delta": 1e-5}}
SITE_DP = {"sample-level": {"sites": {"a": {"epsilon": 2.0}, "b": {"epsilon": 9.5}}}}


@pytest.mark.parametrize(
    ("policy", "provenance", "gate"),
    [
        (Policy(min_metric=0.95), _provenance(accuracy=0.9), "min-metric"),
        (Policy(min_metric=0.5), _provenance(accuracy=None), "min-metric"),
        (Policy(max_epsilon=5.0), _provenance(privacy=CLIENT_DP), "max-epsilon"),
        (Policy(max_epsilon=9.0), _provenance(privacy=SITE_DP), "max-epsilon"),
        (Policy(require_dp=True), _provenance(), "require-dp"),
        (Policy(min_metric=0.5, max_epsilon=8.0), _provenance(privacy=CLIENT_DP), None),
        (Policy(max_epsilon=1.0), _provenance(), None),  # no DP: only require-dp refuses
    ],
)
def test_gates(policy: Policy, provenance: Provenance, gate: str | None) -> None:
    if gate is None:
        policy.check(provenance)
        return
    with pytest.raises(PromotionRefused) as err:
        policy.check(provenance)
    assert err.value.gate == gate


def test_policy_file_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[gates]\nmin-metric = 0.8\nmax-epsilon = 8\nmetric = "accuracy"\n')
    assert Policy.load(path) == Policy(min_metric=0.8, max_epsilon=8.0)

    path.write_text("[gates]\nmax-epsilson = 8\n")
    with pytest.raises(RegistryError, match="unknown key 'max-epsilson'"):
        Policy.load(path)
    path.write_text('[gates]\nmin-metric = "high"\n')
    with pytest.raises(RegistryError, match=r"gates\.min-metric='high' must be a number"):
        Policy.load(path)
