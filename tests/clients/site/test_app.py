"""The site's ClientApp against a curious or hostile server, called in-process.

Each test sends the real ClientApp (`clients.site.app.app`: mods, budget, training, reply)
a training request built with the server's own wire functions, as a SuperNode would hand
it over; only the transport is left out. The server is the adversary here: it knows the
run seed, the round and the site id, and it writes the round plan.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
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


@pytest.mark.integration  # ~3 s of RDP noise solving: outside the one-minute unit run
def test_under_a_target_the_site_states_the_noise_it_solved_for_its_own_rows(
    tiny_llama: Path, site_config: dict[str, Any]
) -> None:
    from clients.task.dpsgd import solve_noise_multiplier
    from strategies.protocol import SitePrivacy

    # Arrange: 16 rows, 1 held out: 15 train rows, batch 4, 2 steps a round, 3 rounds.
    plan = _plan(tiny_llama, site_dp_target_epsilon=8.0, planned_rounds=3)
    # Act
    update = decode_train(_train(plan, site_config))
    # Assert
    stated = SitePrivacy.from_metrics(update.metrics)  # type: ignore[union-attr]
    assert stated is not None
    assert stated.noise_multiplier == solve_noise_multiplier(
        target_epsilon=8.0, delta=1e-5, sampling_rate=4 / 15, steps=3 * 2
    )
    assert 0 < stated.epsilon < 8.0  # one of three planned rounds spent


def _target_round(server_round: int, *, planned: int, target: float = 8.0) -> TrainPlan:
    return TrainPlan(
        spec=ModelSpec(base="b", task="causal-lm"),
        base_digest="d",
        server_round=server_round,
        local_steps=8,
        batch_size=4,
        site_dp_target_epsilon=target,
        planned_rounds=planned,
    )


@pytest.mark.integration  # ~4 s of RDP noise solving: outside the one-minute unit run
def test_a_site_never_overshoots_its_target_over_the_run(tmp_path: Path) -> None:
    from clients.site.settings import SiteSettings
    from clients.site.work import _charge_budget
    from clients.task.errors import BudgetRefused

    site = SiteSettings(data_path=tmp_path / "x", site_id="s", state_dir=tmp_path / "state")
    # The planned three rounds spend the target, the last one up to the solver's tolerance.
    for server_round in (1, 2, 3):
        _, privacy = _charge_budget(
            site, _target_round(server_round, planned=3), run="r", num_train=16
        )
    assert privacy is not None and 7.989 <= privacy.epsilon <= 8.0
    assert SiteLedger.load(tmp_path / "state").runs["r"].epsilon <= 8.0
    # A fourth round is refused whether the plan admits it is past the plan or not (a
    # plan that now says 6 rounds would be solved with less noise per round).
    with pytest.raises(BudgetRefused, match=r"solved for site-dp\.target-epsilon=8\.0 over 3"):
        _charge_budget(site, _target_round(4, planned=3), run="r", num_train=16)
    with pytest.raises(BudgetRefused, match=r"ε would reach .* > site-dp.target-epsilon=8.0"):
        _charge_budget(site, _target_round(4, planned=6), run="r", num_train=16)
    assert SiteLedger.load(tmp_path / "state").runs["r"].rounds == [1, 2, 3]


def test_an_unreachable_target_is_a_refusal_naming_the_key(tmp_path: Path) -> None:
    from clients.site.settings import SiteSettings
    from clients.site.work import _charge_budget
    from clients.task.errors import BudgetRefused

    site = SiteSettings(data_path=tmp_path / "x", site_id="s", state_dir=tmp_path / "state")
    with pytest.raises(BudgetRefused, match=r"site-dp\.target-epsilon=1e-09 is unreachable"):
        _charge_budget(site, _target_round(1, planned=3, target=1e-9), run="r", num_train=16)
    assert not (tmp_path / "state" / LEDGER_FILE).exists()


def _query(plan: TrainPlan, node_config: dict[str, Any]) -> Message:
    state = _initial(plan.spec)
    (request,) = requests([1], to_record(state), plan.to_config(), kind=MessageType.QUERY)
    context = Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(),
                      run_config={})  # fmt: skip
    return app(request, context)


def _classifier_plan(tiny_llama: Path, **extra: Any) -> TrainPlan:
    spec = ModelSpec(base=str(tiny_llama), labels=("a", "b"), lora_r=4, seed=3)
    return TrainPlan(spec=spec, base_digest=base_digest(spec.base), max_length=16, **extra)


@pytest.fixture
def labelled_site(tmp_path: Path) -> dict[str, Any]:
    data = tmp_path / "site-l.jsonl"
    rows = [{"text": f"row {j} says {'yes' if j % 3 else 'no'}", "label": "ab"[j % 3 == 0]}
            for j in range(20)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"data-path": str(data), "site-id": "site-l"}


def test_head_statistics_are_sums_over_the_training_rows_only(
    tiny_llama: Path, labelled_site: dict[str, Any]
) -> None:
    from strategies.lda_head import HeadStatistics
    from strategies.protocol import decode_head_statistics

    stats = decode_head_statistics(_query(_classifier_plan(tiny_llama), labelled_site))

    assert isinstance(stats, HeadStatistics)
    assert stats.problem(labels=2, hidden=stats.gram.shape[0]) is None
    assert stats.rows == 18  # 20 rows, 10% held out: the held-out rows stay out of the sums


@pytest.mark.parametrize("why", ["max-epsilon", "site-dp", "head-statistics"])
def test_a_site_under_dp_shares_no_head_statistics(
    tiny_llama: Path, labelled_site: dict[str, Any], tmp_path: Path, why: str
) -> None:
    # The sums carry no noise: a site whose admin said no or set a budget, or a run that
    # trains with DP-SGD, must not release them whatever the server asks.
    from strategies.protocol import decode_head_statistics

    extra = {"site_dp_noise_multiplier": 1.0} if why == "site-dp" else {}
    config = labelled_site | {
        "max-epsilon": {"max-epsilon": 8.0, "state-dir": str(tmp_path / "s")},
        "head-statistics": {"head-statistics": False},
    }.get(why, {})

    decoded = decode_head_statistics(_query(_classifier_plan(tiny_llama, **extra), config))

    assert not hasattr(decoded, "gram")
    assert "shares no head statistics" in decoded.reason  # type: ignore[union-attr]


def test_a_plan_longer_than_the_sites_base_takes_is_refused_naming_max_length(
    tiny_llama: Path, site_config: dict[str, Any]
) -> None:
    # The tiny Llama has 128 positions: a server that did not check would have the site
    # fail deep in its forward pass (a BERT-type base) or train on positions it never saw.
    plan = replace(_plan(tiny_llama), max_length=129)
    with pytest.raises(ConfigError, match=r"^site site-a refuses the round plan: max-length=129"):
        _train(plan, site_config)
    _local(_train(replace(plan, max_length=128), site_config))


def test_a_plan_whose_lora_rank_passes_the_bases_hidden_size_is_refused(
    tiny_llama: Path, site_config: dict[str, Any]
) -> None:
    # A server (or a hostile one) asking for lora.r=10**7 had the site allocate matrices of
    # gigabytes (OOM-killed); the tiny Llama's hidden size is 64, so 65 is refused, and a
    # regression here costs kilobytes, not the test machine.
    good = _plan(tiny_llama)
    plan = replace(good, spec=replace(good.spec, lora_r=65))
    state = _initial(good.spec)  # tensors of rank 4: the site must refuse before any build
    (request,) = requests([1], to_record(state), plan.to_config(), kind=MessageType.TRAIN)
    context = Context(
        run_id=7, node_id=1, node_config=site_config, state=RecordDict(), run_config={}
    )
    with pytest.raises(ConfigError, match=r"^site site-a refuses the round plan: lora\.r=65 "):
        app(request, context)
