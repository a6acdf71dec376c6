"""A ClientApp with hostile sites in it, for simulations that attack the server.

Every site runs fedlora's real ClientApp (`clients.site.app.app`: mods, budget, local
training, reply); a site named in `HOSTILE_ENV` then rewrites what it sends, as a site
that changed its own code would. The server-side path (SuperLink, Grid, decoding,
validation, aggregation, records) is the real one. Used by tests/integration and
scripts/bench_robustness.py through `simulate(..., client_app=HOSTILE_APP)`.

``FEDLORA_HOSTILE`` is a JSON object ``{site id: {"attack": NAME, ...parameters}}``
(Ray's workers inherit the environment, so every simulated site reads it):

- ``dominate``: claim ``examples`` training rows and send the update scaled to L2 norm
  ``norm`` in the opposite direction of the honest one (a boosted, flipped update);
- ``claim``: claim the site id ``site-id`` (another site's) in every reply from round
  ``from-round`` on (default 1);
- ``forge``: overwrite train metrics with ``metrics`` and the evaluation reply with
  ``evaluation`` = [count, loss, accuracy].
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from clients.site.app import app as honest_app
from clients.site.settings import SiteSettings
from clients.site.wire import replace_update, reply_update
from strategies.protocol import (
    ACCURACY,
    LOSS,
    METRICS,
    NUM_EXAMPLES,
    SITE,
    SITE_ID,
    read_request,
)

HOSTILE_ENV = "FEDLORA_HOSTILE"
HOSTILE_APP = "tests.hostile_sites:app"
app = ClientApp()


def _attack(context: Context) -> dict[str, Any] | None:
    site = SiteSettings.from_node_config(context.node_config).site_id
    return json.loads(os.environ.get(HOSTILE_ENV, "{}")).get(site)


def _claim(message: Message, reply: Message, attack: dict[str, Any]) -> None:
    if attack["attack"] != "claim":
        return
    _, config = read_request(message)
    if int(config.get("server_round", 1)) >= int(attack.get("from-round", 1)):  # type: ignore[call-overload]
        reply.content.config_records[SITE] = ConfigRecord({SITE_ID: attack["site-id"]})


@app.train()
def train(message: Message, context: Context) -> Message:
    reply = honest_app(message, context)
    attack = _attack(context)
    if attack is None or reply.has_error() or METRICS not in reply.content.metric_records:
        return reply
    metrics = dict(reply.content.metric_records[METRICS])
    if attack["attack"] == "dominate":
        _, update = reply_update(message, reply)
        norm = float(np.sqrt(sum(float(np.sum(np.square(v))) for v in update.values())))
        scale = -float(attack["norm"]) / norm if norm > 0 else 0.0
        replace_update(message, reply, {k: v * scale for k, v in update.items()})
        metrics[NUM_EXAMPLES] = int(attack["examples"])
    if attack["attack"] == "forge":
        metrics |= attack["metrics"]
    reply.content.metric_records[METRICS] = MetricRecord(metrics)
    _claim(message, reply, attack)
    return reply


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    reply = honest_app(message, context)
    attack = _attack(context)
    if attack is None or reply.has_error():
        return reply
    if attack["attack"] == "forge" and "evaluation" in attack:
        count, loss, accuracy = attack["evaluation"]
        reply.content.metric_records[METRICS] = MetricRecord(
            {NUM_EXAMPLES: count, LOSS: loss, ACCURACY: accuracy}
        )
    _claim(message, reply, attack)
    return reply
