"""The federated round loop: one place that reads top to bottom.

Shaped like Flower's ``Strategy.start``. Before round 1 of a fresh run of a classifier,
the head may be set in closed form from the sites' statistics (``head.init``,
server/head_init.py). For each round: sample sites, configure (the
round plan plus the strategy's client config), send and receive, aggregate (a
`strategies.strategy.Strategy`), the server optimiser's step (FedAvgM or FedAdam; plain
FedAvg by default), evaluate (federated on sites and centrally on a held-out file),
record, checkpoint. A site that crashes or sends a bad update is logged and left out; the
round fails only when fewer than ``min-fit-clients`` valid updates remain, and then
``on-round-failure`` decides whether the run stops or the round is skipped with the
global adapter unchanged.

With ``secagg.enabled`` the round's training runs as Flower's SecAgg+ protocol
(server/secagg.py): the server sees only the weighted mean of the sites' updates, which
the strategy gets instead of single updates (`Strategy.aggregate_mean`); the sites clip
their own (clients/site/mods.py). With client-level DP (``dp.clip-norm``) the strategy is
wrapped in `DifferentiallyPrivate`, which adds Gaussian noise to the mean of the clipped
updates in both kinds of round, and each round is charged to an RDP accountant
(server/privacy.py); ``dp.max-epsilon`` stops the run before a round that would pass it.

Nothing a reply says is taken on trust. Its site id is bound to the Flower node that sent
it (server/identity.py); its metrics are checked against what the plan allowed the site
to do (strategies/validation.py) before they reach the record, the headline or a gate;
the sample-level ε of sites that train with DP-SGD is the server's own account of the
plan it sent (server/privacy.py), not the sites' claims.

The loop uses only ``get_node_ids`` and ``send_and_receive`` of the Grid, and speaks to
the sites through the wire contract (strategies/protocol.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from flwr.app import MessageType
from flwr.serverapp import Grid

from server.checkpoint import Checkpoint, CheckpointStore
from server.head_init import fit_head
from server.identity import IdentityRejected, PinnedIdentities, SiteIdentities
from server.privacy import ClientPrivacy
from server.record import RoundRecord
from server.roster import Roster
from server.secagg import run_secure_round
from server.selection import BestRound
from server.settings import RunSettings
from server.sites import RunSites
from server.tracking import Tracker
from strategies.errors import RoundFailed, UpdateRejected
from strategies.protocol import (
    NO_REPLY,
    NUM_EXAMPLES,
    EvaluateReply,
    NoEvaluation,
    Refusal,
    array_bytes,
    decode_evaluate,
    is_refusal,
    node_name,
    origin,
    origins,
    requests,
    sender,
    to_record,
)
from strategies.sampling import sample_sites, sample_size
from strategies.strategy import MeanUpdate, RoundOutcome, SiteUpdate, Strategy
from strategies.validation import MAX_EXAMPLES, validate_evaluation

log = logging.getLogger(__name__)

# MLflow tag naming what the run's `accuracy`/`loss` metrics were measured on.
HEADLINE_TAG = "fedlora.headline"
# MLflow tag saying where round 1's classification head came from (server/head_init.py).
HEAD_TAG = "fedlora.head-init"
# Central evaluation: global state -> (loss, accuracy)
Evaluator = Callable[[Mapping[str, np.ndarray]], tuple[float, float]]
Tensors = dict[str, np.ndarray]  # adapter tensors by parameter name


def run_rounds(
    grid: Grid,
    settings: RunSettings,
    *,
    initial_state: Tensors,
    tracker: Tracker,
    checkpoints: CheckpointStore,
    evaluator: Evaluator | None = None,
    resume_from: Checkpoint | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    best: BestRound | None = None,
    identities: SiteIdentities | None = None,
    roster: Roster | None = None,
) -> tuple[Tensors, list[dict[str, Any]], str | None]:
    """Run the remaining rounds (none when `resume_from` holds the last one).

    Args:
        best: Kept up to date with the best round on the central held-out file (and
            checkpointed with it); restored from `resume_from` when resuming.
        identities: How replies are bound to sites; default: the roster, else each node
            pinned to the first site id it claims in this run (`PinnedIdentities`).
        roster: The enrolled sites (server/roster.py); only they are sampled and asked to
            evaluate, and their replies are named by it. None: every connected node.

    Returns:
        The final global state, the history (one dict per round) and, if the privacy
        budget stopped the run early, why.
    """
    best = _resumed_best(best if best is not None else BestRound(), resume_from)
    state = resume_from.state if resume_from else initial_state
    server_state = dict(resume_from.server_state) if resume_from else {}
    history = list(resume_from.history) if resume_from else []
    first = resume_from.completed_round + 1 if resume_from else 1
    if first > settings.rounds:  # every round is checkpointed: the run has only its outputs left
        return state, history, None
    connected = wait_for_sites(
        grid, settings.min_available_clients, settings.round_timeout, roster=roster
    )
    identities = identities or (roster if roster is not None else PinnedIdentities())
    privacy = _client_privacy(
        settings, len(connected), history,
        population=_dp_population(roster, connected, history, identities),
    )  # fmt: skip
    strategy = settings.bounded(settings.strategy())
    strategy = privacy.wrap(strategy) if privacy else strategy
    sites = RunSites(identities, settings, history, plan=settings.plan(first))
    if settings.lda_head and resume_from is None:
        state, head = fit_head(grid, settings, connected, state, sites.identities)
        tracker.set_tags({HEAD_TAG: head.tag()})
    for server_round in range(first, settings.rounds + 1):
        record = RoundRecord(round=server_round)
        try:
            nodes, sampled = _sample(grid, settings, roster, server_round)
            absent = None
        except RoundFailed as exc:  # every site gone, none back within round-timeout
            if settings.on_round_failure == "stop":
                raise
            nodes, sampled, absent = [], [], exc
        record.sampled, rate = len(sampled), len(sampled) / len(nodes) if nodes else 0.0
        population = _dp_population(roster, nodes, history, sites.identities)
        if privacy and (stopped := privacy.stop_reason(server_round, rate, population=population)):
            log.warning(stopped)
            return state, history, stopped
        # Configure, send and receive, aggregate, step.
        round_plan = settings.plan(server_round)
        sites.start_round(round_plan)
        plan = round_plan.to_config() | strategy.client_config()
        log.info(
            "round %d/%d: training on %d of %d site(s): %s", server_round, settings.rounds,
            len(sampled), len(nodes), ", ".join(sites.identities.name(n) for n in sampled),
        )  # fmt: skip
        try:
            if absent is not None:
                raise absent
            outcome = _train(grid, settings, strategy, record, sampled, state, plan, sites)
        except RoundFailed as exc:
            if settings.on_round_failure == "stop":
                raise
            log.warning("%s; skipping the round (on-round-failure=skip)", exc)
            record.skipped = True
        else:
            state, server_state = settings.server_optimizer.step(
                state,
                outcome.state,
                server_state,
                spread=outcome.spread,
                num_updates=len(outcome.accepted),
            )
            record.accepted(outcome)
            record.site_privacy = sites.trained(outcome.accepted)
            if privacy:
                privacy.charge(rate)
        if privacy:
            record.privacy(privacy, rate)
        # Evaluate, record, checkpoint.
        record.evaluated(
            federated=_federated_evaluate(grid, settings, nodes, state, plan, record, sites),
            central=evaluator(state) if evaluator else None,
            max_weight_ratio=settings.robust[0] if settings.robust else 0.0,
        )
        if evaluator is not None and not record.skipped:
            best.observe(server_round, record.central_accuracy, state)
        history.append(record.finish())
        tracker.log_round(server_round, record.metrics(), sites=record.site_metrics())
        tracker.set_tags({HEADLINE_TAG: record.headline})
        checkpoints.save(
            _checkpoint(settings, tracker, server_round, state, server_state, history, best)
        )
        if on_round:
            on_round(record)
    return state, history, None


def _resumed_best(best: BestRound, resume_from: Checkpoint | None) -> BestRound:
    """``best`` as the checkpoint left it (unchanged for a fresh run)."""
    if resume_from is not None and resume_from.best_round:
        best.round, best.state = resume_from.best_round, dict(resume_from.best_state)
        best.accuracy = float(resume_from.best_accuracy or float("-inf"))
    return best


def _sample(
    grid: Grid, settings: RunSettings, roster: Roster | None, server_round: int
) -> tuple[list[int], list[int]]:
    """(the nodes that may work, the round's sample of them).

    Seeded by the run and the round, so a resumed run asks what the original would.
    """
    # Every site gone between rounds: wait for one as at the start, up to round-timeout.
    nodes = members(grid, roster) or wait_for_sites(grid, 1, settings.round_timeout, roster=roster)
    k = sample_size(len(nodes), fraction=settings.fraction_train, minimum=settings.min_fit_clients)
    return nodes, sample_sites(nodes, k, seed=settings.spec.seed, server_round=server_round)


def _checkpoint(
    settings: RunSettings,
    tracker: Tracker,
    server_round: int,
    state: Tensors,
    server_state: Mapping[str, Any],
    history: list[dict[str, Any]],
    best: BestRound,
) -> Checkpoint:
    """What a resumed run needs after ``server_round``."""
    return Checkpoint(
        completed_round=server_round,
        state=state,
        history=history,
        run_id=tracker.run_id,
        fingerprint=settings.fingerprint(),
        server_state=dict(server_state),
        best_round=best.round,
        best_accuracy=best.accuracy if best.round else None,
        best_state=best.state,
    )


def members(grid: Grid, roster: Roster | None) -> list[int]:
    """The connected nodes that may be asked to work, sorted: the roster's, or all."""
    nodes = grid.get_node_ids()
    return roster.members(nodes) if roster is not None else sorted(nodes)


def wait_for_sites(
    grid: Grid, minimum: int, timeout: float, *, roster: Roster | None = None
) -> list[int]:
    """The connected member nodes, sorted, once at least ``minimum`` are there."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = members(grid, roster)
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            on = " enrolled" if roster is not None else ""
            raise RoundFailed(
                f"only {len(nodes)}{on} site(s) connected after {timeout:.0f}s, "
                f"min-available-clients={minimum}"
            )
        time.sleep(1.0)


def _dp_population(
    roster: Roster | None,
    nodes: Sequence[int],
    history: Sequence[Mapping[str, Any]],
    identities: SiteIdentities,
) -> int:
    """How many sites a client-level (ε, δ) must cover, for the δ < 1/n rule.

    Every site that contributed to an earlier round of this run (from the history, so a
    resumed run remembers them, a site revoked since included), together with, with a
    roster, every enrolled site (any of them may connect and be sampled later), else the
    sites connected now.
    """
    seen = {site for row in history for site in row.get("site_ids") or ()}
    enrolled = set(roster.sites) if roster is not None else set()
    return len(seen | enrolled | {identities.name(n) for n in nodes})


def _client_privacy(
    settings: RunSettings, connected: int, history: list[dict[str, Any]], *, population: int
) -> ClientPrivacy | None:
    """The run's client-level DP, planned for the share of connected sites a round samples
    (``population``: `_dp_population`, for the δ rule)."""
    if settings.client_dp is None:
        return None
    k = sample_size(connected, fraction=settings.fraction_train, minimum=settings.min_fit_clients)
    return ClientPrivacy.start(
        settings.client_dp,
        planned_rate=k / connected,
        rounds=settings.rounds,
        history=history,
        population=population,
    )


def _train(
    grid: Grid,
    settings: RunSettings,
    strategy: Strategy,
    record: RoundRecord,
    sampled: list[int],
    state: Tensors,
    plan: dict[str, Any],
    sites: RunSites,
) -> RoundOutcome:
    """Send the round to the sampled sites; the strategy aggregates what comes back.

    Raises:
        RoundFailed: If the round cannot be aggregated.
    """
    if settings.secagg is None:
        updates = _plain_updates(grid, record, sampled, state, plan, settings.round_timeout, sites)
        return strategy.aggregate(record.round, state, updates)
    mean = _secure_mean(grid, settings, record, sampled, state, plan, sites)
    return strategy.aggregate_mean(record.round, state, mean)


def _plain_updates(
    grid: Grid,
    record: RoundRecord,
    sampled: list[int],
    state: Tensors,
    plan: dict[str, Any],
    timeout: float,
    sites: RunSites,
) -> list[SiteUpdate]:
    """Send the global adapter to the sampled sites and judge their replies.

    A reply is named by `RunSites.identities` (the roster's enrolment, or the site id its
    node claimed first in this run); one that claims another site's id is rejected
    (check ``identity``).
    """
    arrays = to_record(state)
    record.bytes_down = arrays.count_bytes() * len(sampled)
    messages = requests(sampled, arrays, plan, kind=MessageType.TRAIN)
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    sent = origins(messages)
    updates: list[SiteUpdate] = []
    for reply in replies:
        node = origin(reply, sent)
        if reply.has_error():
            record.failed_site(sites.identities.name(node), reply.error.reason)
            continue
        record.replies += 1
        record.bytes_up += array_bytes(reply)
        try:
            judged = sites.train_update(reply)
        except IdentityRejected as exc:
            record.rejected_update(sites.identities.name(node), "identity", str(exc))
            continue
        except UpdateRejected as exc:
            record.rejected_update(sites.identities.name(node), exc.check, exc.detail)
            continue
        if isinstance(judged, Refusal):
            record.refused_site(judged.site, judged.reason)
        else:
            updates.append(judged)
    for node in sorted(set(sampled) - {origin(r, sent) for r in replies}):
        record.failed_site(sites.identities.name(node), NO_REPLY)
    # Replies arrive in whatever order the sites finish; the float sums of the aggregate
    # must not depend on it, or two identical runs would differ in the last bits.
    return sorted(updates, key=lambda u: u.site)


def _secure_mean(
    grid: Grid,
    settings: RunSettings,
    record: RoundRecord,
    sampled: list[int],
    state: Tensors,
    plan: dict[str, Any],
    sites: RunSites,
) -> MeanUpdate:
    """One SecAgg+ round's mean update and who contributed to it.

    A contributor's masked update is in the sum whatever it claims, so a claim the
    server refuses costs the site its name (it is named by its node) or its metrics,
    never the round.

    Raises:
        RoundFailed: If SecAgg+ cannot run on the sample or could not unmask a sum.
    """
    secagg = settings.secagg
    assert secagg is not None
    why = secagg.check_sites(len(sampled))
    if why:
        raise RoundFailed(f"round {record.round}: SecAgg+ cannot run: {why}")
    secure = run_secure_round(
        grid,
        secagg,
        nodes=sampled,
        state=state,
        plan=plan,
        server_round=record.round,
        timeout=settings.round_timeout,
    )
    record.bytes_up, record.bytes_down = secure.bytes_up, secure.bytes_down
    record.replies = len(secure.sites)
    # Under SecAgg+ a budget refusal arrives as the site's error (a dropout).
    for failure in secure.failures:
        note = record.refused_site if is_refusal(failure["reason"]) else record.failed_site
        note(_named(failure["site"], sites.identities), failure["reason"])
    if secure.mean_update is None:
        raise RoundFailed(
            f"round {record.round}: SecAgg+ aggregated {len(secure.sites)} site(s) "
            f"(reconstruction threshold {secagg.reconstruction_threshold}, "
            f"min-fit-clients {settings.min_fit_clients})"
        )
    why = secagg.check_mean(secure.mean_update, [w for _, _, w, _ in secure.sites])
    if why:
        raise RoundFailed(f"round {record.round}: {why}")
    # Flower's mod scales a site's update by weight / max-weight without clamping, and the
    # sum's divisor takes the same weight: one site reporting more than the plan's max
    # weight (1 when sites weigh alike) shrinks everyone else's share of the mean.
    limit = 1 if plan.get("uniform_weight") else secagg.max_weight
    why_limit = "sites weigh alike" if plan.get("uniform_weight") else "secagg.max-weight"
    for node, claimed, weight, _ in secure.sites:
        if not 0 < weight <= limit:
            raise RoundFailed(
                f"round {record.round}: {node_name(node)} ({claimed[:80]!r}) reported SecAgg+ "
                f"weight {weight}, outside 1..{limit} ({why_limit}): the secure mean is not "
                "the sites' mean"
            )
    forged = secure.weight_forgery()
    if forged:
        raise RoundFailed(f"round {record.round}: {forged}")
    contributors = []
    for node, claimed, weight, metrics in secure.sites:
        try:
            site = sites.identities.bind(node, claimed)
        except IdentityRejected as exc:
            site = sites.identities.name(node)
            record.rejected_update(site, "identity", f"{exc}; named by its node")
        # The weight is 1 under client-level DP; the site's claimed count is a metric.
        count = metrics.get(NUM_EXAMPLES, weight)
        if not (isinstance(count, int | float) and 0 < count <= MAX_EXAMPLES and count % 1 == 0):
            record.rejected_update(site, "num-examples", f"num-examples={count!r}; weight used")
            count = weight
        update = SiteUpdate(site, {}, num_examples=int(count), metrics=metrics)
        try:
            checked = sites.checked_metrics(update)
        except UpdateRejected as exc:
            checked = {}
            record.rejected_update(site, exc.check, f"{exc.detail}; metrics dropped")
        contributors.append(replace(update, metrics=checked))
    return MeanUpdate(delta=secure.mean_update, sites=contributors)


def _named(name: str, identities: SiteIdentities) -> str:
    """A ``node-N`` name as the site id its node is known by (roster or earlier claim)."""
    if name.startswith("node-") and name[5:].isdigit():
        return identities.name(int(name[5:]))
    return name


def _federated_evaluate(
    grid: Grid,
    settings: RunSettings,
    nodes: list[int],
    state: Tensors,
    plan: dict[str, Any],
    record: RoundRecord,
    sites: RunSites,
) -> list[EvaluateReply | NoEvaluation] | None:
    """The sites' evaluations of the global adapter on their held-out rows, and the sites
    that hold none out.

    Each reply is bound to its node and checked (counts no larger than what the site
    trained on, loss finite, accuracy in [0, 1]); `RoundRecord.evaluated` caps the counts
    like training weights under bounded influence, so no site's claim becomes the headline.
    """
    if settings.fraction_evaluate <= 0 or not nodes:
        return None
    k = sample_size(len(nodes), fraction=settings.fraction_evaluate, minimum=1)
    messages = requests(nodes[:k], to_record(state), plan, kind=MessageType.EVALUATE)
    results: list[EvaluateReply | NoEvaluation] = []
    for reply in grid.send_and_receive(messages, timeout=settings.round_timeout):
        if reply.has_error():
            continue
        node = reply.metadata.src_node_id
        try:
            site = sites.identities.bind(node, sender(reply))
            result = decode_evaluate(reply)
            if isinstance(result, EvaluateReply):
                if result.num_examples == 0:
                    continue  # nothing evaluated
                validate_evaluation(result, trained_on=sites.examples.get(site))
        except IdentityRejected as exc:
            record.rejected_update(sites.identities.name(node), "identity", f"evaluation: {exc}")
            continue
        except (ValueError, UpdateRejected) as exc:
            record.rejected_update(sites.identities.name(node), "evaluation", str(exc))
            continue
        results.append(result)
    return sorted(results, key=lambda r: r.site)
