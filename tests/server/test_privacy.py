"""Client-level accounting: ε per round equals Opacus' RDP analysis called directly."""

from __future__ import annotations

import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from clients.task.errors import ConfigError
from clients.task.model import ModelSpec
from clients.task.plan import TrainPlan
from server.privacy import (
    PrivacyLedger,
    SampleLevelAccounts,
    privacy_summary,
    solve_noise_multiplier,
)
from strategies.secagg import SecAggSettings

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def _independent_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    rdp = compute_rdp(q=q, noise_multiplier=z, steps=rounds, orders=ORDERS)
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


@pytest.mark.parametrize(("z", "q"), [(1.1, 0.3), (0.8, 1.0), (2.0, 0.1)])
def test_epsilon_per_round_matches_independent_recomputation(z: float, q: float) -> None:
    ledger = PrivacyLedger(delta=1e-5)
    for rounds in range(1, 6):
        ledger.step(noise_multiplier=z, sampling_rate=q)
        assert ledger.epsilon == pytest.approx(_independent_epsilon(z, q, rounds, 1e-5), rel=1e-9)


def test_epsilon_after_does_not_charge_and_replay_restores() -> None:
    ledger = PrivacyLedger(delta=1e-5)
    ledger.step(noise_multiplier=1.0, sampling_rate=0.5)
    before = ledger.epsilon
    after = ledger.epsilon_after(noise_multiplier=1.0, sampling_rate=0.5)
    assert ledger.epsilon == before < after
    assert PrivacyLedger.replay(1e-5, [(1.0, 0.5), (1.0, 0.5)]).epsilon == pytest.approx(after)


def test_a_refused_site_dp_charge_leaves_the_site_history_as_it_was() -> None:
    # The ε of a step the accountant refuses must not stay in the history it accounts.
    accounts = SampleLevelAccounts(delta=1e-5)
    plan = TrainPlan(spec=ModelSpec(labels=("a", "b")), base_digest="d", batch_size=16)
    first = accounts.charge("site-1", noise_multiplier=1.0, num_examples=160, plan=plan)
    with pytest.raises(ConfigError):
        accounts.charge("site-1", noise_multiplier=float("nan"), num_examples=160, plan=plan)
    assert accounts.steps["site-1"] == [(1.0, 0.1, 10)]
    again = accounts.charge("site-1", noise_multiplier=1.0, num_examples=160, plan=plan)
    assert again["epsilon"] > first["epsilon"]
    assert accounts.steps["site-1"] == [(1.0, 0.1, 10)] * 2


@pytest.mark.parametrize(("target", "q", "rounds"), [(8.0, 1.0, 5), (1.0, 0.3, 20)])
def test_solved_noise_never_overshoots_the_target(target: float, q: float, rounds: int) -> None:
    z = solve_noise_multiplier(target_epsilon=target, delta=1e-5, sampling_rate=q, rounds=rounds)
    assert _independent_epsilon(z, q, rounds, 1e-5) <= target


def test_unreachable_target_is_a_config_error() -> None:
    unreachable = r"dp\.target-epsilon=1e-09 is unreachable with dp\.delta="
    with pytest.raises(ConfigError, match=unreachable):
        solve_noise_multiplier(target_epsilon=1e-9, delta=1e-5, sampling_rate=1.0, rounds=10)


@pytest.mark.parametrize("target", [float("inf"), float("nan"), 0.0, -1.0])
def test_a_target_that_is_no_finite_epsilon_is_a_config_error(target: float) -> None:
    # Opacus would return its smallest noise multiplier for ε = inf: a guarantee of nothing.
    with pytest.raises(ConfigError, match=r"dp\.target-epsilon=.* must be a finite ε > 0"):
        solve_noise_multiplier(target_epsilon=target, delta=1e-5, sampling_rate=1.0, rounds=10)


def test_summary_has_one_entry_per_guarantee() -> None:
    history = [
        {
            "epsilon": 1.0,
            "delta": 1e-5,
            "guarantee": "client-level",
            "noise_multiplier": 1.2,
            "sampling_rate": 0.5,
        },
        {
            "epsilon": 1.0,
            "delta": 1e-5,
            "guarantee": "client-level",
            "noise_multiplier": 1.2,
            "sampling_rate": None,
        },  # a skipped round: nothing released
    ]
    out = privacy_summary(history=history, clip_norm=0.5, secagg=SecAggSettings())
    assert out["client-level"] == {
        "epsilon": 1.0,
        "delta": 1e-5,
        "noise-multiplier": 1.2,
        "clip-norm": 0.5,
        "sampling-rate": 0.5,
        "rounds": 1,
        "accountant": "rdp",
    }
    assert out["secure-aggregation"]["enabled"] is True
    assert out["secure-aggregation"]["prg"] == "aes-256-ctr"
    assert privacy_summary(history=[{}], clip_norm=None, secagg=None) == {}


@pytest.mark.parametrize("after", [float("nan"), float("inf")])
def test_dp_max_epsilon_stops_the_run_on_an_epsilon_it_cannot_compare(after: float) -> None:
    # A stub ledger: Opacus does not return NaN for valid parameters, but an accountant
    # that ever did must stop the run, not let it through (NaN > limit is False).
    from server.privacy import ClientPrivacy
    from strategies.dp import ClientLevelDP

    class Ledger(PrivacyLedger):
        def epsilon_after(self, *, noise_multiplier: float, sampling_rate: float) -> float:
            return after

    privacy = ClientPrivacy(
        ClientLevelDP(clip_norm=1.0, noise_multiplier=1.0), Ledger(delta=1e-5), max_epsilon=8.0
    )
    reason = privacy.stop_reason(3, 0.5, population=10)
    assert reason is not None and "before round 3" in reason


def test_server_noise_comes_from_the_os_csprng() -> None:
    from clients.task.secure_random import SecureRandom
    from server.privacy import ClientPrivacy
    from strategies.dp import ClientLevelDP, DifferentiallyPrivate
    from strategies.fedavg import FedAvg

    privacy = ClientPrivacy(ClientLevelDP(clip_norm=1.0, noise_multiplier=1.0), PrivacyLedger(1e-5))
    wrapped = privacy.wrap(FedAvg())
    assert isinstance(wrapped, DifferentiallyPrivate) and isinstance(wrapped.rng, SecureRandom)
    assert isinstance(DifferentiallyPrivate(FedAvg(), privacy.mechanism).rng, SecureRandom)


def test_client_level_delta_must_be_below_one_over_the_sites() -> None:
    # At δ ≥ 1/n a mechanism that publishes one of the n sites' updates in the clear is
    # (0, δ)-DP: the guarantee says nothing about any site. Refused when the run starts,
    # where the number of connected sites is known.
    from server.privacy import ClientPrivacy
    from server.settings import ClientDPSettings

    dp = ClientDPSettings(clip_norm=1.0, noise_multiplier=1.0, delta=0.1)
    covers = r"dp.delta=0.1 must be < 1/10 \(the 10 sites the run covers: enrolled, connected"
    with pytest.raises(ConfigError, match=covers):
        ClientPrivacy.start(dp, planned_rate=1.0, rounds=3, history=[], population=10)
    ok = ClientPrivacy.start(dp, planned_rate=1.0, rounds=3, history=[], population=9)
    assert ok.ledger.delta == 0.1
    # Sites that join later shrink 1/n: every round checks again, before it runs.
    assert ok.stop_reason(2, 1.0, population=9) is None
    reason = ok.stop_reason(2, 1.0, population=12)
    assert reason is not None and reason.startswith("stopped before round 2: dp.delta=0.1")
