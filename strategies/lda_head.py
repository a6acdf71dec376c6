"""A classifier head in closed form from the sites' summed statistics (Fisher's LDA).

Under label skew a randomly initialised head is the federated run's slowest part: each site
pulls the rows of the labels it holds, and the first rounds are spent agreeing on a head.
Before round 1 every site instead computes three sums over its training rows, with the
initial model (the base: LoRA's B starts at zero), of the inputs φ of the classification
head:

- ``gram``: ``Σ φ φᵀ`` (hidden, hidden),
- ``class_sum``: ``Σ_{y=c} φ`` (labels, hidden),
- ``count``: examples per label (labels,).

The server adds them (sums only, so it needs no single site's statistics in principle) and
sets the head to linear discriminant analysis with one shared, shrunk covariance:

    μ_c = class_sum_c / count_c,  Σ_w = (gram - Σ_c count_c μ_c μ_cᵀ) / (N - C),
    Σ = (1 - s) Σ_w + s (tr Σ_w / d) I,
    W_c = Σ⁻¹ μ_c,  b_c = -½ μ_cᵀ Σ⁻¹ μ_c + log(count_c / N),

the Bayes classifier for Gaussian classes with a shared covariance (Hastie, Tibshirani and
Friedman, "The Elements of Statistical Learning", 2nd ed., §4.3), with Ledoit and Wolf's
shrinkage towards a scaled identity ("A well-conditioned estimator for large-dimensional
covariance matrices", 2004) at a fixed ``s`` rather than a data-tuned one. Being a function
of the sums alone, the head is the same whichever way the rows are split over sites:
label skew cannot bend it. Training then goes on from it, as linear probing then
fine-tuning does (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution"); Fed3R (Fanì et al. 2024, "Accelerating Heterogeneous
Federated Learning with Closed-form Classifiers") does the same with ridge regression.

A label no site holds keeps a zero weight row and a bias below every held label's, so it
is never predicted before training has seen it.

Usage::

    total = sum(site_statistics, HeadStatistics.zeros(labels=77, hidden=384))
    weight, bias = lda_head(total, shrinkage=0.1)    # (77, 384), (77,)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clients.task.errors import ConfigError
from strategies.errors import RoundFailed

# Shrinkage of the within-class covariance towards (tr/d) I: with N of a few thousand rows
# and d = 384 the sample covariance is poorly conditioned; 0.1 keeps its shape while
# bounding its condition number. Fixed, not tuned per data set.
DEFAULT_SHRINKAGE = 0.1
# A label no site holds: its bias sits this far (in logits) below the lowest held label's.
UNSEEN_MARGIN = 10.0


@dataclass(frozen=True)
class HeadStatistics:
    """Sums over a site's (or several sites') training rows of the head's inputs.

    Attributes:
        gram: ``Σ φ φᵀ``, shape (hidden, hidden), float64.
        class_sum: ``Σ_{y=c} φ``, shape (labels, hidden), float64.
        count: Rows per label, shape (labels,), float64 holding whole numbers.
    """

    gram: np.ndarray
    class_sum: np.ndarray
    count: np.ndarray

    @classmethod
    def zeros(cls, *, labels: int, hidden: int) -> HeadStatistics:
        return cls(np.zeros((hidden, hidden)), np.zeros((labels, hidden)), np.zeros(labels))

    @classmethod
    def of(cls, features: np.ndarray, labels: np.ndarray, *, num_labels: int) -> HeadStatistics:
        """The sums of `features` (rows, hidden) with label indices `labels` (rows,)."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels, dtype=np.int64)
        class_sum = np.zeros((num_labels, x.shape[1]))
        np.add.at(class_sum, y, x)
        return cls(x.T @ x, class_sum, np.bincount(y, minlength=num_labels).astype(np.float64))

    @property
    def rows(self) -> int:
        return int(self.count.sum())

    def __add__(self, other: HeadStatistics) -> HeadStatistics:
        return HeadStatistics(
            self.gram + other.gram, self.class_sum + other.class_sum, self.count + other.count
        )

    def scaled(self, factor: float) -> HeadStatistics:
        """Every sum times `factor` (a site's weight capped under bounded influence)."""
        return HeadStatistics(self.gram * factor, self.class_sum * factor, self.count * factor)

    def problem(self, *, labels: int, hidden: int) -> str | None:
        """Why these cannot be one site's honest sums, or None.

        Checked: the shapes; every value finite; counts whole and >= 0; ``gram`` symmetric
        with a non-negative diagonal; the two Cauchy–Schwarz bounds every real set of
        rows satisfies, ``|gram_ij| ≤ √(gram_ii gram_jj)`` and
        ``|class_sum_cj| ≤ √(count_c gram_jj)``; and a positive semi-definite within-class
        scatter. They bound what a site can claim by what it says its rows are; how large
        its rows may be is bounded against the other sites (`bounded_statistics`).
        """
        shapes = {
            "gram": (self.gram.shape, (hidden, hidden)),
            "class_sum": (self.class_sum.shape, (labels, hidden)),
            "count": (self.count.shape, (labels,)),
        }
        for name, (got, want) in shapes.items():
            if got != want:
                return f"{name} has shape {got}, expected {want}"
        for name, value in (("gram", self.gram), ("class_sum", self.class_sum),
                            ("count", self.count)):  # fmt: skip
            if not np.all(np.isfinite(value)):
                return f"{name} holds NaN or inf"
        if np.any(self.count < 0) or np.any(self.count != np.round(self.count)):
            return "count holds a negative or fractional number of rows"
        if not np.isfinite(total := self.count.sum()):  # whole counts near 1e308 each
            return f"count sums to {total}"
        if self.rows < 1:
            return "no rows"
        diagonal = np.diag(self.gram)
        slack = 1e-6 * (1.0 + np.abs(self.gram).max())  # float rounding of honest sums
        if np.any(diagonal < 0) or np.abs(self.gram - self.gram.T).max() > slack:
            return "gram is not symmetric with a non-negative diagonal"
        bound = np.sqrt(np.outer(diagonal, diagonal))
        if np.any(np.abs(self.gram) > bound + slack):
            return "gram breaks |gram_ij| <= sqrt(gram_ii gram_jj)"
        if np.any(np.abs(self.class_sum) > np.sqrt(np.outer(self.count, diagonal)) + slack):
            return "class_sum breaks |class_sum_cj| <= sqrt(count_c gram_jj)"
        if not _semi_definite(self._unit_within_scatter(), tolerance=1e-9 * hidden):
            return "the within-class scatter gram - Σ_c count_c μ_c μ_cᵀ is not semi-definite"
        return None

    def _unit_within_scatter(self) -> np.ndarray:
        """``gram - Σ_c class_sum_c class_sum_cᵀ / count_c`` scaled to a unit diagonal of gram.

        Real rows give a positive semi-definite one (the Schur complement of their joint
        second moment ``Σ [φ; e_y][φ; e_y]ᵀ``); the elementwise bounds above do not imply
        it for more than two dimensions, and an indefinite one bends the summed covariance
        towards singular along a direction the site chooses. Scaling by ``√gram_jj`` keeps
        the check free of overflow and of the rows' size.
        """
        held = self.count > 0
        root = np.sqrt(np.diag(self.gram))
        root[root == 0] = 1.0  # a dimension where every row is 0
        sums = self.class_sum[held] / root  # (held labels, hidden)
        return self.gram / np.outer(root, root) - sums.T @ (sums / self.count[held, None])

    def mean_square(self) -> float:
        """Mean squared norm of the rows, ``tr(gram) / rows``."""
        return float(np.trace(self.gram)) / max(self.rows, 1)


def _semi_definite(matrix: np.ndarray, *, tolerance: float) -> bool:
    """Whether the symmetric ``matrix`` has no eigenvalue below ``-tolerance`` (NaN: no)."""
    if not np.all(np.isfinite(matrix)):
        return False
    try:  # Cholesky: cheaper than eigenvalues at hidden sizes up to 4096
        np.linalg.cholesky((matrix + matrix.T) / 2 + tolerance * np.eye(len(matrix)))
    except np.linalg.LinAlgError:
        return False
    return True


def bounded_statistics(
    sites: list[HeadStatistics], *, max_ratio: float
) -> tuple[HeadStatistics, list[float]]:
    """The sum over sites, each site's part bounded against the round's lower median.

    A site's sums are scaled down so that neither its row count nor its rows' mean squared
    norm exceeds ``max_ratio`` times the lower median of the sites' (the rule of
    strategies/bounded.py, applied to counts and sizes); honest sites near the median are
    summed exactly. ``max_ratio <= 0`` sums them as sent.

    Returns:
        (the sum, each site's factor in the order given).
    """
    from strategies.bounded import lower_median

    factors = [1.0] * len(sites)
    if max_ratio > 0 and sites:
        rows_cap = max_ratio * lower_median([s.rows for s in sites])
        size_cap = max_ratio * lower_median([s.mean_square() for s in sites])
        for i, s in enumerate(sites):
            rows = min(1.0, rows_cap / s.rows)
            size = min(1.0, size_cap / s.mean_square()) if s.mean_square() > 0 else 1.0
            factors[i] = rows * size
    total = HeadStatistics.zeros(labels=len(sites[0].count), hidden=sites[0].gram.shape[0])
    for s, f in zip(sites, factors, strict=True):
        total = total + (s if f == 1.0 else s.scaled(f))
    return total, factors


def lda_head(
    stats: HeadStatistics, *, shrinkage: float = DEFAULT_SHRINKAGE
) -> tuple[np.ndarray, np.ndarray]:
    """Fisher's LDA head of the summed statistics (formulas in the module docstring).

    Returns:
        (weight (labels, hidden), bias (labels,)), float64, finite.

    Raises:
        ConfigError: If `shrinkage` is outside (0, 1].
        RoundFailed: If the statistics hold fewer than two labels, or the covariance is
            singular or the head not finite.
    """
    if not 0 < shrinkage <= 1:
        raise ConfigError(f"head.shrinkage={shrinkage!r} must be in (0, 1]")
    count = stats.count
    held = count > 0
    if held.sum() < 2:
        raise RoundFailed(f"the sites' rows hold {int(held.sum())} label(s); LDA needs 2")
    n, d = float(count.sum()), stats.gram.shape[0]
    # Counts may be below 1 (a site's sums scaled down by `bounded_statistics`): a mean is
    # class_sum / count however small the count.
    safe = np.where(held, count, 1.0)
    means = np.where(held[:, None], stats.class_sum / safe[:, None], 0.0)  # (labels, hidden)
    within = (stats.gram - (means * count[:, None]).T @ means) / max(n - held.sum(), 1.0)
    within = (within + within.T) / 2
    scale = float(np.trace(within)) / d
    if not scale > 0:  # every row equal to its class mean: the identity's shape will do
        scale = max(float(np.trace(stats.gram)) / (n * d), 1e-12)
    covariance = (1 - shrinkage) * within + shrinkage * scale * np.eye(d)
    try:
        weight = np.linalg.solve(covariance, means.T).T  # (labels, hidden)
    except np.linalg.LinAlgError as exc:  # shrinkage · tr/d underflowing to 0
        raise RoundFailed(f"the shrunk covariance is singular: {exc}") from exc
    bias = -0.5 * np.sum(weight * means, axis=1) + np.log(safe / n)
    weight[~held] = 0.0
    bias[~held] = bias[held].min() - UNSEEN_MARGIN
    if not (np.all(np.isfinite(weight)) and np.all(np.isfinite(bias))):
        raise RoundFailed("the LDA head is not finite (statistics too large or degenerate)")
    return weight, bias
