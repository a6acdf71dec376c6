"""Hostile sites through fedlora's real ClientApp on Flower's Simulation Engine.

Five sites train a tiny Llama; three of them lie (tests/hostile_sites.py): one claims
10^7 rows and sends a flipped update of norm 9 (under update.max-norm 10), one speaks
for another site from round 2 on, one states a sample-level ε it never had and an
accuracy of 1.0 over 10^12 rows. The server's record, the provenance built from it and
the promotion gates must hold against all three.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry.artifact import build_release
from registry.errors import PromotionRefused
from registry.policy import Policy
from server.simulation import simulate
from tests.hostile_sites import HOSTILE_APP, HOSTILE_ENV
from tests.integration.test_simulation import _assert_run_recorded, _lm_settings, _lm_sites

pytestmark = pytest.mark.integration

ATTACKS = {
    "site-2": {"attack": "dominate", "examples": 10**7, "norm": 9.0},
    "site-3": {"attack": "claim", "site-id": "site-0", "from-round": 2},
    "site-4": {
        "attack": "forge",
        "metrics": {
            "site-epsilon": 0.01,
            "site-delta": 1e-5,
            "site-noise-multiplier": 5.0,
            "site-max-grad-norm": 1.0,
        },
        "evaluation": [10**12, 0.0, 1.0],
    },
}


@pytest.mark.timeout(400)
def test_hostile_sites_neither_dominate_nor_speak_for_others_nor_forge_claims(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(HOSTILE_ENV, json.dumps(ATTACKS))
    out = tmp_path / "out"
    settings = _lm_settings(
        tiny_llama,
        out,
        **{"min-available-clients": 5, "update.max-norm": 10.0, "fraction-evaluate": 1.0},
    )
    # Act
    simulate(settings, _lm_sites(tmp_path / "sites", n=5), client_app=HOSTILE_APP)
    # Assert
    metrics = _assert_run_recorded(out, rounds=2)
    first, second = metrics["rounds"]
    # Domination: 10^7 claimed rows and a norm-9 update carry at most twice a fair share.
    for row in (first, second):
        assert row["shares"]["site-2"] <= 2 / row["sites"] + 1e-9, row["shares"]
    # Identity: node of site-3 cannot become site-0 in round 2.
    assert sorted(first["site_ids"]) == [f"site-{i}" for i in range(5)]
    assert sorted(second["site_ids"]) == ["site-0", "site-1", "site-2", "site-4"]
    spoofs = [r for r in second["rejections"] if r["check"] == "identity"]
    assert spoofs and all("spoke for site 'site-3'" in r["detail"] for r in spoofs)
    # Forged claims: no sample-level DP without DP-SGD; 1.0 over 10^12 rows is refused.
    assert metrics["privacy"] == {} and all(not r["site_privacy"] for r in metrics["rounds"])
    evaluations = [r for r in second["rejections"] if r["check"] == "evaluation"]
    assert [r["site"] for r in evaluations] == ["site-4"]
    assert 0 <= metrics["final"]["accuracy"] < 1.0
    # The release built from the run claims no DP, so no gate can count it as private.
    release = build_release(out, tmp_path / "release", model_name="lm", release=1)
    assert release.privacy == {} and release.epsilon() is None
    with pytest.raises(PromotionRefused) as refused:
        Policy(require_dp=True).check(release)
    assert refused.value.gate == "require-dp"
