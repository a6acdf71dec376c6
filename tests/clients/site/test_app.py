"""The site's ClientApp against a curious or hostile server, called in-process.

Each test sends the real ClientApp (`clients.site.app.app`: mods, budget, training, reply)
a training request built with the server's own wire functions, as a SuperNode would hand
it over; only the transport is left out. The server is the adversary here: it knows the
run seed, the round and the site id, and it writes the round plan.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from clients.site.app import app
from clients.site.ledger import LEDGER_FILE, SiteLedger
from clients.task.errors import ConfigError
from clients.task.model import ModelSpec, base_digest, build_model, trainable_state
from clients.task.plan import TrainPlan
from strategies.protocol import REFUSAL, decode_train, from_record, requests, to_record
from tests.flower_task import server_app_task

pytestmark = pytest.mark.usefixtures(server_app_task.__name__)


@pytest.fixture
def site_config(tmp_path: Path) -> dict[str, Any]:
    data = tmp_path / "site-a.jsonl"
    rows = [{"text": f"site a says the number {j} twice {j} {j}"} for j in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"data-path": str(data), "site-id": "site-a", "state-dir": str(tmp_path / "state")}


def _plan(tiny_llama: Path, **extra: Any) -> TrainPlan:
    spec = ModelSpec(base=str(tiny_llama), task="causal-lm", lora_r=4, seed=3)
    return TrainPlan(
        spec=spec,
        base_digest=base_digest(spec.base),
        server_round=2,
        local_steps=2,
        batch_size=4,
        learning_rate=0.01,
        max_length=16,
        **extra,
    )


@functools.lru_cache(maxsize=1)
def _initial(spec: ModelSpec) -> dict[str, np.ndarray]:
    """The global tensors of round 1 (the seeded init), built once."""
    return trainable_state(build_model(spec).model)


def _train(plan: TrainPlan, node_config: dict[str, Any], run_id: int = 7) -> Message:
    state = _initial(plan.spec)
    (request,) = requests([1], to_record(state), plan.to_config(), kind=MessageType.TRAIN)
    context = Context(
        run_id=run_id, node_id=1, node_config=node_config, state=RecordDict(), run_config={}
    )
    return app(request, context)


def _local(reply: Message) -> dict[str, np.ndarray]:
    assert REFUSAL not in reply.content.config_records, reply.content.config_records
    return from_record(reply.content.array_records["arrays"])


def test_dp_sgd_noise_is_not_reproducible_from_run_values(
    tiny_llama: Path, site_config: dict[str, Any]
) -> None:
    # Arrange: the same request twice: same run seed, round, site id, global tensors.
    plain = _plan(tiny_llama)
    private = _plan(tiny_llama, site_dp_noise_multiplier=1.0, site_dp_max_grad_norm=0.5)
    # Act
    plain_1, plain_2 = _local(_train(plain, site_config)), _local(_train(plain, site_config))
    dp_1, dp_2 = _local(_train(private, site_config)), _local(_train(private, site_config))
    # Assert: without DP a round is bit-identical; with DP the server (which knows every
    # value a seed could be derived from) cannot regenerate the noise.
    assert plain_1.keys() == dp_1.keys() and any(np.any(v) for v in plain_1.values())
    for name in plain_1:
        np.testing.assert_array_equal(plain_1[name], plain_2[name])
    assert all(not np.array_equal(dp_1[k], dp_2[k]) for k in dp_1)


@pytest.mark.parametrize("delta", [0.9, 0.5, 1e-6])
def test_a_plan_with_another_delta_is_refused_and_charges_nothing(
    tiny_llama: Path, site_config: dict[str, Any], delta: float
) -> None:
    # δ = 0.9 turns RDP's conversion negative: charged, it would lower the site's total.
    plan = _plan(tiny_llama, site_dp_noise_multiplier=1.0, site_dp_delta=delta)
    reply = _train(plan, site_config)
    refusal = decode_train(reply)
    assert not hasattr(refusal, "state"), "the site trained on the server's δ"
    assert f"the plan asks site-dp.delta={delta}" in refusal.reason  # type: ignore[union-attr]
    assert "node config delta" in refusal.reason  # type: ignore[union-attr]
    assert not (Path(site_config["state-dir"]) / LEDGER_FILE).exists()


def test_a_site_with_a_budget_refuses_without_its_ledger_until_reset(
    tiny_llama: Path, site_config: dict[str, Any]
) -> None:
    # Arrange: a site with a budget whose ledger is gone (or was never initialised).
    config = site_config | {"max-epsilon": 50.0}
    plan = _plan(tiny_llama, site_dp_noise_multiplier=1.0)
    state = Path(config["state-dir"])
    # Act / Assert: refused, with the command that re-initialises the ledger.
    refusal = decode_train(_train(plan, config))
    assert "--reset" in refusal.reason and "missing" in refusal.reason  # type: ignore[union-attr]
    SiteLedger.reset(state, reason="new site")
    _local(_train(plan, config))
    spent = SiteLedger.load(state).total_epsilon
    assert spent > 0
    # Deleting the ledger does not restart the budget from zero: the site refuses again.
    (state / LEDGER_FILE).unlink()
    refusal = decode_train(_train(plan, config, run_id=8))
    assert "missing" in refusal.reason  # type: ignore[union-attr]
    SiteLedger.reset(state, reason="restored from the paper log", spent=spent)
    ledger = SiteLedger.load(state, required=True)
    assert ledger.total_epsilon == pytest.approx(spent)
    assert [r["reason"] for r in ledger.resets] == ["restored from the paper log"]
    assert ledger.resets[0]["previous"] == {"state": "missing"}


@pytest.mark.parametrize(
    ("config", "shown"),
    [
        ({"data-path": ".ward 7.jsonl"}, "'.ward 7'"),  # the stem, when no site-id is set
        ({"data-path": "x.jsonl", "site-id": "a\nb"}, "'a\\nb'"),
        ({"data-path": "x.jsonl", "site-id": "-lead"}, "'-lead'"),
        ({"data-path": "x.jsonl", "site-id": "s" * 65}, "'ssss"),
    ],
)
def test_a_site_id_the_server_would_reject_stops_the_site_at_start(
    config: dict[str, str], shown: str
) -> None:
    """The server rejects replies claiming such an id (server/identity.py); the site says
    so when it starts instead of training rounds that are thrown away."""
    from clients.site.settings import SiteSettings

    with pytest.raises(ConfigError, match="set site-id in the node config") as caught:
        SiteSettings.from_node_config(config)
    assert f"site-id={shown}" in str(caught.value)
    assert SiteSettings.from_node_config({"data-path": "Ward 7, Oslo.jsonl"}).site_id == (
        "Ward 7, Oslo"
    )
