"""What a release must satisfy beyond a valid signature: promotion gates and local policy.

Both are step 6 of `registry.accept.accept` (the `ReleasePolicy` protocol there): a
publisher promotes with the gates of a TOML policy file (`Policy`), a consumer loads with
its own limits (`LocalPolicy`). The promotion gates, read from the policy file:

    [gates]
    metric = "accuracy"     # provenance metric the next gate reads
    min-metric = 0.80       # refuse a release whose metric is lower (or missing)
    max-epsilon = 8.0       # refuse a release whose largest ε is higher
    require-dp = false      # refuse a release trained without differential privacy

The signer gate is always on: a release must be signed by a key in the trust store.

Every gate fails closed: a metric or ε that is missing where a gate needs it, NaN,
infinite or negative refuses the release (a NaN compares false both ways, so each check
is written as "refuse unless the value passes"). ``require-dp`` counts only DP whose
mechanism the server ran (client-level); the sites' own DP-SGD is reported in
provenance but cannot satisfy it. ``max-epsilon`` reads the largest ε of all guarantees;
a release without DP has no finite ε, so it is refused too (its ε is unbounded, and a
missing value fails every gate).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from clients.task.numbers import finite_number
from registry.artifact import Provenance
from registry.errors import PromotionRefused, RegistryError, VerificationError

KEYS = {"metric", "min-metric", "max-epsilon", "require-dp"}


@dataclass(frozen=True)
class Policy:
    """The publisher's promotion gates; a failed gate raises `PromotionRefused`."""

    metric: str = "accuracy"
    min_metric: float | None = None
    max_epsilon: float | None = None
    require_dp: bool = False

    def __post_init__(self) -> None:
        if self.min_metric is not None:
            number = finite_number(self.min_metric)
            if number is None or number < 0:
                raise RegistryError(f"policy gates.min-metric={self.min_metric!r} must be ≥ 0")
        if self.max_epsilon is not None:
            number = finite_number(self.max_epsilon)
            if number is None or number <= 0:
                raise RegistryError(f"policy gates.max-epsilon={self.max_epsilon!r} must be > 0")

    @classmethod
    def load(cls, path: Path | None) -> Policy:
        if path is None:
            return cls()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise RegistryError(f"cannot read policy {path}: {exc.strerror}") from exc
        except (ValueError, RecursionError) as exc:  # TOMLDecodeError, non-UTF-8, an int of
            # over 4,300 digits, arrays nested past the parser's recursion limit
            raise RegistryError(f"policy {path} is not valid TOML: {exc}") from exc
        gates = data.get("gates", {})
        if not isinstance(gates, dict):
            raise RegistryError(
                f"policy {path}: 'gates' must be a table ([gates]), not {type(gates).__name__}"
            )
        misplaced = sorted(set(data) & KEYS)
        if misplaced:
            raise RegistryError(f"policy {path}: {misplaced[0]} must be under [gates]")
        unknown = sorted(set(gates) - KEYS) + sorted(set(data) - {"gates"})
        if unknown:
            raise RegistryError(f"policy {path}: unknown key {unknown[0]!r}; known: {sorted(KEYS)}")
        metric = gates.get("metric", "accuracy")
        if not isinstance(metric, str) or not metric.strip():
            raise RegistryError(f"policy gates.metric={metric!r} must be a metric name")

        def number(key: str) -> float | None:
            value = gates.get(key)
            if value is None:
                return None
            number = finite_number(value)
            if number is None:
                raise RegistryError(f"policy gates.{key}={value!r} must be a finite number")
            return number

        require_dp = gates.get("require-dp", False)
        if not isinstance(require_dp, bool):
            raise RegistryError(f"policy gates.require-dp={require_dp!r} must be true or false")
        return cls(
            metric=metric,
            min_metric=number("min-metric"),
            max_epsilon=number("max-epsilon"),
            require_dp=require_dp,
        )

    def check(self, provenance: Provenance) -> None:
        """Raise `PromotionRefused` naming the first gate that fails."""
        if self.min_metric is not None:
            value = provenance.metrics.get(self.metric)
            if value is None:
                raise PromotionRefused(
                    "min-metric", f"the release has no metric {self.metric!r} in its provenance"
                )
            number = finite_number(value)
            if number is None or number < self.min_metric:
                raise PromotionRefused(
                    "min-metric",
                    f"{self.metric}={value!r} is not >= min-metric={self.min_metric:.4g}",
                )
        if self.require_dp:
            verified = provenance.verified_epsilon()
            if finite_number(verified) is None:
                raise PromotionRefused(
                    "require-dp",
                    f"the release has no DP the server ran (client-level ε={verified!r}); "
                    "the sites' own DP-SGD cannot be verified by the server",
                )
        epsilon = provenance.epsilon()
        if self.max_epsilon is not None and (epsilon is None or not epsilon <= self.max_epsilon):
            shown = "unbounded (trained without DP)" if epsilon is None else repr(epsilon)
            raise PromotionRefused(
                "max-epsilon", f"ε={shown} is not <= max-epsilon={self.max_epsilon:.4g}"
            )


@dataclass(frozen=True)
class LocalPolicy:
    """What one consumer (edge node, ``fedlora edge pull``) accepts on top of the index.

    ``base_digest`` is the base model this consumer has; `registry.accept.accept` compares
    it (step 5) before it calls `check` (step 6), so a release for another base is refused
    as ``base-mismatch`` whatever its ε.
    """

    base_digest: str | None = None
    max_epsilon: float | None = None

    def check(self, provenance: Provenance) -> None:
        """Raise `VerificationError` (``policy``) for a release with a larger ε than allowed
        (or an ε that is NaN, infinite, negative or missing: fails closed)."""
        eps = provenance.epsilon()
        if self.max_epsilon is not None and (eps is None or not eps <= self.max_epsilon):
            shown = "unbounded (trained without DP)" if eps is None else repr(eps)
            raise VerificationError(
                "policy",
                f"release {provenance.release} has ε={shown}, "
                f"not <= max-epsilon={self.max_epsilon}",
            )
