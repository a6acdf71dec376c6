"""The wire contract between the server and a training site: one module for both ends.

Plain rounds speak fedlora's records::

    request   {"arrays": global tensors, "config": round plan}
    train     {"arrays": local tensors, "metrics": TRAIN_METRICS, "site": {"site-id"}}
    refusal   {"refusal": {"reason"}, "site": {"site-id"}}
    evaluate  {"metrics": {NUM_EXAMPLES, LOSS, ACCURACY}, "site": {"site-id"}}
    none      {"no-evaluation": {"reason"}, "site": {"site-id"}}  (no held-out rows)
    head      {"head-statistics": {gram, class_sum, count}, "site": {"site-id"}}
              (a query before round 1, strategies/lda_head.py; or a refusal record)

Secure rounds (SecAgg+) go through Flower 1.41's legacy workflow, which speaks
FitIns/FitRes: ``fitins.parameters`` (an ordered list of ``.npy`` tensors) and
``fitins.config`` in, a FitRes out. The server names the tensors in the config
(`NAMES_KEY`); the site replies with its *update* (``local - global``) in that order,
because a bounded update is what SecAgg+ quantizes well, with its aggregation weight as
the example count and its metrics plus `SITE_ID` as the FitRes metrics. A secure round
cannot carry a refusal record (SecAgg+ expects an update), so there a refusing site raises
`SiteRefused`; its message starts with `REFUSAL_MARK` and reaches the server as the site's
error, which `is_refusal` tells apart from a failure.

Site side: `read_request`, `plan_config`, `train_metrics`, `train_reply`,
`evaluate_reply`, `no_evaluation_reply`, `head_statistics_reply`, `refusal_reply`. Server
side: `requests`, `secure_fitins`, `sender`, `decode_train`, `decode_evaluate`,
`decode_head_statistics`, `decode_secure_train`, `is_refusal`.
tests/strategies/test_protocol.py pins every shape with a site-to-server round trip.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    bytes_to_ndarray,
    ndarray_to_bytes,
)
from flwr.compat.common import recorddict_compat as compat

from clients.task.errors import ConfigError, FedloraError
from clients.task.numbers import is_integer
from strategies.lda_head import HeadStatistics
from strategies.strategy import SiteUpdate

# Records of a plain request and its replies.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
SITE_ID = "site-id"  # in the "site" record; in a FitRes' metrics under SecAgg+
# What a site id may be, on both sides (the site refuses to start with another, the server
# rejects a reply claiming one). It ends up in log lines, MLflow tags, file names (a
# simulated site's state folder) and command lines, so: short, printable (no line breaks
# or control characters to forge a log line with), no path separator, starting with a
# letter or digit (not an option, not a hidden or parent folder) and not ending in a space.
SITE_ID_RULE = (
    "1-64 printable characters without / or \\, starting with a letter or digit and not "
    "ending in whitespace"
)


REFUSAL = "refusal"
REASON = "reason"
# An evaluate reply from a site that holds no rows out: no number instead of one measured
# on its training rows.
NO_EVALUATION = "no-evaluation"
# A site's sums for the closed-form head (strategies/lda_head.py), and their tensor names.
HEAD_STATISTICS = "head-statistics"
HEAD_STATISTICS_FIELDS = ("gram", "class_sum", "count")
# Records of a secure request and its reply, as Flower's legacy compat layer names them.
SECURE_IN = "fitins.parameters"
SECURE_CONFIG = "fitins.config"
SECURE_OUT = "fitres.parameters"
# Entries a secure request's config carries beside the round plan: the names of the
# tensors in the legacy (ordered, unnamed) parameter list, the largest weight, the mask
# generator, and whether the server accepts masked vectors as uint32.
NAMES_KEY = "secagg-tensor-names"
MAX_WEIGHT_KEY = "secagg-max-weight"
PRG_KEY = "secagg-prg"
COMPACT_KEY = "secagg-compact"
SECURE_CONFIG_KEYS = (NAMES_KEY, MAX_WEIGHT_KEY, PRG_KEY, COMPACT_KEY)

# Metric names of a train reply.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
STEPS = "steps"
SITE_EPSILON = "site-epsilon"
SITE_DELTA = "site-delta"
SITE_NOISE_MULTIPLIER = "site-noise-multiplier"
SITE_MAX_GRAD_NORM = "site-max-grad-norm"
# Metric names of an evaluate reply (and NUM_EXAMPLES).
LOSS = "loss"
ACCURACY = "accuracy"

# How a refusal reads among a secure round's failures.
REFUSAL_MARK = "privacy budget:"
# The failure the server records for a sampled site that sent nothing back.
NO_REPLY = "no reply before timeout"


def valid_site_id(value: str) -> bool:
    """Whether ``value`` follows `SITE_ID_RULE` (``"Ward 7, Oslo"`` does; ``"../x"`` not)."""
    return (
        0 < len(value) <= 64
        and value.isprintable()
        and value[0].isalnum()
        and not value[-1].isspace()
        and "/" not in value
        and "\\" not in value
    )


class SiteRefused(FedloraError):
    """A site's refusal of a secure round, raised so it reaches the server as an error."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{REFUSAL_MARK} {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Refusal:
    """A site that refused the round (to stay within its privacy budget), and why."""

    site: str
    reason: str


@dataclass(frozen=True)
class EvaluateReply:
    """One site's evaluation of the global adapter on its held-out rows."""

    site: str
    num_examples: int
    loss: float
    accuracy: float


@dataclass(frozen=True)
class NoEvaluation:
    """A site that has no held-out rows to evaluate on, and why."""

    site: str
    reason: str


@dataclass(frozen=True)
class SitePrivacy:
    """A site's sample-level DP for this run (DP-SGD), as its train reply states it."""

    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float

    def to_metrics(self) -> dict[str, float]:
        return {
            SITE_EPSILON: self.epsilon,
            SITE_DELTA: self.delta,
            SITE_NOISE_MULTIPLIER: self.noise_multiplier,
            SITE_MAX_GRAD_NORM: self.max_grad_norm,
        }

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> SitePrivacy | None:
        """The claim in a reply's metrics, or None unless all four numbers are there."""
        keys = (SITE_EPSILON, SITE_DELTA, SITE_NOISE_MULTIPLIER, SITE_MAX_GRAD_NORM)
        if not all(k in metrics for k in keys):
            return None
        return cls(*(float(metrics[k]) for k in keys))


def to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack tensors into an ArrayRecord (numpy .npy serialization, no pickle)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord; Flower loads each array with allow_pickle=False."""
    return {name: array.numpy() for name, array in record.items()}


def node_name(node_id: int) -> str:
    """How the server names a site that did not (or could not) say its id."""
    return f"node-{node_id}"


# ------------------------------------------------------------------------- server side


def requests(
    nodes: Iterable[int], arrays: ArrayRecord, config: Mapping[str, Any], *, kind: str
) -> list[Message]:
    """One plain request per node: the global tensors and the round plan."""
    content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(dict(config))})
    return [Message(content=content, message_type=kind, dst_node_id=n) for n in nodes]


def secure_fitins(
    state: Mapping[str, np.ndarray], plan: Mapping[str, Any], *, max_weight: int, prg: str
) -> FitIns:
    """A secure training request: the tensors in ``list(state)`` order, named in the config."""
    config = dict(plan) | {
        NAMES_KEY: json.dumps(list(state)),
        MAX_WEIGHT_KEY: max_weight,
        PRG_KEY: prg,
        COMPACT_KEY: True,
    }
    parameters = Parameters(
        tensors=[ndarray_to_bytes(np.asarray(v)) for v in state.values()],
        tensor_type="numpy.ndarray",
    )
    return FitIns(parameters=parameters, config=config)


def origins(requests_sent: Iterable[Message]) -> dict[str, int]:
    """Message id → destination node of requests, once ``send_and_receive`` has sent them."""
    return {m.metadata.message_id or m.object_id: m.metadata.dst_node_id for m in requests_sent}


def origin(reply: Message, sent: Mapping[str, int]) -> int:
    """The node a reply speaks for.

    Usually its sender; but when a node cannot be reached the SuperLink itself answers
    with an error whose sender is the SuperLink (node 1), naming the request it answers.
    """
    return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def sender(reply: Message) -> str:
    """The site id a reply names, else the name of the node it came from."""
    records = reply.content.config_records if not reply.has_error() else {}
    if SITE in records:
        return str(records[SITE].get(SITE_ID, ""))
    return node_name(reply.metadata.src_node_id)


def array_bytes(reply: Message) -> int:
    """Bytes of the tensors a reply carries."""
    return sum(r.count_bytes() for r in reply.content.array_records.values())


def decode_train(reply: Message) -> SiteUpdate | Refusal:
    """A plain train reply (not an error) as the site's update, or its refusal.

    The example count is kept as received: the strategy validates it before it becomes
    a weight.

    Raises:
        ValueError: If the reply is malformed.
    """
    content = reply.content
    if REFUSAL in content.config_records:
        return Refusal(sender(reply), str(content.config_records[REFUSAL].get(REASON, "")))
    if ARRAYS not in content.array_records or METRICS not in content.metric_records:
        raise ValueError(f"reply lacks {ARRAYS!r} or {METRICS!r}")
    metrics = dict(content.metric_records[METRICS])
    try:
        state = from_record(content.array_records[ARRAYS])
    except (TypeError, KeyError) as exc:
        raise ValueError(f"unreadable tensors: {exc}") from exc
    return SiteUpdate(
        site=sender(reply),
        state=state,
        num_examples=metrics.pop(NUM_EXAMPLES, None),
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
    )


def decode_evaluate(reply: Message) -> EvaluateReply | NoEvaluation:
    """A plain evaluate reply (not an error), or the site's word that it has no held-out rows.

    Raises:
        ValueError: If the reply lacks its metrics or they are not numbers.
    """
    if NO_EVALUATION in reply.content.config_records:
        return NoEvaluation(
            site=sender(reply), reason=str(reply.content.config_records[NO_EVALUATION][REASON])
        )
    if METRICS not in reply.content.metric_records:
        raise ValueError(f"reply lacks {METRICS!r}")
    m = reply.content.metric_records[METRICS]
    count = m.get(NUM_EXAMPLES, 0)
    if not is_integer(count):  # int(inf) raises OverflowError
        raise ValueError(f"unreadable metrics: {NUM_EXAMPLES}={count!r} is not an integer")
    try:
        return EvaluateReply(
            site=sender(reply),
            num_examples=count,
            loss=float(m.get(LOSS, math.nan)),  # type: ignore[arg-type]
            accuracy=float(m[ACCURACY]),  # type: ignore[arg-type]
        )
    except (TypeError, KeyError) as exc:
        raise ValueError(f"unreadable metrics: {exc}") from exc


def decode_head_statistics(reply: Message) -> HeadStatistics | Refusal:
    """A head-statistics reply (not an error) as the site's sums, or its refusal.

    The sums are returned as received: `HeadStatistics.problem` judges them.

    Raises:
        ValueError: If the reply lacks a sum or one is not numeric.
    """
    content = reply.content
    if REFUSAL in content.config_records:
        return Refusal(sender(reply), str(content.config_records[REFUSAL].get(REASON, "")))
    if HEAD_STATISTICS not in content.array_records:
        raise ValueError(f"reply lacks {HEAD_STATISTICS!r}")
    try:
        arrays = from_record(content.array_records[HEAD_STATISTICS])
        values = [np.asarray(arrays[name], dtype=np.float64) for name in HEAD_STATISTICS_FIELDS]
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"unreadable head statistics: {exc}") from exc
    return HeadStatistics(*values)


def decode_secure_train(res: FitRes) -> tuple[str, int, dict[str, float]]:
    """(site id, weight, numeric metrics) of a secure train reply, as the workflow hands it."""
    metrics = dict(res.metrics)
    site = str(metrics.pop(SITE_ID, "?"))
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    return site, int(res.num_examples), numeric


def is_refusal(reason: str) -> bool:
    """Whether a site's error is its refusal of a secure round (see `SiteRefused`)."""
    return REFUSAL_MARK in reason


# --------------------------------------------------------------------------- site side


def is_secure(message: Message) -> bool:
    return SECURE_IN in message.content.array_records


def read_request(message: Message) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The global tensors and the raw config of a training or evaluation request.

    Raises:
        ConfigError: If a secure request's tensor names do not match its tensors.
    """
    content = message.content
    if not is_secure(message):
        return from_record(content.array_records[ARRAYS]), dict(content.config_records[CONFIG])
    config = dict(content.config_records[SECURE_CONFIG])
    names = json.loads(str(config.get(NAMES_KEY, "[]")))
    tensors = [bytes_to_ndarray(a.data) for a in content.array_records[SECURE_IN].values()]
    if len(names) != len(tensors):
        raise ConfigError(f"secure request names {len(names)} tensors but holds {len(tensors)}")
    return dict(zip(names, tensors, strict=True)), config


def secure_names(message: Message) -> list[str]:
    """The tensor order of a secure request."""
    return json.loads(str(message.content.config_records[SECURE_CONFIG][NAMES_KEY]))


def plan_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The round-plan part of a request's config."""
    return {k: v for k, v in config.items() if k not in SECURE_CONFIG_KEYS}


def train_metrics(
    *, num_examples: int, loss: float, seconds: float, steps: int, privacy: SitePrivacy | None
) -> dict[str, int | float]:
    """The metrics of a train reply."""
    out: dict[str, int | float] = {
        NUM_EXAMPLES: num_examples,
        TRAIN_LOSS: loss,
        TRAIN_SECONDS: seconds,
        STEPS: steps,
    }
    return out | (privacy.to_metrics() if privacy else {})


def _site(site_id: str) -> ConfigRecord:
    return ConfigRecord({SITE_ID: site_id})


def train_reply(
    message: Message,
    *,
    local: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    metrics: Mapping[str, int | float],
    site_id: str,
    weight: int,
) -> Message:
    """Reply to a training request in the request's shape.

    Raises:
        ConfigError: If a secure request caps the weight below ``weight`` (the masked
            sum would overflow).
    """
    if not is_secure(message):
        content = RecordDict(
            {ARRAYS: to_record(local), METRICS: MetricRecord(dict(metrics)), SITE: _site(site_id)}
        )
        return Message(content, reply_to=message)
    config = message.content.config_records[SECURE_CONFIG]
    max_weight = int(config.get(MAX_WEIGHT_KEY, 0))  # type: ignore[call-overload]
    if max_weight and weight > max_weight:
        raise ConfigError(
            f"site {site_id}: weight {weight} exceeds secagg.max-weight={max_weight}; "
            "the masked sum would overflow"
        )
    names = secure_names(message)
    delta = [(local[n].astype(np.float64) - reference[n].astype(np.float64)) for n in names]
    fitres = FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=Parameters(
            tensors=[ndarray_to_bytes(d) for d in delta], tensor_type="numpy.ndarray"
        ),
        num_examples=weight,
        metrics={**metrics, SITE_ID: site_id},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)


def evaluate_reply(
    message: Message, *, site_id: str, num_examples: int, loss: float, accuracy: float
) -> Message:
    """Reply to an evaluation request."""
    metrics = MetricRecord({NUM_EXAMPLES: num_examples, LOSS: loss, ACCURACY: accuracy})
    return Message(RecordDict({METRICS: metrics, SITE: _site(site_id)}), reply_to=message)


def no_evaluation_reply(message: Message, *, site_id: str, reason: str) -> Message:
    """Answer an evaluation request without a number: the site holds no rows out."""
    content = RecordDict({NO_EVALUATION: ConfigRecord({REASON: reason}), SITE: _site(site_id)})
    return Message(content, reply_to=message)


def head_statistics_reply(message: Message, *, site_id: str, stats: HeadStatistics) -> Message:
    """Answer a head-statistics query with the site's sums (float64)."""
    arrays = to_record({name: getattr(stats, name) for name in HEAD_STATISTICS_FIELDS})
    return Message(RecordDict({HEAD_STATISTICS: arrays, SITE: _site(site_id)}), reply_to=message)


def refusal_reply(message: Message, *, site_id: str, reason: str) -> Message:
    """Refuse a plain training request with the reason instead of an update.

    Raises:
        SiteRefused: For a secure request, which cannot carry a refusal; the site's
            error then counts as a dropout that `is_refusal` recognises.
    """
    if is_secure(message):
        raise SiteRefused(reason)
    content = RecordDict(
        {REFUSAL: ConfigRecord({REASON: f"{REFUSAL_MARK} {reason}"}), SITE: _site(site_id)}
    )
    return Message(content, reply_to=message)
