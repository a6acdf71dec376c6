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
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

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
        if self.min_metric is not None and not self.min_metric >= 0.0:
            raise RegistryError(f"policy gates.min-metric={self.min_metric!r} must be ≥ 0")
        if self.max_epsilon is not None and not self.max_epsilon > 0:
            raise RegistryError(f"policy gates.max-epsilon={self.max_epsilon!r} must be > 0")

    @classmethod
    def load(cls, path: Path | None) -> Policy:
        if path is None:
            return cls()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise RegistryError(f"cannot read policy {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise RegistryError(f"policy {path} is not valid TOML: {exc}") from exc
        gates = data.get("gates", {})
        unknown = sorted(set(gates) - KEYS) + sorted(set(data) - {"gates"})
        if unknown:
            raise RegistryError(f"policy {path}: unknown key {unknown[0]!r}; known: {sorted(KEYS)}")

        def number(key: str) -> float | None:
            value = gates.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RegistryError(f"policy gates.{key}={value!r} must be a number")
            return float(value)

        require_dp = gates.get("require-dp", False)
        if not isinstance(require_dp, bool):
            raise RegistryError(f"policy gates.require-dp={require_dp!r} must be true or false")
        return cls(
            metric=str(gates.get("metric", "accuracy")),
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
            if value < self.min_metric:
                raise PromotionRefused(
                    "min-metric", f"{self.metric}={value:.4g} < min-metric={self.min_metric:.4g}"
                )
        epsilon = provenance.epsilon()
        if self.require_dp and epsilon is None:
            raise PromotionRefused("require-dp", "the release was trained without DP")
        if self.max_epsilon is not None and epsilon is not None and epsilon > self.max_epsilon:
            raise PromotionRefused(
                "max-epsilon", f"ε={epsilon:.4g} > max-epsilon={self.max_epsilon:.4g}"
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
        """Raise `VerificationError` (``policy``) for a release with a larger ε than allowed."""
        eps = provenance.epsilon()
        if self.max_epsilon is not None and eps is not None and eps > self.max_epsilon:
            raise VerificationError(
                "policy",
                f"release {provenance.release} has ε={eps:.4g} > max-epsilon={self.max_epsilon}",
            )
