"""Sample-level DP-SGD over the trainable (LoRA and head) tensors, with Opacus.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy"): per-example
gradients of the trainable tensors are clipped to ``max_grad_norm``, summed, noised with
``N(0, (noise_multiplier · max_grad_norm)²)`` and divided by the batch size. Opacus'
`GradSampleModule` computes the per-example gradients of the trainable modules only
(frozen base weights get none) and `SecureNoiseDPOptimizer`, Opacus' `DPOptimizer` with
its own clipping (held to the bound after rounding, optionally group-wise) and OS noise,
clips, noises and steps the wrapped optimizer, so the rest of the training loop is
unchanged.

Each local step is one step of the sampled Gaussian mechanism with sampling rate
``batch_size / n``; `site_epsilon` accounts a run's steps with Opacus' RDP accountant, and
`solve_noise_multiplier` finds the smallest noise multiplier whose ε over a planned number
of steps stays at or below a target (Opacus' `get_noise_multiplier`, which bisects from
above, so the result never overshoots).
Batches are shuffled fixed-size slices rather than Poisson samples, the usual
approximation of the analysis.

Group-wise clipping (``SampleDP.adapter_clip_share`` s > 0; He et al. 2023, "Exploring the
Limits of Differentially Private Deep Learning with Group-wise Clipping", ICLR; per-layer
clipping in McMahan et al. 2018): each example's adapter gradient is clipped to ``s · C``
and its head gradient to ``√(1 − s²) · C`` separately, so the whole per-example gradient
still has norm at most ``C`` and the noise, sensitivity and accounting are those of flat
clipping. With one flat bound the head's larger gradients take most of it and the
adapter's share of the signal shrinks with them (README "Quality under DP").

The noise is drawn from `clients.task.secure_random.SecureRandom` (the OS CSPRNG), never
from a generator the caller passes: the server knows every run seed, round and site id,
and noise it could regenerate protects nothing (that module says why Opacus'
``secure_mode`` cannot be used with torch 2.13).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.optimizers.utils import params as optimizer_params

from clients.task.errors import ConfigError
from clients.task.secure_random import SecureRandom

log = logging.getLogger(__name__)

# The largest target ε a run may ask for. ε bounds an odds ratio e^ε that leaves float
# range near ε = 709, so a target in the millions promises nothing (it is a typo); and
# from about 1e15 Opacus' solver, which bisects to an absolute 0.01 of the target, never
# returns.
MAX_TARGET_EPSILON = 1e6


@dataclass(frozen=True)
class SampleDP:
    """DP-SGD parameters (the ``site-dp.*`` run-config keys)."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5
    # Group-wise clipping: the adapter tensors' bound as a share of max_grad_norm (the
    # head's is √(1 − s²) of it); 0 is flat clipping, one bound over every tensor.
    adapter_clip_share: float = 0.0

    def __post_init__(self) -> None:
        # NaN compares false both ways: read as "z > 0 is off", it would train without noise.
        if not 0 <= self.noise_multiplier < math.inf:
            raise ConfigError(
                f"site-dp.noise-multiplier={self.noise_multiplier!r} must be >= 0 and finite"
            )
        if not 0 < self.max_grad_norm < math.inf:
            raise ConfigError(
                f"site-dp.max-grad-norm={self.max_grad_norm!r} must be > 0 and finite"
            )
        if not 0 < self.delta < 1:
            raise ConfigError(f"site-dp.delta={self.delta!r} must be in (0, 1)")
        if not 0 <= self.adapter_clip_share < 1:  # NaN too
            raise ConfigError(
                f"site-dp.adapter-clip-share={self.adapter_clip_share!r} must be in [0, 1)"
            )


def site_epsilon(steps: Sequence[tuple[float, float, int]], *, delta: float) -> float:
    """ε of the given (noise multiplier, sampling rate, steps) groups, by RDP.

    Groups with the same (z, q) are merged (RDP adds up), and the result is cached on the
    merged groups and δ: a site's ledger is reloaded and re-accounted on every round and by
    `fedlora site budget`, and one RDP evaluation costs tenths of a second.

    Raises:
        ConfigError: If a noise multiplier or sampling rate is not finite, a step
            count is NaN or negative, or the accountant cannot compute it (a noise
            multiplier so small or large, or so many steps, that its arithmetic fails):
            such steps are refused like any other invalid ε, not left to crash the caller.
    """
    merged: dict[tuple[float, float], int] = {}
    for z, q, n in steps:  # RDP adds up: one term per distinct (z, q) is enough
        # Opacus loops for ever on a NaN z or q; a NaN or negative count would drop or
        # cancel the group's other steps below (a sum that is not > 0).
        if not (_finite(z) and _finite(q) and n >= 0):
            raise ConfigError(
                f"DP-SGD steps with noise multiplier {z!r}, sampling rate {q!r} and count "
                f"{n!r} have no ε"
            )
        merged[(z, q)] = merged.get((z, q), 0) + n
    history = tuple((z, q, n) for (z, q), n in merged.items() if n > 0)
    return _rdp_epsilon(history, delta) if history else 0.0


def _finite(value: float) -> bool:
    """Whether ``value`` is finite; an int past float range (``10**400``) is not."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@functools.lru_cache(maxsize=1024)
def _rdp_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    try:
        return float(accountant.get_epsilon(delta=delta))
    except (ArithmeticError, ValueError) as exc:  # ZeroDivision, Overflow, a math domain
        groups = ", ".join(f"(z={z!r}, q={q!r}, steps={n})" for z, q, n in history)
        raise ConfigError(
            f"ε of DP-SGD steps {groups} at δ={delta!r} cannot be computed "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def check_target_epsilon(setting: str, target_epsilon: float) -> None:
    """Refuse a target ε that is negative, NaN, infinite or above `MAX_TARGET_EPSILON`
    (0 is allowed: the setting is off).

    Raises:
        ConfigError: Naming ``setting`` and the value.
    """
    if not 0 <= target_epsilon < math.inf:  # NaN too
        raise ConfigError(f"{setting}={target_epsilon!r} must be finite and >= 0")
    if target_epsilon > MAX_TARGET_EPSILON:
        raise ConfigError(
            f"{setting}={target_epsilon!r} must be at most {MAX_TARGET_EPSILON:g}: a larger ε "
            "promises no privacy"
        )


@functools.lru_cache(maxsize=256)
def solve_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    setting: str = "site-dp.target-epsilon",
    delta_setting: str = "site-dp.delta",
    step_name: str = "DP-SGD step",
) -> float:
    """The smallest noise multiplier (to Opacus' tolerance) whose RDP ε after ``steps``
    steps at ``sampling_rate`` is at most ``target_epsilon`` at ``delta``.

    The one solver of both guarantees. A site calls it with its own sampling rate
    (``batch_size / n``), its own δ and the DP-SGD steps of the whole planned run; the
    server calls it with the same inputs to check the noise multiplier a site states
    (server/sites.py), and for client-level DP with the planned client sampling rate and
    rounds as steps (`server.privacy`). Pure and cached: the same inputs give the same
    ``z`` at both ends.

    Args:
        setting: The key named when the target is unreachable.
        delta_setting: The key of δ, named in that message.
        step_name: What one step is, in that message ("round" for client-level DP).

    Raises:
        ConfigError: Naming ``setting`` if the target is not a finite ε > 0 (an infinite
            one would pass any noise multiplier and promise nothing), is above
            `MAX_TARGET_EPSILON`, or no noise multiplier reaches it.
    """
    if not (0 < target_epsilon < math.inf):  # NaN too
        raise ConfigError(f"{setting}={target_epsilon!r} must be a finite ε > 0")
    check_target_epsilon(setting, target_epsilon)
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sampling_rate,
                steps=steps,
                accountant="rdp",
            )
        )
    except ValueError as exc:
        raise ConfigError(
            f"{setting}={target_epsilon!r} is unreachable with {delta_setting}={delta!r}, "
            f"sampling rate {sampling_rate:.3g} and {steps} {step_name}(s): {exc}"
        ) from exc


class SecureNoiseDPOptimizer(DPOptimizer):
    """Opacus' `DPOptimizer` whose Gaussian noise comes from `SecureRandom`, with
    clipping that holds each example within its bound after rounding, optionally
    group-wise.

    Opacus' per-example clipping (its factor ``bound / (norm + 1e-6)``, at most 1), with
    these changes:

    - The per-example norms, group totals and factors are float64, and the factor aims
      1e-6 below the bound: a float32 norm over a large tensor (a 768 × 768 head) reads
      low by up to about 1e-5, and the clipped gradient then lands past the bound.
    - Each clipped gradient is float32 or wider whatever the tensor's dtype (a bfloat16
      head's would round past the bound by a few tenths of a percent), accumulated in
      ``summed_grad`` at that width, and rounded to the tensor's dtype only after the
      noise is added (post-processing). The batch sum's own float32 rounding (about 1e-6
      of it) is not covered, as in Opacus.
    - With ``group_bounds`` (one bound per group, their L2 norm at most C =
      ``max_grad_norm``) and ``group_of`` (the group of each of ``self.params``, every
      group used), each example's gradient is clipped per group (He et al. 2023). Flat
      clipping is one group at C.

    The noise is drawn in float64 with std ``noise_multiplier · C`` on every coordinate;
    scaling and stepping stay Opacus'.

    Raises:
        ValueError: If the groups do not match the tensors, or the bounds are not finite
            or their L2 norm exceeds C.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        group_of: Sequence[int] = (),
        group_bounds: Sequence[float] = (),
        **kwargs: object,
    ) -> None:
        super().__init__(optimizer, **kwargs)  # type: ignore[arg-type]
        self.noise_source = SecureRandom()  # a fresh key for every DP-SGD run
        if not group_bounds:  # flat: one group at the whole bound
            group_of, group_bounds = (0,) * len(self.params), (self.max_grad_norm,)
        self.group_of, self.group_bounds = tuple(group_of), tuple(group_bounds)
        if len(self.group_of) != len(self.params) or (
            self.params and set(self.group_of) != set(range(len(self.group_bounds)))
        ):
            raise ValueError(
                f"clip groups {list(self.group_of)} of the {len(self.params)} tensors must "
                f"use each of the {len(self.group_bounds)} bounds' groups and no other"
            )
        if not all(0 <= b < math.inf for b in self.group_bounds) or math.hypot(
            *self.group_bounds
        ) > self.max_grad_norm * (1 + 1e-9):
            raise ValueError(
                f"clip bounds {list(self.group_bounds)} must be finite, >= 0 and of L2 norm "
                f"at most max_grad_norm={self.max_grad_norm}"
            )

    def clip_and_accumulate(self) -> None:
        """Clip each example's gradient per group to the group's bound (see the class) and
        add the clipped gradients to each tensor's ``summed_grad``."""
        if not self.params:
            return
        # Each tensor's per-example gradients, read once (Opacus concatenates accumulated
        # batches here); an empty batch gives zero sums.
        samples = [self._get_flat_grad_sample(p) for p in self.params]
        device = samples[0].device
        norms = [_norms(sample).to(device) for sample in samples]
        factors = []
        for group, bound in enumerate(self.group_bounds):
            mine = [n for n, g in zip(norms, self.group_of, strict=True) if g == group]
            total = torch.stack(mine, dim=1).norm(2, dim=1)
            factors.append((bound * (1 - 1e-6) / (total + 1e-6)).clamp(max=1.0))
        for p, sample, group in zip(self.params, samples, self.group_of, strict=True):
            _check_processed_flag(p.grad_sample)
            sample = sample.to(_wide(sample.dtype))  # widened one tensor at a time
            factor = factors[group].to(device=sample.device, dtype=sample.dtype)
            grad = torch.einsum("i,i...", factor, sample)
            if p.summed_grad is None:
                p.summed_grad = grad
            else:
                p.summed_grad += grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            grad = p.summed_grad
            if std > 0:
                noise = self.noise_source.normal(0.0, std, size=tuple(grad.shape))
                grad = grad + torch.from_numpy(noise).to(device=grad.device, dtype=grad.dtype)
            # Rounded after the noise: post-processing. A new tensor, as Opacus' is, so that
            # scaling p.grad never scales summed_grad.
            p.grad = grad.to(p.dtype, copy=True).view_as(p)
            _mark_as_processed(p.summed_grad)


def _norms(samples: torch.Tensor) -> torch.Tensor:
    """Each example's L2 norm of ``samples`` (examples first), in float64, 64 examples at a
    time: the float64 copy stays a slice of the per-example gradients."""
    flat = samples.flatten(start_dim=1)
    return torch.cat(
        [torch.linalg.vector_norm(c, dim=-1, dtype=torch.float64) for c in flat.split(64)]
    )


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32, or the dtype where it is wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


@contextlib.contextmanager
def private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    dp: SampleDP,
    batch_size: int,
    is_head: Callable[[str], bool],
) -> Iterator[tuple[torch.nn.Module, torch.optim.Optimizer]]:
    """Yield (per-example-gradient model, DP optimizer); remove Opacus' hooks after.

    The model is the one cached across rounds, so the hooks must not outlive training.
    The optimizer's noise is secret by construction (`SecureNoiseDPOptimizer`). With
    ``dp.adapter_clip_share`` s > 0, the head group is the trained tensors ``is_head``
    matches by name and the adapter group every other trained tensor (a head tensor it
    misses would share the adapter's bound: worse training, the same privacy); with both
    groups present clipping is group-wise, else flat (warned of: the round plan refuses
    the settings where a site has no head or trains it alone).
    """
    names = {id(p): name for name, p in model.named_parameters()}
    # The tensors Opacus clips, in its order (optimizer_params: those that need a grad)
    group_of = [int(is_head(names.get(id(p), ""))) for p in optimizer_params(optimizer)]
    share = dp.adapter_clip_share
    grouped = share > 0 and len(set(group_of)) == 2
    if share > 0 and not grouped:
        log.warning(
            "site-dp.adapter-clip-share=%g: the trained tensors are not both head and "
            "adapter tensors, so clipping is flat",
            share,
        )
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:  # the hooks come off whatever fails from here on
        dp_optimizer = SecureNoiseDPOptimizer(
            optimizer,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=batch_size,
            loss_reduction="mean",
            group_of=group_of if grouped else (),
            group_bounds=(
                (share * dp.max_grad_norm, math.sqrt(1 - share * share) * dp.max_grad_norm)
                if grouped
                else ()
            ),
        )
        yield wrapped, dp_optimizer
    finally:
        wrapped.cleanup()  # removes the hooks and the grad_sample attributes
