"""Sample-level DP-SGD over the trainable (LoRA and head) tensors, with Opacus.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy"): per-example
gradients of the trainable tensors are clipped to ``max_grad_norm``, summed, noised with
``N(0, (noise_multiplier · max_grad_norm)²)`` and divided by the batch size. Opacus'
`GradSampleModule` computes the per-example gradients of the trainable modules only
(frozen base weights get none) and its `DPOptimizer` clips, noises and steps the wrapped
optimizer, so the rest of the training loop is unchanged.

Each local step is one step of the sampled Gaussian mechanism with sampling rate
``batch_size / n``; `site_epsilon` accounts a run's steps with Opacus' RDP accountant.
Batches are shuffled fixed-size slices rather than Poisson samples, the usual
approximation of the analysis.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer

from clients.task.errors import ConfigError


@dataclass(frozen=True)
class SampleDP:
    """DP-SGD parameters (the ``site-dp.*`` run-config keys)."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0:
            raise ConfigError(f"site-dp.noise-multiplier={self.noise_multiplier!r} must be >= 0")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"site-dp.max-grad-norm={self.max_grad_norm!r} must be > 0")
        if not 0 < self.delta < 1:
            raise ConfigError(f"site-dp.delta={self.delta!r} must be in (0, 1)")


def site_epsilon(steps: Sequence[tuple[float, float, int]], *, delta: float) -> float:
    """ε of the given (noise multiplier, sampling rate, steps) groups, by RDP."""
    merged: dict[tuple[float, float], int] = {}
    for z, q, n in steps:  # RDP adds up: one term per distinct (z, q) is enough
        merged[(z, q)] = merged.get((z, q), 0) + n
    accountant = RDPAccountant()
    accountant.history = [(z, q, n) for (z, q), n in merged.items() if n > 0]
    if not accountant.history:
        return 0.0
    return float(accountant.get_epsilon(delta=delta))


@contextlib.contextmanager
def private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    dp: SampleDP,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.nn.Module, torch.optim.Optimizer]]:
    """Yield (per-example-gradient model, DP optimizer); remove Opacus' hooks after.

    The model is the one cached across rounds, so the hooks must not outlive training.
    """
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=batch_size,
        loss_reduction="mean",
        generator=generator,
    )
    try:
        yield wrapped, dp_optimizer
    finally:
        wrapped.cleanup()  # removes the hooks and the grad_sample attributes
