"""The wire contract, pinned by round trips: a site builds a reply, the server decodes it.

Each test runs the site-side function of strategies/protocol.py on a request the
server-side function built, in both shapes (plain records; SecAgg+'s FitIns/FitRes, as
Flower's compat layer converts them for the workflow), and checks the server reads back
what the site meant.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.compat.common import recorddict_compat as compat

from clients.task.errors import ConfigError
from strategies.lda_head import HeadStatistics
from strategies.protocol import (
    MAX_WEIGHT_KEY,
    NAMES_KEY,
    PRG_KEY,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    EvaluateReply,
    Refusal,
    SitePrivacy,
    SiteRefused,
    decode_evaluate,
    decode_head_statistics,
    decode_secure_train,
    decode_train,
    evaluate_reply,
    head_statistics_reply,
    is_refusal,
    plan_config,
    read_request,
    refusal_reply,
    requests,
    secure_fitins,
    sender,
    to_record,
    train_metrics,
    train_reply,
)
from strategies.strategy import SiteUpdate
from tests.flower_task import server_app_task

pytestmark = pytest.mark.usefixtures(server_app_task.__name__)

STATE = {
    "a.lora_B": np.zeros((4, 2), np.float32),
    "head": np.full((3,), 0.5, np.float32),
}
PLAN = {"server_round": 3, "local_steps": 2, "spec.task": "causal-lm"}
NODE = 7
PRIVACY = SitePrivacy(epsilon=2.5, delta=1e-5, noise_multiplier=1.1, max_grad_norm=1.0)


def _plain(kind: str = MessageType.TRAIN) -> Message:
    (message,) = requests([NODE], to_record(STATE), PLAN, kind=kind)
    return message


def _secure(max_weight: int = 100) -> Message:
    # The workflow turns the FitIns into a message with Flower's compat layer.
    fitins = secure_fitins(STATE, PLAN, max_weight=max_weight, prg="aes-ctr")
    content = compat.fitins_to_recorddict(fitins, keep_input=True)
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=NODE)


def _local(reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v + np.float32(0.25) for k, v in reference.items()}


def _metrics() -> dict[str, int | float]:
    return train_metrics(num_examples=40, loss=0.75, seconds=1.5, steps=2, privacy=PRIVACY)


def _flower_error(request: Message, exc: Exception) -> Message:
    """The error reply Flower makes of an exception a ClientApp raises (flwr 1.41)."""
    return Message(Error(code=0, reason=str(type(exc)) + ":<'" + str(exc) + "'>"), reply_to=request)


def test_plain_train_reply_round_trip() -> None:
    # Arrange: the site reads the server's request and trains.
    request = _plain()
    reference, config = read_request(request)
    local = _local(reference)
    # Act
    reply = train_reply(
        request, local=local, reference=reference, metrics=_metrics(), site_id="site-a", weight=40
    )
    update = decode_train(reply)
    # Assert
    assert config == PLAN and plan_config(config) == PLAN
    assert isinstance(update, SiteUpdate)
    assert update.site == "site-a" == sender(reply)
    assert reply.metadata.src_node_id == NODE
    assert update.num_examples == 40
    assert update.metrics[TRAIN_LOSS] == 0.75 and update.metrics[TRAIN_SECONDS] == 1.5
    assert SitePrivacy.from_metrics(update.metrics) == PRIVACY
    for name, value in local.items():
        np.testing.assert_array_equal(update.state[name], value)
        assert update.state[name].dtype == np.float32


def test_secure_train_reply_round_trip() -> None:
    # Arrange: the site reads a secure request (tensors named in the config).
    request = _secure()
    reference, config = read_request(request)
    local = _local(reference)
    # Act: the site replies; the workflow hands the server the reply as a FitRes.
    reply = train_reply(
        request, local=local, reference=reference, metrics=_metrics(), site_id="site-a", weight=40
    )
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    site, weight, metrics = decode_secure_train(fitres)
    # Assert: the plan survives beside the transport keys; the reply carries the update.
    assert plan_config(config) == PLAN
    assert {k: reference[k].tolist() for k in STATE} == {k: v.tolist() for k, v in STATE.items()}
    assert (site, weight) == ("site-a", 40)
    assert metrics[TRAIN_LOSS] == 0.75 and SitePrivacy.from_metrics(metrics) == PRIVACY
    deltas = [bytes_to_ndarray(t) for t in fitres.parameters.tensors]
    for name, delta in zip(STATE, deltas, strict=True):
        np.testing.assert_allclose(delta, np.full(STATE[name].shape, 0.25))


def test_secure_reply_over_the_weight_cap_is_refused_at_the_site() -> None:
    request = _secure(max_weight=10)
    reference, _ = read_request(request)
    with pytest.raises(ConfigError, match=r"weight 40 exceeds secagg\.max-weight=10"):
        train_reply(
            request, local=reference, reference=reference, metrics={}, site_id="s", weight=40
        )


def test_plain_refusal_round_trip() -> None:
    reply = refusal_reply(_plain(), site_id="site-b", reason="ε would reach 3 > max-epsilon=1")
    decoded = decode_train(reply)
    assert decoded == Refusal("site-b", "privacy budget: ε would reach 3 > max-epsilon=1")
    assert is_refusal(decoded.reason)


def test_secure_refusal_reaches_the_server_as_an_error_it_recognises() -> None:
    # Arrange: a secure request cannot carry a refusal record, so the site raises.
    request = _secure()
    with pytest.raises(SiteRefused) as info:
        refusal_reply(request, site_id="site-b", reason="max-epsilon=1")
    # Act: Flower reports the exception as the site's error.
    reply = _flower_error(request, info.value)
    # Assert
    assert reply.has_error() and is_refusal(reply.error.reason)
    assert "max-epsilon=1" in reply.error.reason
    assert sender(reply) == f"node-{NODE}"
    assert not is_refusal(str(type(ValueError())) + ":<'site-b crashed'>")


def test_evaluate_reply_round_trip() -> None:
    request = _plain(MessageType.EVALUATE)
    reference, config = read_request(request)
    reply = evaluate_reply(request, site_id="site-c", num_examples=9, loss=0.5, accuracy=0.875)
    assert decode_evaluate(reply) == EvaluateReply("site-c", 9, 0.5, 0.875)
    assert reply.metadata.message_type == MessageType.EVALUATE and config == PLAN
    assert reference.keys() == STATE.keys()


def test_head_statistics_reply_round_trip() -> None:
    request = _plain(MessageType.QUERY)
    stats = HeadStatistics.of(np.array([[1.0, 2.0], [3.0, -1.0]]), np.array([0, 2]), num_labels=3)

    reply = head_statistics_reply(request, site_id="site-d", stats=stats)
    decoded = decode_head_statistics(reply)

    assert isinstance(decoded, HeadStatistics) and sender(reply) == "site-d"
    for name in ("gram", "class_sum", "count"):
        np.testing.assert_array_equal(getattr(decoded, name), getattr(stats, name))
    refused = refusal_reply(request, site_id="site-e", reason="max-epsilon=1")
    assert decode_head_statistics(refused) == Refusal("site-e", "privacy budget: max-epsilon=1")


@pytest.mark.parametrize(
    ("content", "decode", "message"),
    [
        (RecordDict({"metrics": MetricRecord({"num-examples": 3})}), decode_train, "lacks"),
        (RecordDict({}), decode_evaluate, "lacks 'metrics'"),
        (
            RecordDict({"metrics": MetricRecord({"loss": [1.0, 2.0], "accuracy": 1.0})}),
            decode_evaluate,
            "unreadable metrics",
        ),
        (RecordDict({"metrics": MetricRecord({"loss": 1.0})}), decode_evaluate, "unreadable"),
        *(
            (
                RecordDict({"metrics": MetricRecord({"num-examples": n, "accuracy": 1.0})}),
                decode_evaluate,
                f"num-examples={n!r} is not an integer",
            )
            for n in (float("inf"), float("nan"), 2.5)  # inf: OverflowError; 2.5: became 2
        ),
        (RecordDict({}), decode_head_statistics, "lacks 'head-statistics'"),
        (
            RecordDict({"head-statistics": to_record({"gram": np.eye(2)})}),
            decode_head_statistics,
            "unreadable head statistics",
        ),
    ],
)
def test_malformed_replies_are_value_errors(content: RecordDict, decode, message: str) -> None:
    reply = Message(content, reply_to=_plain())
    with pytest.raises(ValueError, match=message):
        decode(reply)


def test_plan_config_drops_every_secagg_transport_key() -> None:
    # Regression: the mask generator's key reached TrainPlan, which refuses unknown fields,
    # so every SecAgg+ site failed on the Deployment Engine.
    plan = {"local_steps": 2, "spec.task": "causal-lm"}
    config = plan | {NAMES_KEY: "[]", MAX_WEIGHT_KEY: 1, PRG_KEY: "aes-ctr"}
    assert plan_config(config) == plan
