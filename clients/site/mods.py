"""Client-side mods of the site's training function, and their order.

A mod wraps the training function (Flower's middleware): it sees the request on the way
in and the reply on the way out. ``TRAIN_MODS[0]`` is the outermost, so on the way out
the reply passes `clip_mod` first and the SecAgg+ masking last. The order is security
relevant: clipping after masking would clip random-looking integers and leave the real
update unbounded, so the DP sensitivity bound and the SecAgg+ clipping range would not
hold (tests/clients/site/test_mods.py pins it).
"""

from __future__ import annotations

import importlib
import logging
import math

from flwr.app import Context, Message, MessageType
from flwr.client.mod import secaggplus_mod  # Flower 1.41: legacy path only
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from clients.site.wire import replace_update, reply_update
from strategies.dp import clip_update, global_norm
from strategies.protocol import COMPACT_KEY, PRG_KEY, SECURE_CONFIG, SECURE_OUT, read_request
from strategies.secagg import PRGS, compact_masked, mask_generator

log = logging.getLogger(__name__)
# The module whose `pseudo_rand_gen` the mod calls (the package re-exports the function).
FLOWER_MOD = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
# Rounds of aiming lower in `clip_mod`: the margin grows from 1e-6 to 0.5 of the bound.
_CLIP_TRIES = 8


def secagg_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` for rounds the server runs with SecAgg+; plain otherwise.

    The masking stage carries the round's config, which names the mask generator
    (``secagg.prg``); the other stages expand no masks.
    """
    records = msg.content.config_records
    if RECORD_KEY_CONFIGS not in records:
        return call_next(msg, ctxt)
    secure = records.get(SECURE_CONFIG)
    prg = str(secure.get(PRG_KEY, "flower")) if secure is not None else "flower"
    if prg not in PRGS:
        raise ValueError(f"unknown SecAgg+ mask generator {prg!r}")
    with mask_generator(FLOWER_MOD, prg):
        reply = secaggplus_mod(msg, ctxt, call_next)
    compact = secure is not None and bool(secure.get(COMPACT_KEY))
    configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    if compact and configs is not None and Key.MASKED_PARAMETERS in configs:
        masked = configs[Key.MASKED_PARAMETERS]
        configs[Key.MASKED_PARAMETERS] = compact_masked(masked)  # type: ignore[arg-type]
    return reply


def clip_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Clip the reply's update (``local - global``) to the plan's ``clip_norm`` (L2).

    The bound holds for what is sent: the reply's tensors are re-read after clipping and
    the target lowered until ``local - global`` in the reply's dtype is within
    ``clip_norm`` (with 1e-12 to spare for the server's summation order,
    strategies/validation.py). A non-finite update is sent as it is in a plain reply,
    for the server to reject it by name (``finite``). Under SecAgg+ the server cannot
    see it: Flower's quantization maps ±inf to ±the clipping range, silently in range,
    and NaN to an out-of-range value that fails the whole round's mean check; so there
    the site drops out of the round instead (an error reply: a dropout).

    Raises:
        ValueError: A non-finite update under SecAgg+, or one that 8 tries of aiming
            lower cannot bring within the bound in the reply's dtype.
    """
    reply = call_next(msg, ctxt)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    _, config = read_request(msg)
    clip_norm = float(config.get("clip_norm", 0.0))  # type: ignore[arg-type]
    if clip_norm <= 0 or not reply.content.array_records:
        return reply
    _, update = reply_update(msg, reply)
    norm = global_norm(update)
    if not math.isfinite(norm):
        if SECURE_OUT in reply.content.array_records:
            raise ValueError(
                f"the update's norm is {norm}: a non-finite update cannot be masked for "
                "SecAgg+ (quantization would map it to finite values)"
            )
        log.warning("update norm is %s: sent as it is; the server will reject it", norm)
        return reply
    bound = clip_norm * (1 - 1e-12)  # the server sums in another order (ulps apart)
    if norm <= bound:
        return reply
    # The reply carries ``global + update`` in the tensors' dtype: rounding there can land
    # above the bound (by ~1e-7 relative in float32 about half the time; systematically,
    # and by more, with coarse dtypes or bounds far below the global's values), and the
    # server rejects an update above ``update.max-norm``. Aim lower, by a margin that grows
    # tenfold each try, until the reply holds.
    target, got = clip_norm, norm
    for attempt in range(_CLIP_TRIES):
        clipped, _ = clip_update(update, clip_norm=target)
        replace_update(msg, reply, clipped)
        _, sent = reply_update(msg, reply)
        got = global_norm(sent)
        if got <= bound:
            log.info("update norm %.4g clipped to %.4g", norm, got)
            return reply
        target *= (bound / got) * (1 - min(0.5, 1e-6 * 10**attempt))
    raise ValueError(
        f"cannot clip the update to the plan's clip_norm={clip_norm} (update.max-norm, or "
        f"dp.clip-norm under client-level DP) in the reply's dtype: its norm is still "
        f"{got:.9g} after {_CLIP_TRIES} tries"
    )


# Outermost first: masking wraps clipping, so an update is clipped before it is masked.
TRAIN_MODS = (secagg_mod, clip_mod)
