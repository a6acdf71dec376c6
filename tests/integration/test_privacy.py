"""Privacy mechanisms end to end on Flower's Simulation Engine with a tiny Llama."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from safetensors.numpy import load_file

from clients.site.ledger import SiteLedger
from server.simulation import simulate
from tests.integration.test_simulation import _assert_run_recorded, _lm_settings, _lm_sites

pytestmark = pytest.mark.integration


@pytest.mark.timeout(300)
def test_secagg_round_below_threshold_is_skipped_and_adapter_unchanged(
    tiny_llama: Path, tmp_path: Path
) -> None:
    # Two of three sites fail after key sharing: one live site < threshold 2.
    sites = _lm_sites(tmp_path / "sites")
    for site in sites[1:]:
        site.data_path.write_text('{"text": ""}\n')  # the site's own loader refuses it
    out = tmp_path / "out"
    settings = _lm_settings(
        tiny_llama,
        out,
        **{
            "num-server-rounds": 1,
            "secagg.enabled": True,
            "update.max-norm": 4.0,
            "min-fit-clients": 3,
            "on-round-failure": "skip",
            "fraction-evaluate": 0.0,
        },
    )
    simulate(settings, sites)
    metrics = _assert_run_recorded(out, rounds=1)
    row = metrics["rounds"][0]
    assert row["skipped"] and row["sites"] == 0 and row["failed"] == 2
    assert all("needs a non-empty 'text'" in f["reason"] for f in row["failures"])
    assert metrics["privacy"]["secure-aggregation"]["clipping-range"] == 4.0
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(not np.any(v) for k, v in tensors.items() if "lora_B" in k)  # still the init
    assert json.loads((out / "metrics.json").read_text())["stopped"] is None


@pytest.mark.timeout(300)
def test_client_and_sample_level_dp_with_a_refusing_site_and_max_epsilon(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """Both DP layers in one run (one simulation start keeps CI short).

    Sample level: one DP-SGD round (sigma 1, 2 steps at rate 4/16) costs about 2.3 ε at
    each site; site-2's budget of 1 is too small, so it refuses with the reason.
    Client level: z=0.5 with every site sampled gives ε(δ=1e-5) of 10.7 after one round
    and 16.5 after two, so dp.max-epsilon=12 stops the run before round 2.
    """
    sites = _lm_sites(tmp_path / "sites")
    out = tmp_path / "out"
    # A site with a budget trains only on a ledger its admin initialised.
    site_2_state = out / "site-state" / "site-2"
    SiteLedger.reset(site_2_state, reason="new site")
    sites[2] = replace(sites[2], node_config={"max-epsilon": 1.0})
    settings = _lm_settings(
        tiny_llama,
        out,
        **{
            "num-server-rounds": 3,
            "site-dp.noise-multiplier": 1.0,
            "site-dp.max-grad-norm": 1.0,
            "site-dp.batch-size": 4,  # under site DP these replace batch-size, learning-rate
            "site-dp.learning-rate": 1.0,  # plain DP-SGD (the default optimiser) over the wire
            "dp.clip-norm": 0.5,
            "dp.noise-multiplier": 0.5,
            "dp.max-epsilon": 12.0,
            "fraction-evaluate": 0.0,
        },
    )
    simulate(settings, sites)
    metrics = _assert_run_recorded(out, rounds=1)
    row = metrics["rounds"][0]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    # Client level: accounted with the sampled rate (a refusing site was sampled too).
    assert row["guarantee"] == "client-level" and row["delta"] == 1e-5
    assert row["sampling_rate"] == 1.0 and 10 < row["epsilon"] < 12
    assert "before round 2" in metrics["stopped"]
    client = metrics["privacy"]["client-level"]
    assert client["epsilon"] == row["epsilon"] and client["rounds"] == 1
    assert "secure-aggregation" not in metrics["privacy"]

    # Sample level: the refusal is recorded and the round goes on with the other sites.
    assert row["sites"] == 2 and row["refused"] == 1 and row["failed"] == 0
    assert row["refusals"][0]["site"] == "site-2"
    assert "max-epsilon=1.0" in row["refusals"][0]["reason"]
    sample = metrics["privacy"]["sample-level"]["sites"]
    assert sorted(sample) == ["site-0", "site-1"]
    assert sample["site-0"]["noise-multiplier"] == 1.0 and sample["site-0"]["epsilon"] > 1.0
    # The ledger of a site that trained holds the round; the refusing site spent nothing.
    ledger = json.loads((out / "site-state" / "site-0" / "privacy-ledger.json").read_text())
    assert ledger["total_epsilon"] == pytest.approx(sample["site-0"]["epsilon"])
    assert SiteLedger.load(site_2_state, required=True).total_epsilon == 0.0
    refused = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}").get_metric_history(
        metrics["mlflow_run_id"], "refused"
    )
    assert [m.value for m in refused] == [1.0]


@pytest.mark.timeout(300)
def test_under_a_site_target_every_site_solves_its_noise_and_ends_at_the_target(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """Each site (16 rows, 1 held out: 15 training rows; 2 steps of batch 4 a round)
    solves z for ε = 4 over the 2 planned rounds; the server accepts it and accounts ε at
    the z it solves for the same count, which ends just under the target."""
    from clients.task.dpsgd import solve_noise_multiplier

    sites = _lm_sites(tmp_path / "sites")
    out = tmp_path / "out"
    settings = _lm_settings(
        tiny_llama,
        out,
        **{
            "num-server-rounds": 2,
            "site-dp.target-epsilon": 4.0,
            "site-dp.batch-size": 4,
            "site-dp.learning-rate": 1.0,  # plain DP-SGD (the default optimiser) over the wire
            "fraction-evaluate": 0.0,
            # Far below these updates' norms: under site DP each site clips its update to
            # the server's bound itself, so none is rejected after paying its round's ε.
            "update.max-norm": 0.01,
        },
    )
    simulate(settings, sites)
    metrics = _assert_run_recorded(out, rounds=2)
    assert all(not row["rejections"] and row["refused"] == 0 for row in metrics["rounds"])
    z = solve_noise_multiplier(target_epsilon=4.0, delta=1e-5, sampling_rate=4 / 15, steps=4)
    sample = metrics["privacy"]["sample-level"]["sites"]
    assert sorted(sample) == ["site-0", "site-1", "site-2"]
    for site, entry in sample.items():
        assert entry["noise-multiplier"] == z
        assert 3.989 <= entry["epsilon"] <= 4.0
        ledger = SiteLedger.load(out / "site-state" / site)
        assert ledger.total_epsilon == pytest.approx(entry["epsilon"])
