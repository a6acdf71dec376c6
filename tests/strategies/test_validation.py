"""Server-side update validation: one row per way a site's update can be wrong."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.errors import RoundFailed, UpdateRejected
from strategies.fedavg import FedAvg, FedProx
from strategies.strategy import SiteUpdate
from strategies.validation import update_norm, validate_update

REF = {
    "a": np.zeros((2, 2), dtype=np.float32),
    "b": np.zeros((3,), dtype=np.float32),
}


def _update(**changes: np.ndarray) -> dict[str, np.ndarray]:
    out = {k: v.copy() for k, v in REF.items()}
    out.update(changes)
    return out


def test_good_update_returns_its_norm() -> None:
    update = _update(b=np.array([3.0, 4.0, 0.0], dtype=np.float32))
    assert validate_update(update, reference=REF, num_examples=10, max_norm=5.0) == 5.0


@pytest.mark.parametrize(
    ("update", "num_examples", "check", "detail"),
    [
        ({"a": REF["a"]}, 1, "keys", "missing=['b']"),
        (_update(c=np.zeros(1, np.float32)), 1, "keys", "unexpected=['c']"),
        (_update(b=np.zeros(3, np.float64)), 1, "dtype", "float64"),
        (_update(b=np.zeros(4, np.float32)), 1, "shape", "(4,)"),
        (_update(b=np.array([0, np.nan, np.inf], np.float32)), 1, "finite", "2 non-finite"),
        (_update(b=np.array([6.0, 0, 0], np.float32)), 1, "norm", "exceeds update.max-norm=5.0"),
        (_update(), 0, "num-examples", "outside 1..10000000"),
        (_update(), 10**9, "num-examples", "outside"),
        (_update(), 2.5, "num-examples", "not an integer"),
        (_update(), True, "num-examples", "not an integer"),
        (_update(), None, "num-examples", "not an integer"),
    ],
)
def test_bad_update_is_rejected_with_its_check(
    update: dict, num_examples: object, check: str, detail: str
) -> None:
    with pytest.raises(UpdateRejected) as info:
        validate_update(update, reference=REF, num_examples=num_examples, max_norm=5.0)
    assert info.value.check == check
    assert detail in info.value.detail


def test_norm_is_relative_to_the_global_state() -> None:
    ref = {"w": np.array([10.0, 10.0], np.float32)}
    assert update_norm({"w": np.array([13.0, 14.0], np.float32)}, ref) == 5.0


def test_fedavg_leaves_out_rejected_sites_and_averages_the_rest() -> None:
    # Arrange: two good sites (weights 1 and 3) and one hostile site sending NaN
    good1 = SiteUpdate("s1", _update(b=np.array([4.0, 0, 0], np.float32)), 1)
    good2 = SiteUpdate("s2", _update(b=np.array([0.0, 4.0, 0], np.float32)), 3)
    hostile = SiteUpdate("evil", _update(b=np.array([np.nan, 0, 0], np.float32)), 10**6)
    # Act
    outcome = FedAvg(max_norm=10.0, min_fit_clients=2).aggregate(1, REF, [good1, hostile, good2])
    # Assert
    np.testing.assert_allclose(outcome.state["b"], [1.0, 3.0, 0.0])
    assert [u.site for u in outcome.accepted] == ["s1", "s2"]
    assert [(r.site, r.check) for r in outcome.rejected] == [("evil", "finite")]


def test_round_fails_below_min_fit_clients() -> None:
    good = SiteUpdate("s1", _update(), 5)
    bad = SiteUpdate("s2", {"a": REF["a"]}, 5)
    with pytest.raises(RoundFailed, match="1 valid update"):
        FedAvg(min_fit_clients=2).aggregate(3, REF, [good, bad])


def test_fedprox_asks_sites_for_the_proximal_term() -> None:
    assert FedProx(proximal_mu=0.1).client_config() == {"proximal_mu": 0.1}
    assert FedAvg().client_config() == {}


def test_a_noise_floor_accepts_more_noise_and_refuses_less() -> None:
    from strategies.validation import validate_train_metrics

    plan = {"site-noise-multiplier": 1.0, "site-max-grad-norm": 1.0, "site-delta": 1e-5}
    stated = {"site-epsilon": 3.0, "site-max-grad-norm": 1.0, "site-delta": 1e-5}

    def check(z: object, floor: float | None) -> None:
        validate_train_metrics(
            stated | {"site-noise-multiplier": z},  # type: ignore[dict-item]
            max_steps=1,
            max_seconds=10.0,
            sample_dp=plan,
            min_noise_multiplier=floor,
        )

    check(1.0, None)
    check(1.0, 1.0)
    check(1.7, 1.0)  # more noise than the target needs: the site's own choice
    with pytest.raises(UpdateRejected, match=r"is not the plan's 1\.0"):
        check(1.7, None)  # a fixed noise multiplier must be stated exactly
    for bad in (0.999, float("nan"), -1.0, "1.0"):
        with pytest.raises(UpdateRejected):
            check(bad, 1.0)
