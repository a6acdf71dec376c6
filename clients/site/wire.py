"""The two shapes a training request and its reply take on the wire.

Plain rounds use fedlora's records: ``arrays`` (named global tensors) and ``config`` (the
round plan) in, ``arrays`` (the site's full local tensors), ``metrics`` and ``site`` out.

Secure rounds (SecAgg+) come through Flower's legacy workflow, which speaks FitIns/FitRes:
``fitins.parameters`` (an ordered list of ``.npy`` tensors) and ``fitins.config`` in,
``fitres.parameters`` out. The server names the tensors in the config (`NAMES_KEY`), the
site replies with its *update* (``local - global``) in that order, because a bounded
update is what SecAgg+ quantizes well, and with its aggregation weight as the example
count.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Parameters, Status, bytes_to_ndarray, ndarray_to_bytes
from flwr.compat.common import recorddict_compat as compat

from clients.task.errors import ConfigError
from strategies.records import from_record, to_record
from strategies.secagg import MAX_WEIGHT_KEY, NAMES_KEY, SECURE_CONFIG_KEYS

SECURE_IN = "fitins.parameters"
SECURE_OUT = "fitres.parameters"


def is_secure(message: Message) -> bool:
    return SECURE_IN in message.content.array_records


def read_request(message: Message) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The global tensors and the raw plan config of a training or evaluation request.

    Raises:
        ConfigError: If a secure request's tensor names do not match its tensors.
    """
    content = message.content
    if not is_secure(message):
        return from_record(content.array_records["arrays"]), dict(content.config_records["config"])
    config = dict(content.config_records["fitins.config"])
    names = json.loads(str(config.get(NAMES_KEY, "[]")))
    tensors = [bytes_to_ndarray(a.data) for a in content.array_records[SECURE_IN].values()]
    if len(names) != len(tensors):
        raise ConfigError(f"secure request names {len(names)} tensors but holds {len(tensors)}")
    return dict(zip(names, tensors, strict=True)), config


def plan_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The round-plan part of a request's config."""
    return {k: v for k, v in config.items() if k not in SECURE_CONFIG_KEYS}


def train_reply(
    message: Message,
    *,
    local: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    metrics: dict[str, int | float],
    site_id: str,
    weight: int,
) -> Message:
    """Reply to a training request in the request's shape."""
    if not is_secure(message):
        content = RecordDict(
            {
                "arrays": to_record(local),
                "metrics": MetricRecord(metrics),
                "site": ConfigRecord({"site-id": site_id}),
            }
        )
        return Message(content, reply_to=message)
    config = dict(message.content.config_records["fitins.config"])
    names = json.loads(str(config[NAMES_KEY]))
    max_weight = int(config.get(MAX_WEIGHT_KEY, 0))  # type: ignore[call-overload]
    if max_weight and weight > max_weight:
        raise ConfigError(
            f"site {site_id}: weight {weight} exceeds secagg.max-weight={max_weight}; "
            "the masked sum would overflow"
        )
    delta = [(local[n].astype(np.float64) - reference[n].astype(np.float64)) for n in names]
    fitres = FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=Parameters(
            tensors=[ndarray_to_bytes(d) for d in delta], tensor_type="numpy.ndarray"
        ),
        num_examples=weight,
        metrics={**metrics, "site-id": site_id},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)


def reply_update(
    request: Message, reply: Message
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(global tensors, the update the reply carries as ``local - global``)."""
    reference, config = read_request(request)
    if SECURE_OUT in reply.content.array_records:
        names = json.loads(str(config[NAMES_KEY]))
        arrays = reply.content.array_records[SECURE_OUT].values()
        return reference, dict(zip(names, (bytes_to_ndarray(a.data) for a in arrays), strict=True))
    local = from_record(reply.content.array_records["arrays"])
    return reference, {
        k: local[k].astype(np.float64) - reference[k].astype(np.float64) for k in local
    }


def replace_update(request: Message, reply: Message, update: Mapping[str, np.ndarray]) -> None:
    """Write ``update`` back into the reply, in the reply's shape, in place."""
    reference, config = read_request(request)
    records = reply.content.array_records
    if SECURE_OUT in records:
        names = json.loads(str(config[NAMES_KEY]))
        params = Parameters(
            tensors=[ndarray_to_bytes(np.asarray(update[n])) for n in names],
            tensor_type="numpy.ndarray",
        )
        records[SECURE_OUT] = compat.parameters_to_arrayrecord(params, keep_input=True)
        return
    local = from_record(records["arrays"])
    new = {k: (reference[k].astype(np.float64) + update[k]).astype(local[k].dtype) for k in local}
    records["arrays"] = to_record(new)
