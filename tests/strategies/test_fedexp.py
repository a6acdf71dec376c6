"""FedExP's step size and step, with expected values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from clients.task.errors import ConfigError
from strategies.fedavg import FedAvg
from strategies.fedexp import EPSILON, extrapolation, weighted_spread
from strategies.server_opt import ServerOptimizer
from strategies.strategy import SiteUpdate


def test_orthogonal_updates_extrapolate_by_about_half_the_site_count() -> None:
    # Two sites with orthogonal unit updates e1, e2: mean (0.5, 0.5), ‖mean‖² = 0.5,
    # Σ w_i ‖Δ_i‖² = 1, so 1 / (2 · (0.5 + ε)) is just below 1 and η = 1 ...
    assert extrapolation(spread=1.0, mean_sq_norm=0.5) == 1.0
    # ... and with ten orthogonal unit updates: ‖mean‖² = 10 · 0.1² = 0.1, η ≈ 5.
    assert extrapolation(spread=1.0, mean_sq_norm=0.1) == pytest.approx(1 / (2 * (0.1 + EPSILON)))


def test_identical_updates_are_plain_fedavg() -> None:
    # Every site sends the same Δ: spread = ‖Δ‖² = ‖mean‖², ratio 1/2 -> η = max(1, ½) = 1.
    assert extrapolation(spread=4.0, mean_sq_norm=4.0) == 1.0


def test_weighted_spread_normalises_the_weights() -> None:
    # Weights 1 and 3 -> shares ¼ and ¾: ¼·4 + ¾·0 = 1.
    assert weighted_spread([4.0, 0.0], [1, 3]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        weighted_spread([1.0], [1, 1])


def test_fedavg_reports_the_spread_of_what_it_accepted() -> None:
    ref = {"w": np.zeros(2, np.float32)}
    updates = [
        SiteUpdate("a", {"w": np.array([1.0, 0.0], np.float32)}, 1),
        SiteUpdate("b", {"w": np.array([0.0, 2.0], np.float32)}, 1),
    ]

    outcome = FedAvg(min_fit_clients=2).aggregate(1, ref, updates)

    # ½·1 + ½·4 = 2.5; mean (0.5, 1.0)
    assert outcome.spread == pytest.approx(2.5)
    np.testing.assert_allclose(outcome.state["w"], [0.5, 1.0])


def test_fedexp_step_moves_by_eta_times_the_average_update() -> None:
    current = {"w": np.zeros(2, np.float32)}
    average = {"w": np.array([0.5, 1.0], np.float32)}  # ‖Δ‖² = 1.25
    opt = ServerOptimizer(kind="fedexp")

    new, state = opt.step(current, average, {}, spread=25.0)

    eta = 25.0 / (2 * (1.25 + EPSILON))  # ≈ 9.99
    assert float(state["eta"][0]) == pytest.approx(eta, rel=1e-6)
    np.testing.assert_allclose(new["w"], [0.5 * eta, 1.0 * eta], rtol=1e-6)


def test_fedexp_refuses_a_round_without_single_update_norms() -> None:
    with pytest.raises(ValueError, match="norms"):
        ServerOptimizer(kind="fedexp").step({"w": np.zeros(1)}, {"w": np.ones(1)}, {})


def test_fedexp_is_refused_with_secure_aggregation() -> None:
    from server.settings import RunSettings

    with pytest.raises(ConfigError, match=r"server\.optimizer.*secagg\.enabled"):
        RunSettings.from_config(
            {
                "labels": "a,b",
                "server.optimizer": "fedexp",
                "secagg.enabled": True,
                "min-fit-clients": 3,
                "min-available-clients": 3,
            }
        )
