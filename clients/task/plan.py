"""The round plan: what the server tells a site to do, as a flat Flower config record.

The server builds a `TrainPlan` from its run settings and sends `plan.to_config()` with
the global adapter; the site rebuilds it with `TrainPlan.from_config`, which validates
every field, so a site never trains on a plan it has not checked.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from clients.task.choices import (
    LEGACY_POOLING,
    LEGACY_SITE_DP_OPTIMIZER,
    MIN_MAX_LENGTH,
    RESOLVED_POOLINGS,
    SITE_DP_OPTIMIZERS,
    SITE_DP_TRAINABLE,
)
from clients.task.dpsgd import SampleDP, check_target_epsilon, solve_noise_multiplier
from clients.task.errors import ConfigError
from clients.task.model import ModelSpec
from clients.task.numbers import check_delta
from clients.task.text import short


@dataclass(frozen=True)
class TrainPlan:
    """The model spec plus the local optimisation settings of one round."""

    spec: ModelSpec
    base_digest: str
    server_round: int = 1
    local_epochs: int = 1
    local_steps: int = 0
    batch_size: int = 16
    learning_rate: float = 5e-3
    max_length: int = 64
    proximal_mu: float = 0.0
    fedrs_alpha: float = 1.0
    # FedLC logit calibration strength τ (clients/task/train.py); 0 is off. It shapes the
    # classifier's softmax, so a causal-LM run ignores it.
    fedlc_tau: float = 0.0
    # The site clips its update (local - global) to this L2 norm before it leaves; 0 is off.
    clip_norm: float = 0.0
    # Every site weighs the same: under client-level DP (the sensitivity bound needs it) and
    # for every server.aggregate but "mean" (the sums, uniform-mean).
    uniform_weight: bool = False
    # Sample-level DP-SGD at the site (clients/task/dpsgd.py): a fixed noise multiplier,
    # or a target ε each site solves its own noise multiplier for; both 0 is off.
    site_dp_noise_multiplier: float = 0.0
    site_dp_target_epsilon: float = 0.0
    site_dp_max_grad_norm: float = 1.0
    site_dp_delta: float = 1e-5
    # What DP-SGD trains (clients/task/choices.py): all trainable tensors, or the
    # classifier head alone (the LoRA tensors then stay as received).
    site_dp_trainable: str = "all"
    # DP-SGD's local optimiser (clients/task/choices.py): plain SGD or AdamW. A plan from a
    # server before the field means AdamW, what every site ran then. Without site DP it
    # must be AdamW, what plain training uses (an sgd plan without DP is refused).
    site_dp_optimizer: str = LEGACY_SITE_DP_OPTIMIZER
    # Group-wise clipping under DP-SGD (clients/task/dpsgd.py): the adapter tensors' bound
    # as a share of site-dp.max-grad-norm; 0 (what a plan without the field means) is
    # flat clipping.
    site_dp_adapter_clip_share: float = 0.0
    # Rounds of the whole run (num-server-rounds): what a target ε is solved over.
    planned_rounds: int = 1

    def __post_init__(self) -> None:
        if self.local_epochs < 1 and self.local_steps < 1:
            raise ConfigError(
                f"local-epochs={self.local_epochs!r} and local-steps={self.local_steps!r}: "
                "one of them must be >= 1"
            )
        if self.local_steps < 0:
            raise ConfigError(f"local-steps={self.local_steps!r} must be >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"batch-size={self.batch_size!r} must be >= 1")
        if not 0 < self.learning_rate < math.inf:
            raise ConfigError(f"learning-rate={self.learning_rate!r} must be finite and > 0")
        if self.max_length < MIN_MAX_LENGTH:
            raise ConfigError(f"max-length={self.max_length!r} must be >= {MIN_MAX_LENGTH}")
        if not 0 <= self.proximal_mu < math.inf:
            raise ConfigError(f"proximal-mu={self.proximal_mu!r} must be finite and >= 0")
        if not 0.0 <= self.fedrs_alpha <= 1.0:
            raise ConfigError(f"fedrs.alpha={self.fedrs_alpha!r} must be in [0, 1]")
        if not 0 <= self.fedlc_tau < math.inf:
            raise ConfigError(f"fedlc.tau={self.fedlc_tau!r} must be finite and >= 0")
        if self.planned_rounds < 1:
            raise ConfigError(f"planned_rounds={self.planned_rounds!r} must be >= 1")
        self._check_sample_dp()
        if not 0 <= self.clip_norm < math.inf:  # NaN would read as 0 (no clipping)
            raise ConfigError(f"clip-norm={self.clip_norm!r} must be finite and >= 0")
        if self.fedrs_alpha < 1.0 and self.spec.task != "sequence-classification":
            raise ConfigError(
                f"fedrs.alpha={self.fedrs_alpha!r} applies to sequence-classification only, "
                f"not task={self.spec.task!r}"
            )

    def _check_sample_dp(self) -> None:
        z, target = self.site_dp_noise_multiplier, self.site_dp_target_epsilon
        check_target_epsilon("site-dp.target-epsilon", target)
        # Checked without DP-SGD too: a bad value is refused, not kept in the run's record.
        if not 0 < self.site_dp_max_grad_norm < math.inf:
            raise ConfigError(
                f"site-dp.max-grad-norm={self.site_dp_max_grad_norm!r} must be > 0 and finite"
            )
        check_delta("site-dp.delta", self.site_dp_delta)
        if z > 0 and target > 0:
            raise ConfigError(
                f"site-dp.noise-multiplier={z!r} and site-dp.target-epsilon={target!r}: "
                "set one of them (a target ε makes each site solve its noise multiplier)"
            )
        if self.site_dp_trainable not in SITE_DP_TRAINABLE:
            raise ConfigError(
                f"site-dp.trainable={self.site_dp_trainable!r} must be one of "
                f"{', '.join(SITE_DP_TRAINABLE)}"
            )
        if self.site_dp_optimizer not in SITE_DP_OPTIMIZERS:
            raise ConfigError(
                f"site-dp.optimizer={short(self.site_dp_optimizer)} must be one of "
                f"{', '.join(SITE_DP_OPTIMIZERS)}"
            )
        share = self.site_dp_adapter_clip_share
        if share and (
            self.site_dp_trainable != "all" or self.spec.task != "sequence-classification"
        ):
            raise ConfigError(
                f"site-dp.adapter-clip-share={share!r} applies to sequence-classification "
                f"with site-dp.trainable='all' only, not task={self.spec.task!r} with "
                f"site-dp.trainable={self.site_dp_trainable!r}: clipping is flat where a "
                "site has no head or trains it alone (set 0)"
            )
        if self.site_dp_trainable != "all" and self.spec.task != "sequence-classification":
            raise ConfigError(
                f"site-dp.trainable={self.site_dp_trainable!r} applies to "
                f"sequence-classification only, not task={self.spec.task!r}"
            )
        if z == 0 and target == 0:  # a negative noise multiplier is refused, not read as off
            if self.site_dp_optimizer != LEGACY_SITE_DP_OPTIMIZER:
                raise ConfigError(
                    f"site-dp.optimizer={self.site_dp_optimizer!r} needs sample-level DP "
                    "(site-dp.noise-multiplier or site-dp.target-epsilon); plain training "
                    "is AdamW"
                )
            if self.site_dp_trainable != "all" or self.site_dp_adapter_clip_share != 0:
                key, value = (
                    ("site-dp.trainable", self.site_dp_trainable)
                    if self.site_dp_trainable != "all"
                    else ("site-dp.adapter-clip-share", self.site_dp_adapter_clip_share)
                )
                raise ConfigError(
                    f"{key}={value!r} needs sample-level DP "
                    "(site-dp.noise-multiplier or site-dp.target-epsilon)"
                )
            return
        SampleDP(  # validates the site-dp fields
            noise_multiplier=z,
            max_grad_norm=self.site_dp_max_grad_norm,
            delta=self.site_dp_delta,
            adapter_clip_share=self.site_dp_adapter_clip_share,
        )
        if self.proximal_mu > 0:
            key = "site-dp.noise-multiplier" if z > 0 else "site-dp.target-epsilon"
            raise ConfigError(
                f"proximal-mu={self.proximal_mu!r} cannot be combined with {key}: DP-SGD "
                "clips per-example gradients and would drop the proximal term's"
            )

    def steps_for(self, num_examples: int) -> int:
        """Local optimiser steps a site with ``num_examples`` training rows takes."""
        return self.local_steps or self.local_epochs * math.ceil(num_examples / self.batch_size)

    def sampling_rate(self, num_examples: int) -> float:
        """DP-SGD's sampling rate at a site with ``num_examples`` training rows."""
        return min(1.0, self.batch_size / num_examples)

    @property
    def sample_level(self) -> bool:
        """True if sites train with DP-SGD this round."""
        return self.site_dp_noise_multiplier > 0 or self.site_dp_target_epsilon > 0

    def sample_dp(self, num_examples: int) -> SampleDP | None:
        """The DP-SGD settings of a site with ``num_examples`` training rows, or None.

        With ``site-dp.target-epsilon`` the noise multiplier is the smallest one whose ε
        over the whole planned run (``planned_rounds`` x this round's steps, at the site's
        sampling rate and the plan's δ, which every site checks is its own) stays at or
        below the target: it depends on the site's row count, so each site solves its own.

        Raises:
            ConfigError: If the target ε is unreachable for this site.
        """
        if not self.sample_level:
            return None
        z = self.site_dp_noise_multiplier
        if self.site_dp_target_epsilon > 0:
            z = solve_noise_multiplier(
                target_epsilon=self.site_dp_target_epsilon,
                delta=self.site_dp_delta,
                sampling_rate=self.sampling_rate(num_examples),
                steps=self.planned_rounds * self.steps_for(num_examples),
            )
        return SampleDP(
            noise_multiplier=z,
            max_grad_norm=self.site_dp_max_grad_norm,
            delta=self.site_dp_delta,
            adapter_clip_share=self.site_dp_adapter_clip_share,
        )

    def to_config(self) -> dict[str, Any]:
        """Flatten to the scalar and list values a Flower ConfigRecord accepts."""
        out: dict[str, Any] = {f"spec.{k}": v for k, v in asdict(self.spec).items()}
        # Lists travel as lists of strings, each label exactly as it is (Flower 1.41's
        # ConfigRecord carries list[str], empty lists included).
        out["spec.labels"] = list(self.spec.labels)
        out["spec.target_modules"] = list(self.spec.target_modules)
        if self.spec.pooling == LEGACY_POOLING:  # what a plan without the field means, so a
            del out["spec.pooling"]  # site from before head.pooling still takes such a run
        for f in fields(self):
            if f.name != "spec":
                out[f.name] = getattr(self, f.name)
        # Likewise AdamW: a site from before site-dp.optimizer takes every plan but one
        # asking for plain SGD, which it refuses (an unknown field) instead of running
        # AdamW at SGD's learning rate.
        if self.site_dp_optimizer == LEGACY_SITE_DP_OPTIMIZER:
            del out["site_dp_optimizer"]
        if self.site_dp_adapter_clip_share == 0:  # flat clipping: any site takes it
            del out["site_dp_adapter_clip_share"]
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TrainPlan:
        """Rebuild and validate a plan from `to_config` output.

        Raises:
            ConfigError: If a field is missing or has the wrong type.
        """
        spec_kwargs: dict[str, Any] = {}
        plan_kwargs: dict[str, Any] = {}
        for key, value in config.items():
            if key.startswith("spec."):
                spec_kwargs[key[5:]] = value
            else:
                plan_kwargs[key] = value
        # The server resolves head.pooling; a plan from a server before the field means the
        # model's own pooling, and a site never decides it from its own copy of the base.
        pooling = spec_kwargs.setdefault("pooling", LEGACY_POOLING)
        if pooling not in RESOLVED_POOLINGS:
            raise ConfigError(
                f"round plan field spec.pooling={short(pooling)}: expected one of "
                f"{', '.join(RESOLVED_POOLINGS)} (the server resolves 'auto')"
            )
        for key in ("labels", "target_modules"):
            value = spec_kwargs.get(key, [])
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ConfigError(
                    f"round plan field spec.{key} is not a list of strings: {short(value)}"
                )
            spec_kwargs[key] = tuple(value)
        known = {f.name for f in fields(cls)} - {"spec"}
        unknown = sorted(set(plan_kwargs) - known)
        if unknown:
            raise ConfigError(f"round plan has unknown fields {unknown}")
        try:
            spec = ModelSpec(**spec_kwargs)
            return cls(spec=spec, **plan_kwargs)
        except TypeError as exc:
            raise ConfigError(f"round plan is malformed: {exc}") from exc
