"""The ClientApp of a training site: train and evaluate the global adapter on local data.

Only the trainable adapter tensors, the example count and scalar metrics leave the site.
The base model and the data are loaded once per process and reused across rounds.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
from dataclasses import replace

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.site.settings import SiteSettings
from clients.task.data import Example, load_examples
from clients.task.errors import ModelError
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
from strategies.records import from_record, to_record

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
    """(train, held-out) examples; the split is fixed per site id."""
    examples = load_examples(site.data_path, task=task, labels=labels or None)
    order = list(range(len(examples)))
    random.Random(site.site_id).shuffle(order)
    n_eval = int(len(examples) * site.eval_fraction)
    if n_eval == 0 or n_eval == len(examples):
        return examples, examples
    held = [examples[i] for i in order[:n_eval]]
    return [examples[i] for i in order[n_eval:]], held


def _prepare(message: Message, context: Context) -> tuple[SiteSettings, TrainPlan, LoadedModel]:
    site = SiteSettings.from_node_config(context.node_config)
    plan = TrainPlan.from_config(dict(message.content.config_records["config"]))
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
    load_trainable_state(loaded.model, from_record(message.content.array_records["arrays"]))
    return site, plan, loaded


@app.train()
def train(message: Message, context: Context) -> Message:
    site, plan, loaded = _prepare(message, context)
    train_examples, _ = _data(site, plan.spec.task, plan.spec.labels)
    # A generator per (run seed, round, site): reproducible, different across sites.
    seed_src = f"{plan.spec.seed}:{plan.server_round}:{site.site_id}".encode()
    generator = torch.Generator().manual_seed(
        int.from_bytes(hashlib.sha256(seed_src).digest()[:8], "big") >> 1
    )
    result = train_local(loaded, train_examples, plan=plan, generator=generator)
    log.info(
        "site %s round %d: %d steps, loss %.4f, %.1fs",
        site.site_id,
        plan.server_round,
        result.steps,
        result.loss,
        result.seconds,
    )
    content = RecordDict(
        {
            "arrays": to_record(trainable_state(loaded.model)),
            "metrics": MetricRecord(
                {
                    "num-examples": result.num_examples,
                    "train-loss": result.loss,
                    "train-seconds": result.seconds,
                    "steps": result.steps,
                }
            ),
            "site": ConfigRecord({"site-id": site.site_id}),
        }
    )
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate_global(message: Message, context: Context) -> Message:
    site, plan, loaded = _prepare(message, context)
    _, held_out = _data(site, plan.spec.task, plan.spec.labels)
    result = evaluate(loaded, held_out, batch_size=32, max_length=plan.max_length)
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {
                    "num-examples": result.num_examples,
                    "loss": result.loss,
                    "accuracy": result.accuracy,
                }
            ),
            "site": ConfigRecord({"site-id": site.site_id}),
        }
    )
    return Message(content, reply_to=message)
