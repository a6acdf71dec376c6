"""The ClientApp of a training site: train and evaluate the global adapter on local data,
and answer the query for the closed-form head's statistics before round 1.

Only the trainable adapter tensors, the example count and scalar metrics leave the site.
The work itself (clients/site/work.py) runs in the site's warm worker when the node
config names one (``worker-socket``, clients/site/worker.py) and in this process
otherwise; this module imports no torch, so a ClientApp that hands its work to a warm
worker starts in about a second.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.site.mods import TRAIN_MODS
from clients.site.settings import SiteSettings
from clients.site.worker import WorkerAbsent, call
from strategies.lda_head import HeadStatistics
from strategies.protocol import (
    HEAD_STATISTICS_FIELDS,
    evaluate_reply,
    head_statistics_reply,
    no_evaluation_reply,
    read_request,
    refusal_reply,
    train_reply,
)

log = logging.getLogger(__name__)
app = ClientApp()


def _job(kind: str, message: Message, context: Context, site: SiteSettings):
    """The request's outcome as (header, tensors): from the worker, or worked here."""
    reference, config = read_request(message)
    if site.worker_socket is not None:
        header = {
            "kind": kind,
            "run": str(context.run_id),
            "node-config": dict(context.node_config),
            "config": config,
        }
        try:
            return call(site.worker_socket, header, reference)
        except WorkerAbsent as exc:
            log.warning("site %s: %s; working in the ClientApp process", site.site_id, exc)
    from clients.site import work  # torch, transformers, peft: only without a worker

    return work.run_job(kind, site, reference, config, run=str(context.run_id))


@app.train(mods=list(TRAIN_MODS))
def train(message: Message, context: Context) -> Message:
    site = SiteSettings.from_node_config(context.node_config)
    answer, local = _job("train", message, context, site)
    if "refusal" in answer:
        return refusal_reply(message, site_id=site.site_id, reason=str(answer["refusal"]))
    reference, _ = read_request(message)
    return train_reply(
        message,
        local=local,
        reference=reference,
        metrics=answer["metrics"],
        site_id=site.site_id,
        weight=int(answer["weight"]),
    )


@app.evaluate()
def evaluate_global(message: Message, context: Context) -> Message:
    site = SiteSettings.from_node_config(context.node_config)
    answer, _ = _job("evaluate", message, context, site)
    if "no-evaluation" in answer:
        return no_evaluation_reply(message, site_id=site.site_id, reason=answer["no-evaluation"])
    return evaluate_reply(
        message,
        site_id=site.site_id,
        num_examples=int(answer["num-examples"]),
        loss=float(answer["loss"]),
        accuracy=float(answer["accuracy"]),
    )


@app.query()
def head_statistics(message: Message, context: Context) -> Message:
    """Sums over the site's training rows for the closed-form head (strategies/lda_head.py)."""
    site = SiteSettings.from_node_config(context.node_config)
    answer, sums = _job("head-statistics", message, context, site)
    if "refusal" in answer:
        return refusal_reply(message, site_id=site.site_id, reason=str(answer["refusal"]))
    stats = HeadStatistics(*(sums[name] for name in HEAD_STATISTICS_FIELDS))
    return head_statistics_reply(message, site_id=site.site_id, stats=stats)
