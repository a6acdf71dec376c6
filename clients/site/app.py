"""The ClientApp of a training site: train and evaluate the global adapter on local data.

Only the trainable adapter tensors, the example count and scalar metrics leave the site.
The base model and the data are loaded once per process and reused across rounds.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import random
from dataclasses import replace

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.site.ledger import SiteLedger
from clients.site.mods import TRAIN_MODS
from clients.site.settings import SiteSettings
from clients.task.data import Example, load_examples
from clients.task.errors import BudgetRefused, ModelError
from clients.task.model import (
    LoadedModel,
    ModelSpec,
    base_digest,
    build_model,
    load_trainable_state,
    quiet_transformers,
    trainable_state,
)
from clients.task.plan import TrainPlan
from clients.task.train import evaluate, train_local
from strategies.protocol import (
    SitePrivacy,
    evaluate_reply,
    no_evaluation_reply,
    plan_config,
    read_request,
    refusal_reply,
    train_metrics,
    train_reply,
)

log = logging.getLogger(__name__)
app = ClientApp()


@functools.lru_cache(maxsize=1)
def _model(spec: ModelSpec, device: str | None) -> LoadedModel:
    quiet_transformers()
    return build_model(spec, device=device)


@functools.lru_cache(maxsize=4)
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
    message: Message, context: Context
) -> tuple[SiteSettings, TrainPlan, LoadedModel, dict]:
    site = SiteSettings.from_node_config(context.node_config)
    reference, config = read_request(message)
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
    loaded = _model(spec, site.torch_device)
    load_trainable_state(loaded.model, reference)
    return site, plan, loaded, reference


def _charge_budget(
    site: SiteSettings, plan: TrainPlan, *, run: str, num_train: int
) -> SitePrivacy | None:
    """Refuse a round past the site's budget, else charge it to the ledger *before* training.

    Returns:
        The sample-level privacy to report (None without DP-SGD).

    Raises:
        BudgetRefused: With the reason, if the round would pass ``max-epsilon`` or the run
            has no DP-SGD while the site has a budget.
    """
    dp = plan.sample_dp()
    if dp is None:
        if site.max_epsilon is not None:
            raise BudgetRefused(
                f"site {site.site_id} has max-epsilon={site.max_epsilon} and the run does "
                "not train with sample-level DP (site-dp.noise-multiplier=0)"
            )
        return None
    steps = plan.local_steps or plan.local_epochs * math.ceil(num_train / plan.batch_size)
    rate = min(1.0, plan.batch_size / num_train)
    if site.state_dir is None:
        log.warning("site %s: no state-dir, so DP-SGD rounds are not recorded", site.site_id)
        from clients.task.dpsgd import site_epsilon

        run_eps = site_epsilon([(dp.noise_multiplier, rate, steps)], delta=dp.delta)
    else:
        ledger = SiteLedger.load(site.state_dir)
        run_eps, total = ledger.epsilon_after(
            run,
            noise_multiplier=dp.noise_multiplier,
            sampling_rate=rate,
            steps=steps,
            delta=dp.delta,
        )
        if site.max_epsilon is not None and total > site.max_epsilon:
            raise BudgetRefused(
                f"site {site.site_id} refuses round {plan.server_round}: its total ε would "
                f"reach {total:.4g} > max-epsilon={site.max_epsilon} "
                f"(spent {ledger.total_epsilon:.4g})"
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
    return SitePrivacy(
        epsilon=run_eps,
        delta=dp.delta,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
    )


@app.train(mods=list(TRAIN_MODS))
def train(message: Message, context: Context) -> Message:
    site, plan, loaded, reference = _prepare(message, context)
    train_examples, _ = _data(site, plan.spec.task, plan.spec.labels)
    try:
        privacy = _charge_budget(site, plan, run=str(context.run_id), num_train=len(train_examples))
    except BudgetRefused as exc:
        log.warning("%s", exc)
        return refusal_reply(message, site_id=site.site_id, reason=exc.detail)
    # A generator per (run seed, round, site): reproducible, different across sites.
    seed_src = f"{plan.spec.seed}:{plan.server_round}:{site.site_id}".encode()
    generator = torch.Generator().manual_seed(
        int.from_bytes(hashlib.sha256(seed_src).digest()[:8], "big") >> 1
    )
    result = train_local(
        loaded, train_examples, plan=plan, generator=generator, dp=plan.sample_dp()
    )
    log.info(
        "site %s round %d: %d steps, loss %.4f, %.1fs",
        site.site_id,
        plan.server_round,
        result.steps,
        result.loss,
        result.seconds,
    )
    return train_reply(
        message,
        local=trainable_state(loaded.model),
        reference=reference,
        metrics=train_metrics(
            num_examples=result.num_examples,
            loss=result.loss,
            seconds=result.seconds,
            steps=result.steps,
            privacy=privacy,
        ),
        site_id=site.site_id,
        weight=1 if plan.uniform_weight else result.num_examples,
    )


@app.evaluate()
def evaluate_global(message: Message, context: Context) -> Message:
    site, plan, loaded, _ = _prepare(message, context)
    train_examples, held_out = _data(site, plan.spec.task, plan.spec.labels)
    if not held_out:
        # No number at all beats a number measured on training rows (it would pass gates).
        reason = (
            f"site {site.site_id} has no held-out rows ({len(train_examples)} rows, "
            f"eval-fraction {site.eval_fraction}): no evaluation"
        )
        log.info("%s", reason)
        return no_evaluation_reply(message, site_id=site.site_id, reason=reason)
    result = evaluate(loaded, held_out, batch_size=32, max_length=plan.max_length)
    return evaluate_reply(
        message,
        site_id=site.site_id,
        num_examples=result.num_examples,
        loss=result.loss,
        accuracy=result.accuracy,
    )
