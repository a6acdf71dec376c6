"""Server-side optimiser applied to the averaged update (FedAvgM, FedAdam).

FedAvg replaces the global adapter with the sites' average. Treating
``delta = average - global`` as a pseudo-gradient and stepping with a server optimiser
(Reddi et al. 2021, "Adaptive Federated Optimization") speeds up convergence on
label-skewed sites, where each round's average moves only a little:

- ``sgd`` with heavy-ball momentum (FedAvgM, Hsu et al. 2019, "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification")::

      m <- momentum * m + delta
      global <- global + learning_rate * m

- ``adam`` (FedAdam; no bias correction, as in Reddi et al.)::

      m <- momentum * m + (1 - momentum) * delta
      v <- BETA2 * v + (1 - BETA2) * delta**2
      global <- global + learning_rate * m / (sqrt(v) + TAU)

  The per-coordinate scale lets rarely-updated tensors (e.g. the head rows of labels few
  sites hold, whose averaged change is diluted by every other site) move as fast as the
  rest.

``lora_scale`` multiplies the step of the LoRA tensors (everything but the classification
head, `HEAD_MARK`) by a server learning rate of their own. A round's mean of the sites'
LoRA updates moves the adapter by about one site's local steps while the round consumed
every site's data; a server step size above 1 on that pseudo-gradient (Reddi et al. 2021,
eta_g; Malinovsky et al. 2023, "Server-Side Stepsizes and Sampling Without Replacement
Provably Help in Federated Optimization") recovers part of that, and a separate one
leaves the head, which ``sum-head`` already scales by the number of sites, as it is.

``sgd`` with ``learning_rate=1, momentum=0, lora_scale=1`` is plain FedAvg and returns the average
unchanged, keeping no state. Both steps are elementwise functions of the averaged
update, so they only need what secure aggregation reveals (the sum).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from clients.task.errors import ConfigError
from strategies.fedexp import extrapolation

KINDS = ("sgd", "adam", "fedexp")
# What the pseudo-gradient is: the example-weighted mean of the sites' updates (FedAvg), or
# their uniform mean; their sum (the uniform mean times the number of updates); or the sum
# for the classification head and the uniform mean for the rest ("sum-head").
AGGREGATES = ("mean", "uniform-mean", "sum", "sum-head")
# The pseudo-gradient is the average itself: weighted by examples (FedAvg) or uniformly,
# which the round's weighting decides (server/settings.py `uniform_weight`).
MEANS = ("mean", "uniform-mean")
# PEFT stores fully trained modules (the classification head) under this name part.
HEAD_MARK = "modules_to_save"
BETA2 = 0.99  # FedAdam's second-moment decay (Reddi et al. 2021)
TAU = 1e-3  # FedAdam's adaptivity floor (Reddi et al. 2021)


@dataclass(frozen=True)
class ServerOptimizer:
    """One server step per round on the pseudo-gradient.

    Attributes:
        kind: ``sgd`` (FedAvg / FedAvgM) or ``adam`` (FedAdam).
        learning_rate: Server step size (eta_g); ``sgd`` with 1.0 and no momentum is FedAvg.
        momentum: Heavy-ball coefficient for ``sgd``, first-moment decay (beta1) for
            ``adam``; in [0, 1).
        aggregate: What the pseudo-gradient is (`AGGREGATES`).
        lora_scale: Multiplies ``learning_rate`` for every tensor but the
            classification head (the LoRA tensors); 1.0 steps them like the head.
    """

    kind: str = "sgd"
    learning_rate: float = 1.0
    momentum: float = 0.0
    aggregate: str = "mean"
    lora_scale: float = 1.0

    def __post_init__(self) -> None:
        # Messages name the run-config keys these come from (server.*).
        if self.kind not in KINDS:
            raise ConfigError(f"server.optimizer={self.kind!r} must be one of {', '.join(KINDS)}")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(
                f"server.aggregate={self.aggregate!r} must be one of {', '.join(AGGREGATES)}"
            )
        if not 0 < self.learning_rate < math.inf:  # inf times a zero step is NaN
            raise ConfigError(f"server.learning-rate={self.learning_rate!r} must be finite and > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"server.momentum={self.momentum!r} must be in [0, 1)")
        if not 0 < self.lora_scale < math.inf:  # inf times a zero step is NaN
            raise ConfigError(f"server.lora-scale={self.lora_scale!r} must be finite and > 0")

    @property
    def is_identity(self) -> bool:
        return (
            self.kind == "sgd"
            and self.learning_rate == 1.0
            and self.momentum == 0.0
            and self.aggregate in MEANS
            and self.lora_scale == 1.0
        )

    def rate(self, name: str) -> float:
        """The server learning rate of tensor `name`: ``lora_scale`` times more off the head."""
        return self.learning_rate * (1.0 if HEAD_MARK in name else self.lora_scale)

    @property
    def needs_spread(self) -> bool:
        """True if a step needs the single updates' norms, not only their sum."""
        return self.kind == "fedexp"

    def step(
        self,
        current: Mapping[str, np.ndarray],
        average: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray],
        *,
        spread: float | None = None,
        num_updates: int = 1,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Return (new global tensors, new optimiser state).

        ``state`` is empty before the first step and holds ``m::NAME`` (and, for adam,
        ``v::NAME``) float32 tensors afterwards; plain FedAvg keeps it empty. ``spread``
        (``Σ w_i ‖Δ_i‖²``, strategies/fedexp.py) is required by ``fedexp``. With
        ``aggregate="sum"``, ``average`` must be the uniform mean of ``num_updates``
        updates; the pseudo-gradient is then their sum.

        Raises:
            ValueError: If ``fedexp`` gets no spread.
        """
        if self.is_identity:
            return dict(average), {}
        if self.aggregate not in MEANS:
            average = _summed(current, average, num_updates, only_head=self.aggregate == "sum-head")
        if self.kind == "fedexp":
            return self._fedexp_step(current, average, state, spread)
        new_tensors: dict[str, np.ndarray] = {}
        new_state: dict[str, np.ndarray] = {}
        beta1 = self.momentum
        for name, avg in average.items():
            base = current[name].astype(np.float64)
            delta = avg.astype(np.float64) - base
            m_prev = state.get(f"m::{name}")
            if self.kind == "sgd":
                m = delta if m_prev is None else beta1 * m_prev + delta
                step = m
            else:
                m_prev = np.zeros_like(delta) if m_prev is None else m_prev
                v_prev = state.get(f"v::{name}")
                v_prev = np.zeros_like(delta) if v_prev is None else v_prev
                m = beta1 * m_prev + (1 - beta1) * delta
                v = BETA2 * v_prev + (1 - BETA2) * delta**2
                new_state[f"v::{name}"] = v.astype(np.float32)
                step = m / (np.sqrt(v) + TAU)
            if self.kind == "adam" or beta1 > 0:
                new_state[f"m::{name}"] = m.astype(np.float32)
            new_tensors[name] = (base + self.rate(name) * step).astype(current[name].dtype)
        return new_tensors, new_state

    def _fedexp_step(
        self,
        current: Mapping[str, np.ndarray],
        average: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray],
        spread: float | None,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """FedExP: ``global + learning_rate · η_t · m`` with heavy-ball ``m`` on ``η_t·Δ``."""
        if spread is None:
            raise ValueError("server.optimizer='fedexp' needs the single updates' norms")
        delta = {k: average[k].astype(np.float64) - current[k].astype(np.float64) for k in average}
        mean_sq = float(sum(np.sum(d * d) for d in delta.values()))
        eta = extrapolation(spread=spread, mean_sq_norm=mean_sq)
        new_tensors: dict[str, np.ndarray] = {}
        new_state: dict[str, np.ndarray] = {"eta": np.asarray([eta], np.float32)}
        for name, d in delta.items():
            m_prev = state.get(f"m::{name}")
            m = eta * d if m_prev is None else self.momentum * m_prev + eta * d
            if self.momentum > 0:
                new_state[f"m::{name}"] = m.astype(np.float32)
            base = current[name].astype(np.float64)
            new_tensors[name] = (base + self.rate(name) * m).astype(current[name].dtype)
        return new_tensors, new_state


def _summed(
    current: Mapping[str, np.ndarray],
    mean: Mapping[str, np.ndarray],
    num_updates: int,
    *,
    only_head: bool,
) -> dict[str, np.ndarray]:
    """``current + n · (mean - current)``: the point the sum of ``n`` updates reaches.

    With `only_head`, only the classification head's tensors (`HEAD_MARK`) are summed and
    the others keep the mean. Kept in float64: the optimiser steps from it in float64 and
    casts once at the end.
    """
    if num_updates < 1:
        raise ValueError(f"num_updates={num_updates!r} must be >= 1")
    out: dict[str, np.ndarray] = {}
    for k in mean:
        scale = num_updates if (HEAD_MARK in k or not only_head) else 1
        base = current[k].astype(np.float64)
        out[k] = base + scale * (mean[k].astype(np.float64) - base)
    return out
