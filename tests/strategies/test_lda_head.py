"""The LDA head from summed statistics: worked by hand, split-invariant, fails closed."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.task.errors import ConfigError
from strategies.errors import RoundFailed
from strategies.lda_head import UNSEEN_MARGIN, HeadStatistics, bounded_statistics, lda_head


def test_a_one_dimensional_head_worked_by_hand() -> None:
    # label 0: φ = -1, -3 (mean -2); label 1: φ = 1, 3 (mean 2). gram = 20, N = 4, C = 2:
    # Σ_w = (20 - 2·4 - 2·4) / 2 = 2, and shrinking towards (tr/d) I = 2 leaves 2.
    # W_c = μ_c / 2 = ∓1; b_c = -½ μ_c W_c + log ½ = -1 + log ½ for both.
    stats = HeadStatistics.of(np.array([[-1.0], [-3.0], [1.0], [3.0]]), np.array([0, 0, 1, 1]),
                              num_labels=2)  # fmt: skip
    assert stats.gram.item() == 20 and stats.class_sum.ravel().tolist() == [-4, 4]

    weight, bias = lda_head(stats, shrinkage=0.1)

    assert weight.ravel().tolist() == pytest.approx([-1.0, 1.0])
    assert bias.tolist() == pytest.approx([-1 + math.log(0.5)] * 2)


def test_counts_below_one_keep_each_class_mean() -> None:
    # The rows above with every sum scaled by ¼, as `bounded_statistics` scales a site that
    # sent 4x the median's rows: counts ½, class sums ∓1, gram 5, N = 1. The means are
    # still ∓2; Σ_w = (5 - ½·4 - ½·4) / max(1 - 2, 1) = 1, so W_c = ∓2, b_c = -2 + log ½.
    stats = HeadStatistics.of(np.array([[-1.0], [-3.0], [1.0], [3.0]]), np.array([0, 0, 1, 1]),
                              num_labels=2).scaled(0.25)  # fmt: skip

    weight, bias = lda_head(stats, shrinkage=0.1)

    assert weight.ravel().tolist() == pytest.approx([-2.0, 2.0])
    assert bias.tolist() == pytest.approx([-2 + math.log(0.5)] * 2)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(1, 59), max_size=4))
def test_the_head_is_the_same_however_the_rows_are_split_over_sites(
    seed: int, cuts: list[int]
) -> None:
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(60, 5)), rng.integers(0, 3, size=60)
    whole = HeadStatistics.of(x, y, num_labels=3)
    edges = [0, *sorted(set(cuts)), 60]
    parts = [HeadStatistics.of(x[a:b], y[a:b], num_labels=3) for a, b in itertools.pairwise(edges)]

    total = sum(parts[1:], parts[0])

    for got, want in zip(lda_head(total), lda_head(whole), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_gaussian_classes_are_told_apart() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=2.0, size=(4, 8))
    y = rng.integers(0, 4, size=400)
    x = centres[y] + rng.normal(size=(400, 8))
    weight, bias = lda_head(HeadStatistics.of(x[:300], y[:300], num_labels=4))

    accuracy = np.mean(np.argmax(x[300:] @ weight.T + bias, axis=1) == y[300:])

    assert accuracy > 0.9


def test_a_label_no_site_holds_is_never_predicted_first() -> None:
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    weight, bias = lda_head(HeadStatistics.of(x, np.array([0, 0, 2, 2]), num_labels=3))

    assert np.all(weight[1] == 0)
    assert bias[1] == pytest.approx(min(bias[0], bias[2]) - UNSEEN_MARGIN)
    assert 1 not in np.argmax(x @ weight.T + bias, axis=1)


@pytest.mark.parametrize("shrinkage", [0.0, -0.1, 1.5, float("nan")])
def test_shrinkage_outside_zero_one_is_refused(shrinkage: float) -> None:
    stats = HeadStatistics.of(np.eye(2), np.array([0, 1]), num_labels=2)
    with pytest.raises(ConfigError, match=r"head\.shrinkage="):
        lda_head(stats, shrinkage=shrinkage)


def test_one_label_is_not_enough() -> None:
    stats = HeadStatistics.of(np.eye(2), np.array([0, 0]), num_labels=2)
    with pytest.raises(RoundFailed, match="1 label"):
        lda_head(stats)


def test_a_singular_covariance_is_a_round_failure() -> None:
    # Every row 0 in one dimension, and a shrinkage whose share of tr/d underflows to 0:
    # LAPACK meets an exact zero pivot. The server keeps the seeded head on RoundFailed;
    # numpy's LinAlgError would end the run.
    rng = np.random.default_rng(0)
    x = rng.normal(scale=0.1, size=(40, 4))
    x[:, 0] = 0.0
    stats = HeadStatistics.of(x, rng.integers(0, 2, size=40), num_labels=2)

    with pytest.raises(RoundFailed, match="singular"):
        lda_head(stats, shrinkage=5e-324)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 40), scale=st.floats(1e-3, 1e3))
def test_honest_sums_pass_the_checks(seed: int, rows: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    stats = HeadStatistics.of(rng.normal(scale=scale, size=(rows, 6)),
                              rng.integers(0, 4, size=rows), num_labels=4)  # fmt: skip
    assert stats.problem(labels=4, hidden=6) is None


_SIGN = np.array([1.0, -1.0, 1.0])
_INDEFINITE = 2 * np.eye(3) - np.outer(_SIGN, _SIGN)  # unit diagonal, eigenvalues -1, 2, 2


def _honest() -> HeadStatistics:
    rng = np.random.default_rng(1)
    return HeadStatistics.of(rng.normal(size=(20, 3)), rng.integers(0, 2, size=20), num_labels=2)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda s: HeadStatistics(s.gram[:2, :2], s.class_sum, s.count), "gram has shape"),
        (lambda s: HeadStatistics(s.gram, s.class_sum, s.count * np.nan), "count holds NaN"),
        (lambda s: HeadStatistics(s.gram, s.class_sum, s.count - 100), "negative or fractional"),
        (lambda s: HeadStatistics(s.gram, s.class_sum, s.count + 0.5), "negative or fractional"),
        (lambda s: HeadStatistics(s.gram, s.class_sum, s.count * 0), "no rows"),
        (lambda s: HeadStatistics(-s.gram, s.class_sum, s.count), "non-negative diagonal"),
        # a class sum no set of rows with this gram could have: a site inflating one label
        (lambda s: HeadStatistics(s.gram, s.class_sum * 100, s.count), "class_sum breaks"),
        (
            lambda s: HeadStatistics(s.gram + 50 * (1 - np.eye(3)), s.class_sum, s.count),
            "gram breaks",
        ),
        # Every entry within its Cauchy–Schwarz bound, yet an eigenvalue near -100 along
        # (1, -1, 1): added to the others' sums it makes the covariance nearly singular
        # along a direction the site picks, and the head follows it.
        (
            lambda s: HeadStatistics(s.gram + 100 * _INDEFINITE, s.class_sum, s.count),
            "within-class scatter",
        ),
        # Class sums each within bound, but spread further apart than the gram allows.
        (lambda s: HeadStatistics(s.gram, s.class_sum * 4, s.count), "within-class scatter"),
        # Counts each finite and whole whose sum a float cannot hold: named, not raised.
        (lambda s: HeadStatistics(s.gram, s.class_sum, np.full(2, 1e308)), "count sums to"),
    ],
)
def test_sums_no_real_rows_could_give_are_named(change, problem: str) -> None:
    assert problem in (change(_honest()).problem(labels=2, hidden=3) or "")


def test_a_site_claiming_many_or_huge_rows_is_bounded_by_the_median() -> None:
    honest = [_honest(), _honest(), _honest()]
    many = _honest().scaled(100.0)  # 100x the rows, same sizes
    huge = HeadStatistics(_honest().gram * 1e6, _honest().class_sum * 1e3, _honest().count)

    total, factors = bounded_statistics([*honest, many, huge], max_ratio=2.0)

    assert factors[:3] == [1.0, 1.0, 1.0]
    assert factors[3] == pytest.approx(2.0 / 100.0)  # down to twice the median's rows
    assert factors[4] == pytest.approx(2.0 / 1e6)  # down to twice the median's sizes
    assert total.rows <= 3 * 20 + 2 * 40 + 1e-6
    unbounded, _ = bounded_statistics([*honest, many, huge], max_ratio=0.0)
    assert unbounded.rows == 3 * 20 + 2000 + 20
