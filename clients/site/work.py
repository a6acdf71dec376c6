"""A site's work on one request: train or evaluate the global adapter on local data, or sum
what its classification head reads (before round 1, for the closed-form head).

The same functions run inside the ClientApp process (when the site has no warm worker)
and inside the site's warm worker (clients/site/worker.py), which keeps the base model,
the tokenizer and the data loaded between rounds: the model and the data are cached per
process, keyed by what determines them. Only tensors and numbers come out.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from clients.site.ledger import SiteLedger, check_epsilon
from clients.site.settings import SiteSettings
from clients.task.data import Example, load_examples
from clients.task.dpsgd import SampleDP, site_epsilon
from clients.task.errors import BudgetRefused, ConfigError, ModelError
from clients.task.model import (
    LoadedModel,
    ModelSpec,
    base_digest,
    build_model,
    check_lora_rank,
    check_max_length,
    load_trainable_state,
    quiet_transformers,
    trainable_state,
)
from clients.task.plan import TrainPlan
from clients.task.secure_random import os_seed
from clients.task.train import evaluate, head_inputs, train_local, without_truncated
from strategies.lda_head import HeadStatistics
from strategies.protocol import HEAD_STATISTICS_FIELDS, SitePrivacy, plan_config, train_metrics

log = logging.getLogger(__name__)
Tensors = dict[str, np.ndarray]
# A run's ε summed by RDP over the planned rounds equals the solved ε up to float
# rounding of the sum; a relative hair over the target is that rounding, not a new step.
TARGET_SLACK = 1e-9


@dataclass(frozen=True)
class Trained:
    """A training request's outcome: the local tensors, the reply's metrics and weight."""

    local: Tensors
    metrics: dict[str, int | float]
    weight: int


@dataclass(frozen=True)
class Refused:
    """The site refused the round to stay within its privacy budget."""

    reason: str


@dataclass(frozen=True)
class Evaluated:
    num_examples: int
    loss: float
    accuracy: float


@dataclass(frozen=True)
class NoEvaluation:
    """The site has no held-out rows: no number beats one measured on training rows."""

    reason: str


@functools.lru_cache(maxsize=1)
def _model(spec: ModelSpec, device: str | None) -> LoadedModel:
    quiet_transformers()
    return build_model(spec, device=device)


# A worker may serve several sites of one machine (a rehearsal's pool): keep each one's data.
@functools.lru_cache(maxsize=64)
def _data(
    site: SiteSettings, task: str, labels: tuple[str, ...]
) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples; the split is fixed per site id.

    A site too small to hold a row out at its ``eval-fraction`` (9 rows at 10%) trains on
    everything and has no held-out rows: it reports no evaluation rather than an accuracy
    on its own training rows.
    """
    examples = load_examples(site.data_path, task=task, labels=labels or None)
    order = list(range(len(examples)))
    random.Random(site.site_id).shuffle(order)
    n_eval = int(len(examples) * site.eval_fraction)
    held = [examples[i] for i in order[:n_eval]]
    return [examples[i] for i in order[n_eval:]], held


def _prepare(
    site: SiteSettings, reference: Mapping[str, np.ndarray], config: Mapping[str, Any]
) -> tuple[TrainPlan, LoadedModel]:
    plan = TrainPlan.from_config(plan_config(config))
    spec = plan.spec
    if site.base_model:
        spec = replace(spec, base=site.base_model)
    digest = base_digest(spec.base)
    if digest != plan.base_digest:
        raise ModelError(
            f"site {site.site_id}: base model {spec.base!r} has digest {digest}, "
            f"the run expects {plan.base_digest}"
        )
    try:  # else a shape error deep in the forward pass, or matrices of gigabytes
        check_max_length(plan.max_length, base=spec.base)
        check_lora_rank(spec.lora_r, base=spec.base)
    except ConfigError as exc:
        raise ConfigError(f"site {site.site_id} refuses the round plan: {exc}") from None
    loaded = _model(spec, site.torch_device)
    load_trainable_state(loaded.model, dict(reference))
    return plan, loaded


def _charge_budget(
    site: SiteSettings, plan: TrainPlan, *, run: str, num_train: int
) -> tuple[SampleDP | None, SitePrivacy | None]:
    """Refuse a round outside the site's privacy terms, else charge it *before* training.

    The terms are the site admin's (clients/site/settings.py), never the plan's: the
    plan's δ must be the site's, δ must be below ``1/num_train``, and with a budget the
    ledger must exist and the round's total ε stay within ``max-epsilon``. Check and
    charge run under the ledger's lock, so concurrent ClientApp processes of one site
    cannot both spend the same remaining budget.

    With ``site-dp.target-epsilon`` the site solves its noise multiplier for the planned
    run (`TrainPlan.sample_dp`), refuses a round past the planned ones, and, with a
    ledger, refuses a round that would take the run's ε past the target: a plan that
    changes its rounds or batch size mid-run cannot make the site overshoot.

    Returns:
        The DP-SGD settings to train with and the sample-level privacy the site states in
        its reply (both None without DP-SGD).

    Raises:
        BudgetRefused: With the reason.
    """
    if not plan.sample_level:
        if site.max_epsilon is not None:
            raise BudgetRefused(
                f"site {site.site_id} has max-epsilon={site.max_epsilon} and the run does "
                "not train with sample-level DP (site-dp.noise-multiplier and "
                "site-dp.target-epsilon are 0)"
            )
        return None, None
    if plan.site_dp_delta != site.delta:
        raise BudgetRefused(
            f"site {site.site_id} states its ε at δ={site.delta} (node config delta); "
            f"the plan asks site-dp.delta={plan.site_dp_delta}"
        )
    if not site.delta < 1 / num_train:
        raise BudgetRefused(
            f"site {site.site_id}: δ={site.delta} is not below 1/n for its {num_train} "
            "training rows (such a δ allows releasing a row outright)"
        )
    target = plan.site_dp_target_epsilon
    if target > 0 and plan.server_round > plan.planned_rounds:
        raise BudgetRefused(
            f"site {site.site_id} refuses round {plan.server_round}: its noise multiplier "
            f"is solved for site-dp.target-epsilon={target} over {plan.planned_rounds} round(s)"
        )
    steps = plan.steps_for(num_train)
    rate = plan.sampling_rate(num_train)
    try:
        dp = plan.sample_dp(num_train)
        assert dp is not None  # plan.sample_level
        if site.state_dir is None:
            log.warning("site %s: no state-dir, so DP-SGD rounds are not recorded", site.site_id)
            run_eps = check_epsilon(
                site_epsilon([(dp.noise_multiplier, rate, steps)], delta=dp.delta),
                what=f"site {site.site_id}",
            )
        else:
            budgeted = site.max_epsilon is not None
            with SiteLedger.locked(site.state_dir, required=budgeted) as ledger:
                run_eps, total = ledger.epsilon_after(
                    run,
                    noise_multiplier=dp.noise_multiplier,
                    sampling_rate=rate,
                    steps=steps,
                    delta=dp.delta,
                )
                if site.max_epsilon is not None and not total <= site.max_epsilon:
                    raise BudgetRefused(
                        f"site {site.site_id} refuses round {plan.server_round}: its total ε "
                        f"would reach {total:.4g} > max-epsilon={site.max_epsilon} "
                        f"(spent {ledger.total_epsilon:.4g})"
                    )
                # RDP sums exactly: as planned, the last round lands on the solved ε.
                if target > 0 and not run_eps <= target * (1 + TARGET_SLACK):
                    raise BudgetRefused(
                        f"site {site.site_id} refuses round {plan.server_round}: this run's "
                        f"ε would reach {run_eps:.4g} > site-dp.target-epsilon={target}"
                    )
                ledger.max_epsilon = site.max_epsilon
                ledger.charge(
                    run,
                    plan.server_round,
                    noise_multiplier=dp.noise_multiplier,
                    sampling_rate=rate,
                    steps=steps,
                    delta=dp.delta,
                )
    except ConfigError as exc:  # missing or unreadable ledger, an invalid or unreachable ε
        why = f"site {site.site_id} refuses round {plan.server_round}: {exc}"
        raise BudgetRefused(why) from exc
    privacy = SitePrivacy(
        epsilon=run_eps,
        delta=dp.delta,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
    )
    return dp, privacy


def _order(plan: TrainPlan, site: SiteSettings) -> torch.Generator:
    """The generator of this round's batch order.

    Without DP-SGD it is seeded by (run seed, round, site): reproducible, different
    across sites. With DP-SGD it is seeded from the OS CSPRNG: the sampling rate in the
    site's ε assumes nobody else knows which rows a step used, and the server knows
    the run seed, the round and the site id.
    """
    if plan.sample_level:
        return torch.Generator().manual_seed(os_seed())
    seed_src = f"{plan.spec.seed}:{plan.server_round}:{site.site_id}".encode()
    return torch.Generator().manual_seed(
        int.from_bytes(hashlib.sha256(seed_src).digest()[:8], "big") >> 1
    )


def train(
    site: SiteSettings,
    reference: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    *,
    run: str,
) -> Trained | Refused:
    """Train the global adapter (``reference``) for one round under the request's plan."""
    plan, loaded = _prepare(site, reference, config)
    train_examples, _ = _data(site, plan.spec.task, plan.spec.labels)
    # Charged for the rows DP-SGD will sample from, as the server accounts them.
    train_examples = without_truncated(loaded, train_examples, max_length=plan.max_length)
    try:
        dp, privacy = _charge_budget(site, plan, run=run, num_train=len(train_examples))
    except BudgetRefused as exc:
        log.warning("%s", exc)
        return Refused(exc.detail)
    result = train_local(loaded, train_examples, plan=plan, generator=_order(plan, site), dp=dp)
    log.info(
        "site %s round %d: %d examples, %d steps, loss %.4f, %.1fs, ε charged %s",
        site.site_id,
        plan.server_round,
        result.num_examples,
        result.steps,
        result.loss,
        result.seconds,
        "none (no DP-SGD)" if privacy is None else f"{privacy.epsilon:.4g} this run",
    )
    return Trained(
        local=trainable_state(loaded.model),
        metrics=train_metrics(
            num_examples=result.num_examples,
            loss=result.loss,
            seconds=result.seconds,
            steps=result.steps,
            privacy=privacy,
        ),
        weight=1 if plan.uniform_weight else result.num_examples,
    )


def evaluate_global(
    site: SiteSettings, reference: Mapping[str, np.ndarray], config: Mapping[str, Any]
) -> Evaluated | NoEvaluation:
    """Evaluate the global adapter on the site's held-out rows."""
    plan, loaded = _prepare(site, reference, config)
    train_examples, held_out = _data(site, plan.spec.task, plan.spec.labels)
    if not held_out:
        reason = (
            f"site {site.site_id} has no held-out rows ({len(train_examples)} rows, "
            f"eval-fraction {site.eval_fraction}): no evaluation"
        )
        log.info("%s", reason)
        return NoEvaluation(reason)
    result = evaluate(loaded, held_out, batch_size=32, max_length=plan.max_length)
    return Evaluated(result.num_examples, result.loss, result.accuracy)


def head_statistics(
    site: SiteSettings, reference: Mapping[str, np.ndarray], config: Mapping[str, Any]
) -> HeadStatistics | Refused:
    """The sums over the site's training rows of what the head reads (strategies/lda_head.py).

    The rows are those the site trains on. The site refuses when its admin said so
    (``head-statistics = false``), when it has a budget (``max-epsilon``: it releases only
    DP-SGD updates) and when the plan trains with DP-SGD: these sums carry no noise.
    """
    plan, loaded = _prepare(site, reference, config)
    why = None
    if not site.head_statistics:
        why = f"site {site.site_id} has head-statistics=false"
    elif site.max_epsilon is not None:
        why = f"site {site.site_id} has max-epsilon={site.max_epsilon}"
    elif plan.sample_level:
        why = "the run trains with sample-level DP"
    if why is not None:
        reason = f"{why}: it shares no head statistics (sums without DP noise)"
        log.warning("%s", reason)
        return Refused(reason)
    train_examples, _ = _data(site, plan.spec.task, plan.spec.labels)
    train_examples = without_truncated(loaded, train_examples, max_length=plan.max_length)
    features, labels = head_inputs(loaded, train_examples, max_length=plan.max_length)
    log.info("site %s: head statistics of %d rows", site.site_id, len(train_examples))
    return HeadStatistics.of(features, labels, num_labels=len(plan.spec.labels))


def run_job(
    kind: str,
    site: SiteSettings,
    reference: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    *,
    run: str,
) -> tuple[dict[str, Any], Tensors]:
    """One request's outcome as (header, tensors), the same in a ClientApp and a worker.

    Raises:
        ValueError: For an unknown ``kind``.
    """
    if kind == "train":
        done = train(site, reference, config, run=run)
        if isinstance(done, Refused):
            return {"refusal": done.reason}, {}
        return {"metrics": done.metrics, "weight": done.weight}, done.local
    if kind == "evaluate":
        result = evaluate_global(site, reference, config)
        if isinstance(result, NoEvaluation):
            return {"no-evaluation": result.reason}, {}
        header = {"num-examples": result.num_examples, "loss": result.loss,
                  "accuracy": result.accuracy}  # fmt: skip
        return header, {}
    if kind == "head-statistics":
        stats = head_statistics(site, reference, config)
        if isinstance(stats, Refused):
            return {"refusal": stats.reason}, {}
        return {}, {name: getattr(stats, name) for name in HEAD_STATISTICS_FIELDS}
    raise ValueError(f"unknown job kind {kind!r}")
