"""SecAgg+ rounds on Flower's Simulation Engine with a synthetic site (no training).

Each simulated site replies with a known update through the real site mods
(clients/site/mods.py: clipping, then Flower's ``secaggplus_mod``), so the secure
aggregate can be compared with the plain weighted mean of the same updates.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from clients.site.mods import TRAIN_MODS
from server.loop import wait_for_sites
from server.secagg import SecureRound, run_secure_round
from strategies.aggregate import weighted_average
from strategies.protocol import NUM_EXAMPLES, read_request, train_reply
from strategies.secagg import SecAggSettings

pytestmark = pytest.mark.integration

SITES = 5
SHAPES = {"a.lora_B": (16, 4), "head": (3, 16)}
STATE = {k: np.full(s, 0.5, dtype=np.float32) for k, s in SHAPES.items()}
SETTINGS = SecAggSettings(num_shares=3, reconstruction_threshold=2, clipping_range=2.0)


def site_update(partition: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(partition)
    return {k: rng.uniform(-0.2, 0.2, size=s).astype(np.float32) for k, s in SHAPES.items()}


def site_weight(partition: int) -> int:
    return 10 * (partition + 1)


synthetic = ClientApp()


@synthetic.train(mods=list(TRAIN_MODS))
def _train(message: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    reference, config = read_request(message)
    if partition in json.loads(str(config["crash"])):
        raise RuntimeError(f"site {partition} drops out after key sharing")
    local = {k: reference[k] + site_update(partition)[k] for k in reference}
    return train_reply(
        message,
        local=local,
        reference=reference,
        metrics={NUM_EXAMPLES: site_weight(partition)},
        site_id=f"site-{partition}",
        weight=site_weight(partition),
    )


def _run(crash_plans: list[list[int]], settings: list[SecAggSettings]) -> list[SecureRound]:
    """One simulation; a secure round per plan, the plan's partitions crashing."""
    results: list[Any] = []
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        nodes = wait_for_sites(grid, SITES, timeout=60.0)
        rounds = enumerate(zip(crash_plans, settings, strict=True), start=1)
        for server_round, (crash, round_settings) in rounds:
            outcome = run_secure_round(
                grid,
                round_settings,
                nodes=nodes,
                state=STATE,
                plan={"crash": json.dumps(crash), "clip_norm": 100.0},
                server_round=server_round,
                timeout=60.0,
            )
            results.append(outcome)

    run_simulation(
        server_app=server,
        client_app=synthetic,
        num_supernodes=SITES,
        backend_config={
            "client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
            "init_args": {"logging_level": logging.ERROR},
        },
    )
    return results


@pytest.mark.timeout(300)
def test_secure_mean_matches_plain_mean_and_survives_dropouts() -> None:
    flower_prg = replace(SETTINGS, prg="flower")
    full, one_dropped, too_many, flower = _run(
        [[], [4], [1, 2], []], [SETTINGS, SETTINGS, SETTINGS, flower_prg]
    )

    # All five sites: the secure mean is the weighted mean within the stated bound.
    weights = [site_weight(p) for p in range(SITES)]
    exact = weighted_average([site_update(p) for p in range(SITES)], weights)
    assert full.mean_update is not None
    bound = SETTINGS.error_bound([float(w) for w in weights])
    for name, value in exact.items():
        assert np.max(np.abs(full.mean_update[name] - value)) <= bound, name
    assert sorted(s for _, s, _, _ in full.sites) == [f"site-{p}" for p in range(SITES)]
    assert full.bytes_up > 0 and full.failures == []
    # The unmasked weight slot holds what the honest mods put there, and is checked.
    assert full.weight_total is not None and full.weight_forgery() is None
    assert one_dropped.weight_total is not None and one_dropped.weight_forgery() is None

    # One site drops after key sharing: every neighbourhood keeps >= 2 live sites.
    alive = range(SITES - 1)
    exact = weighted_average([site_update(p) for p in alive], [site_weight(p) for p in alive])
    assert one_dropped.mean_update is not None
    bound = SETTINGS.error_bound([float(site_weight(p)) for p in alive])
    for name, value in exact.items():
        assert np.max(np.abs(one_dropped.mean_update[name] - value)) <= bound, name
    assert len(one_dropped.failures) == 1
    assert "drops out after key sharing" in one_dropped.failures[0]["reason"]

    # Two neighbours drop: site 1's neighbourhood {0, 1, 2} keeps one share, < threshold.
    assert too_many.mean_update is None
    assert len(too_many.failures) == 2

    # Flower's own mask generator gives the same mean (to the bound) as fedlora's AES-CTR.
    assert flower.mean_update is not None and full.mean_update is not None
    bound = SETTINGS.error_bound([float(w) for w in weights])
    for name in exact:
        assert np.max(np.abs(flower.mean_update[name] - full.mean_update[name])) <= 2 * bound
