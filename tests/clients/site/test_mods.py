"""The site's training mods: clipping runs on the reply before SecAgg+ masks it."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.client.mod.utils import make_ffn

from clients.site.mods import TRAIN_MODS, clip_mod, secagg_mod
from strategies.dp import global_norm
from strategies.protocol import from_record, read_request, to_record, train_reply


def test_masking_wraps_clipping() -> None:
    # mods[0] is outermost: the reply passes clip_mod before secagg_mod masks it.
    assert (secagg_mod, clip_mod) == TRAIN_MODS


def _request(clip_norm: float) -> Message:
    content = RecordDict(
        {
            "arrays": to_record({"w": np.zeros(4, np.float32)}),
            "config": ConfigRecord({"clip_norm": clip_norm}),
        }
    )
    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    return Message(metadata=metadata, content=content)


def _train(message: Message, context: Context) -> Message:
    reference, _ = read_request(message)
    local = {"w": reference["w"] + np.array([3.0, 4.0, 0.0, 0.0], np.float32)}
    return train_reply(message, local=local, reference=reference, metrics={}, site_id="s", weight=1)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_plain_round_reply_is_clipped_by_the_mod_chain() -> None:
    # Arrange: the update (3, 4, 0, 0) has norm 5; the plan says clip to 1.
    chain = make_ffn(_train, list(TRAIN_MODS))
    request = _request(1.0)
    # Act
    reply = chain(request, _context())
    # Assert
    update = from_record(reply.content.array_records["arrays"])
    assert 1.0 - 1e-5 < global_norm(update) <= 1.0  # never above the bound once in float32
    np.testing.assert_allclose(update["w"], [0.6, 0.8, 0.0, 0.0], rtol=1e-5)


def test_no_clip_norm_leaves_the_reply_alone() -> None:
    reply = make_ffn(_train, list(TRAIN_MODS))(_request(0.0), _context())
    np.testing.assert_allclose(
        from_record(reply.content.array_records["arrays"])["w"], [3.0, 4.0, 0.0, 0.0]
    )


def test_a_secure_request_config_still_parses_as_the_round_plan() -> None:
    # Every entry server/secagg.py adds beside the plan must be stripped before parsing.
    from clients.task.model import ModelSpec
    from clients.task.plan import TrainPlan
    from strategies.protocol import SECURE_CONFIG_KEYS, plan_config

    plan = TrainPlan(spec=ModelSpec(base="b", task="causal-lm"), base_digest="d")
    config = plan.to_config() | dict.fromkeys(SECURE_CONFIG_KEYS, "x")
    assert TrainPlan.from_config(plan_config(config)) == plan


def _clip_through_the_chain(
    reference: np.ndarray, step: np.ndarray, clip_norm: float
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(reference, the reply's local tensors) for a site that adds ``step`` to ``reference``."""

    def train(message: Message, context: Context) -> Message:
        ref, _ = read_request(message)
        local = {"w": ref["w"] + step}
        return train_reply(message, local=local, reference=ref, metrics={}, site_id="s", weight=1)

    request = _request(clip_norm)
    request.content["arrays"] = to_record({"w": reference})
    reply = make_ffn(train, list(TRAIN_MODS))(request, _context())
    return {"w": reference}, from_record(reply.content.array_records["arrays"])


def test_a_clipped_reply_holds_the_bound_after_float32_rounding() -> None:
    # The reply carries global + update in float32; clipping the float64 update to exactly
    # the bound lands above it after that rounding in about half of all cases, and the
    # server rejects any update above update.max-norm. Over 20 draws the plain clip would
    # pass all of them with probability ~1e-6.
    from strategies.validation import validate_update

    for seed in range(20):
        rng = np.random.default_rng(seed)
        reference = rng.normal(0.0, 0.5, 20_000).astype(np.float32)
        step = rng.normal(0.0, 20.0, 20_000).astype(np.float32)
        ref, local = _clip_through_the_chain(reference, step, 1000.0)
        assert local["w"].dtype == np.float32
        norm = validate_update(local, reference=ref, num_examples=1, max_norm=1000.0)
        assert 999.9 < norm <= 1000.0, (seed, norm)


def test_a_bound_far_below_the_globals_float32_spacing_still_holds() -> None:
    # Global values near 1e4 are 1e-3 apart in float32: a bound of 0.01 over 20 values
    # overshoots by far more than 1e-7, so aiming 1e-6 lower each time would not converge.
    from strategies.validation import validate_update

    for seed in range(30):
        rng = np.random.default_rng(seed)
        reference = (1e4 * (1 + rng.random(20))).astype(np.float32)
        ref, local = _clip_through_the_chain(
            reference, rng.normal(0.0, 1.0, 20).astype(np.float32), 0.01
        )
        norm = validate_update(local, reference=ref, num_examples=1, max_norm=0.01)
        assert 0.004 < norm <= 0.01, (seed, norm)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_update_is_sent_as_it_is_for_the_server_to_reject(bad: float) -> None:
    from strategies.validation import UpdateRejected, validate_update

    step = np.array([3.0, bad, 0.0, 0.0], np.float32)
    ref, local = _clip_through_the_chain(np.zeros(4, np.float32), step, 1.0)
    np.testing.assert_array_equal(local["w"], step)
    with pytest.raises(UpdateRejected, match="non-finite"):
        validate_update(local, reference=ref, num_examples=1, max_norm=1.0)


def _secure_request(clip_norm: float) -> Message:
    # A SecAgg+ training request as the server's workflow builds it (Flower's compat layer).
    from flwr.compat.common import recorddict_compat as compat

    from strategies.protocol import secure_fitins

    state = {"w": np.zeros(4, np.float32)}
    fitins = secure_fitins(state, {"clip_norm": clip_norm}, max_weight=100, prg="aes-ctr")
    request = _request(clip_norm)
    return Message(
        metadata=request.metadata,
        content=compat.fitins_to_recorddict(fitins, keep_input=True),
    )


def _secure_step(step: np.ndarray) -> Callable[[Message, Context], Message]:
    def train(message: Message, context: Context) -> Message:
        ref, _ = read_request(message)
        return train_reply(
            message, local={"w": ref["w"] + step}, reference=ref, metrics={}, site_id="s", weight=1
        )

    return train


def test_a_secure_reply_is_clipped_in_its_secure_record() -> None:
    from clients.site.wire import reply_update

    request = _secure_request(1.0)
    reply = clip_mod(request, _context(), _secure_step(np.array([3, 4, 0, 0], np.float32)))
    _, update = reply_update(request, reply)
    assert 1.0 - 1e-5 < global_norm(update) <= 1.0
    np.testing.assert_allclose(update["w"], [0.6, 0.8, 0.0, 0.0], rtol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_update_under_secagg_fails_the_round_at_the_site(bad: float) -> None:
    # Under SecAgg+ the server cannot see the update: Flower's quantization maps ±inf to
    # ±the clipping range (in range, unnoticed) and NaN to a value that fails the whole
    # round's mean check. Raising makes the site one dropout instead.
    step = np.array([3.0, bad, 0.0, 0.0], np.float32)
    with pytest.raises(ValueError, match="non-finite update cannot be masked"):
        clip_mod(_secure_request(1.0), _context(), _secure_step(step))


def test_an_update_within_ulps_of_the_bound_is_clipped_below_it() -> None:
    # The server sums the norm in another order (np.dot, strategies/validation.py), a few
    # ulps from the site's sum: an update that is at the bound by the site's count may be
    # above it by the server's, so the site keeps 1e-12 of the bound to spare.
    step = np.array([1.0 - 1e-13, 0.0, 0.0, 0.0])
    _, local = _clip_through_the_chain(np.zeros(4), step, 1.0)
    assert 1.0 - 1e-5 < global_norm(local) <= 1.0 - 1e-12
