"""The OS-seeded generator of DP noise: Gaussian, unpredictable, never repeated."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from clients.task.secure_random import SecureRandom, os_seed


def test_normal_has_the_asked_mean_scale_and_shape() -> None:
    samples = SecureRandom().normal(1.5, 0.25, size=(400, 500))
    assert samples.shape == (400, 500) and samples.dtype == np.float64
    assert samples.mean() == pytest.approx(1.5, abs=0.003)  # 5 standard errors
    assert samples.std() == pytest.approx(0.25, rel=0.008)  # 5 standard errors
    # Kolmogorov–Smirnov against N(0, 1): a wrong Box–Muller would fail at this size.
    assert stats.kstest((samples.ravel()[:100_000] - 1.5) / 0.25, "norm").pvalue > 1e-4


def test_two_generators_never_share_a_stream() -> None:
    # Each instance keys AES with fresh OS bytes: nothing about one predicts the other.
    a, b = SecureRandom(), SecureRandom()
    assert not np.array_equal(a.normal(size=64), b.normal(size=64))
    assert not np.array_equal(a.random(8), a.random(8))
    assert os_seed() != os_seed() and 0 <= os_seed() < 2**63
