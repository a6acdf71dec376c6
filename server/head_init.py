"""Before round 1: the classification head in closed form from the sites' statistics.

With ``head.init`` = lda (opt-in; the default ``auto`` starts from the label names or the
seeded head, server/app.py: start_head; server/settings.py refuses lda with SecAgg+,
dp.* or site-dp.*), the server asks every connected site (a Flower QUERY message
carrying the initial adapter and round 1's plan) for the sums of what its head reads
over its training rows (strategies/lda_head.py), checks each site's sums, bounds each
site against the median site as bounded influence bounds updates, adds them, and sets
the head to Fisher's LDA of the total. Training then starts from that head.

This step never stops a run: a site that fails, refuses (a site under DP shares no sums)
or sends sums no real rows could give is left out, and with fewer than
``min-fit-clients`` usable sites, or a head that is not finite, the run keeps its seeded
head. What happened is logged and returned for the run's tags.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import MessageType
from flwr.serverapp import Grid

from clients.task.model import is_head_tensor
from server.identity import IdentityRejected, SiteIdentities
from server.settings import RunSettings
from strategies.errors import RoundFailed
from strategies.lda_head import HeadStatistics, bounded_statistics, lda_head
from strategies.protocol import (
    Refusal,
    decode_head_statistics,
    origin,
    origins,
    requests,
    sender,
    to_record,
)
from strategies.validation import MAX_EXAMPLES

log = logging.getLogger(__name__)
Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class HeadInit:
    """What the step did: ``source`` is "lda" or "seeded"; ``detail`` says why or from what."""

    source: str
    detail: str
    sites: tuple[str, ...] = ()
    rows: int = 0

    def tag(self) -> str:
        return f"{self.source}: {self.detail}"


def _head_names(state: Mapping[str, np.ndarray]) -> tuple[str, str] | None:
    """(weight, bias) names of the trained head in the adapter, or None without a bias."""
    weights = [k for k in state if is_head_tensor(k) and k.endswith(".weight")]
    biases = [k for k in state if is_head_tensor(k) and k.endswith(".bias")]
    if len(weights) != 1 or len(biases) != 1:
        return None
    return weights[0], biases[0]


def fit_head(
    grid: Grid,
    settings: RunSettings,
    nodes: list[int],
    state: Tensors,
    identities: SiteIdentities,
) -> tuple[Tensors, HeadInit]:
    """``state`` with its head set to the LDA head of the sites' summed statistics.

    Args:
        nodes: The connected sites that may be asked (the roster's members, or all).

    Returns:
        (the state to start round 1 from, what was done). The state is ``state`` itself
        when the seeded head is kept.
    """
    names = _head_names(state)
    if names is None:
        return state, HeadInit("seeded", "the adapter's head has no single weight and bias")
    labels, hidden = state[names[0]].shape
    plan = settings.plan(1).to_config()
    messages = requests(nodes, to_record(state), plan, kind=MessageType.QUERY)
    log.info("head: asking %d site(s) for the statistics of their training rows", len(nodes))
    sent = origins(messages)
    usable: list[tuple[str, HeadStatistics]] = []
    for reply in grid.send_and_receive(messages, timeout=settings.round_timeout):
        node = origin(reply, sent)
        name = identities.name(node)
        if reply.has_error():
            log.warning("head: %s failed: %s", name, reply.error.reason[:200])
            continue
        try:
            site = identities.bind(node, sender(reply))
            stats = decode_head_statistics(reply)
        except (IdentityRejected, ValueError) as exc:
            log.warning("head: statistics of %s rejected: %s", name, exc)
            continue
        if isinstance(stats, Refusal):
            log.info("head: %s refused: %s", site, stats.reason)
            continue
        problem = stats.problem(labels=labels, hidden=hidden)
        if problem is None and stats.rows > MAX_EXAMPLES:
            problem = f"{stats.rows} rows > {MAX_EXAMPLES}"
        if problem is not None:
            log.warning("head: statistics of %s rejected: %s", site, problem)
            continue
        usable.append((site, stats))
    usable.sort(key=lambda item: item[0])  # sums in site order, not arrival order
    if len(usable) < settings.min_fit_clients:
        why = f"{len(usable)} usable site(s) < min-fit-clients={settings.min_fit_clients}"
        log.warning("head: keeping the seeded head: %s", why)
        return state, HeadInit("seeded", why)
    ratio = settings.robust[0] if settings.robust else 0.0
    total, factors = bounded_statistics([s for _, s in usable], max_ratio=ratio)
    for (site, _), factor in zip(usable, factors, strict=True):
        if factor < 1.0:
            log.warning("head: %s's statistics bounded to %.3g of what it sent", site, factor)
    try:
        weight, bias = lda_head(total, shrinkage=settings.head_shrinkage)
    except RoundFailed as exc:
        log.warning("head: keeping the seeded head: %s", exc)
        return state, HeadInit("seeded", str(exc))
    out = dict(state)
    out[names[0]] = weight.astype(state[names[0]].dtype)
    out[names[1]] = bias.astype(state[names[1]].dtype)
    sites = tuple(site for site, _ in usable)
    detail = f"LDA of {total.rows} rows from {len(sites)} site(s)"
    log.info("head: %s", detail)
    return out, HeadInit("lda", detail, sites=sites, rows=total.rows)
