"""The federated round loop: one place that reads top to bottom.

For each round: sample sites, send the global adapter and the round plan, collect the
replies, let the strategy validate and average them, apply the server optimiser
(FedAvgM or FedAdam; plain FedAvg by default), evaluate (federated on sites and
centrally on a held-out file), track, checkpoint. A site that crashes or sends a bad
update is logged and left out; the round fails only when fewer than ``min-fit-clients``
valid updates remain, and then ``on-round-failure`` decides whether the run stops or the
round is skipped with the global adapter unchanged.

With ``secagg.enabled`` the round's training runs as Flower's SecAgg+ protocol
(server/secagg.py): the server sees only the weighted mean of the sites' updates, so it
cannot validate single updates; the sites clip their own (clients/site/mods.py). With
client-level DP (``dp.clip-norm``) the server adds Gaussian noise to the mean of the
clipped updates (strategies/dp.py) and charges the round to an RDP accountant
(server/privacy.py); ``dp.max-epsilon`` stops the run before a round that would pass it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from clients.task.errors import BudgetRefused, RoundFailed
from clients.task.plan import NO_EVALUATION
from server.checkpoint import Checkpoint, CheckpointStore
from server.privacy import PrivacyLedger, solve_noise_multiplier
from server.secagg import run_secure_round
from server.selection import BestRound
from server.settings import RunSettings
from server.tracking import Tracker
from strategies.dp import ClientLevelDP, DifferentiallyPrivate
from strategies.fedavg import RoundOutcome, SiteUpdate
from strategies.records import from_record, to_record

log = logging.getLogger(__name__)

# MLflow tag naming what the run's `accuracy`/`loss` metrics were measured on.
HEADLINE_TAG = "fedlora.headline"
# Central evaluation: global state -> (loss, accuracy)
Evaluator = Callable[[Mapping[str, np.ndarray]], tuple[float, float]]


@dataclass
class RoundRecord:
    """What one round did; a row of metrics.json."""

    round: int
    loss: float | None = None
    accuracy: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    sites: int = 0
    rejected: int = 0
    failed: int = 0
    train_loss: float | None = None
    federated_loss: float | None = None
    federated_accuracy: float | None = None
    central_loss: float | None = None
    central_accuracy: float | None = None
    site_ids: list[str] = field(default_factory=list)
    rejections: list[dict[str, str]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    skipped: bool = False
    max_site_train_seconds: float = 0.0
    # Client-level DP: the (ε, δ) spent after this round and the mechanism's parameters.
    epsilon: float | None = None
    delta: float | None = None
    guarantee: str | None = None
    noise_multiplier: float | None = None
    sampling_rate: float | None = None
    # Sites that refused the round to stay within their own privacy budget.
    refused: int = 0
    refusals: list[dict[str, str]] = field(default_factory=list)
    # Sample-level DP: per site, its (ε, δ) for this run and its DP-SGD parameters.
    site_privacy: dict[str, dict[str, float]] = field(default_factory=dict)
    # What `accuracy`/`loss` were measured on (`headline_source`), how many sites sent a
    # federated evaluation, and the sites that hold no rows out (with their reason).
    headline: str = ""
    evaluated_sites: int = 0
    unevaluated: list[dict[str, str]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Numeric fields for MLflow."""
        out: dict[str, float] = {}
        for key, value in asdict(self).items():
            if key != "round" and isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = float(value)
        out["skipped"] = float(self.skipped)
        return out


def headline_source(*, central: bool, evaluated_sites: int) -> str:
    """Name the data behind a round's headline accuracy (metrics.json and MLflow)."""
    if central:
        return "central held-out file (eval-file)"
    if evaluated_sites:
        return f"federated mean over {evaluated_sites} site(s) with held-out rows"
    return "none: no eval-file and no site holds rows out"


def wait_for_sites(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise RoundFailed(
                f"only {len(nodes)} site(s) connected after {timeout:.0f}s, "
                f"min-available-clients={minimum}"
            )
        time.sleep(1.0)


def _site_id(reply: Message) -> str:
    if not reply.has_error() and "site" in reply.content.config_records:
        return str(reply.content.config_records["site"].get("site-id", ""))
    return f"node-{reply.metadata.src_node_id}"


def _messages(
    nodes: Iterable[int], state: ArrayRecord, config: dict[str, Any], kind: str
) -> list[Message]:
    content = RecordDict({"arrays": state, "config": ConfigRecord(config)})
    return [Message(content=content, message_type=kind, dst_node_id=n) for n in nodes]


def _decode(reply: Message) -> SiteUpdate:
    """Turn a train reply into a SiteUpdate; a malformed reply raises ValueError."""
    content = reply.content
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        raise ValueError("reply lacks 'arrays' or 'metrics'")
    metrics = dict(content.metric_records["metrics"])
    state = from_record(content.array_records["arrays"])
    return SiteUpdate(
        site=_site_id(reply),
        state=state,
        num_examples=metrics.pop("num-examples", None),
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
    )


def _plain_round(
    grid: Grid,
    record: RoundRecord,
    sampled: list[int],
    global_record: ArrayRecord,
    plan: dict[str, Any],
    timeout: float,
) -> list[SiteUpdate]:
    """Send the global adapter to the sampled sites and decode their replies."""
    record.bytes_down = global_record.count_bytes() * len(sampled)
    replies = grid.send_and_receive(
        _messages(sampled, global_record, plan, MessageType.TRAIN), timeout=timeout
    )
    updates: list[SiteUpdate] = []
    for reply in replies:
        site = _site_id(reply)
        if reply.has_error():
            log.warning("round %d: site %s failed: %s", record.round, site, reply.error.reason)
            record.failures.append({"site": site, "reason": reply.error.reason})
            continue
        if "refusal" in reply.content.config_records:
            reason = str(reply.content.config_records["refusal"].get("reason", ""))
            log.warning("round %d: site %s refused: %s", record.round, site, reason)
            record.refusals.append({"site": site, "reason": reason})
            continue
        record.bytes_up += sum(r.count_bytes() for r in reply.content.array_records.values())
        try:
            updates.append(_decode(reply))
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("round %d: site %s sent a malformed reply: %s", record.round, site, exc)
            record.rejections.append({"site": site, "check": "format", "detail": str(exc)})
    for node in set(sampled) - {r.metadata.src_node_id for r in replies}:
        record.failures.append({"site": f"node-{node}", "reason": "no reply before timeout"})
    # Replies arrive in whatever order the sites finish; the float sums of the aggregate
    # must not depend on it, or two identical runs would differ in the last bits.
    return sorted(updates, key=lambda u: u.site)


def _secure_round(
    grid: Grid,
    settings: RunSettings,
    record: RoundRecord,
    sampled: list[int],
    state: dict[str, np.ndarray],
    plan: dict[str, Any],
    dp: ClientLevelDP | None,
    rng: np.random.Generator,
) -> RoundOutcome:
    """One SecAgg+ round; raises RoundFailed if it cannot complete."""
    assert settings.secagg is not None
    why = settings.secagg.check_sites(len(sampled))
    if why:
        raise RoundFailed(f"round {record.round}: SecAgg+ cannot run: {why}")
    secure = run_secure_round(
        grid,
        settings.secagg,
        nodes=sampled,
        state=state,
        plan=plan,
        server_round=record.round,
        timeout=settings.round_timeout,
    )
    record.bytes_up, record.bytes_down = secure.bytes_up, secure.bytes_down
    # Under SecAgg+ a budget refusal arrives as the site's error (a dropout).
    for failure in secure.failures:
        refused = BudgetRefused.MARK in failure["reason"]
        (record.refusals if refused else record.failures).append(failure)
    if secure.mean_update is None or len(secure.sites) < settings.min_fit_clients:
        raise RoundFailed(
            f"round {record.round}: SecAgg+ aggregated {len(secure.sites)} site(s) "
            f"(reconstruction threshold {settings.secagg.reconstruction_threshold}, "
            f"min-fit-clients {settings.min_fit_clients})"
        )
    if not all(np.all(np.isfinite(v)) for v in secure.mean_update.values()):
        raise RoundFailed(f"round {record.round}: the secure aggregate is not finite")
    mean = {k: (state[k].astype(np.float64) + secure.mean_update[k]) for k in state}
    if dp is not None:
        new = dp.privatize_mean(state, mean, num_updates=len(secure.sites), rng=rng)
    else:
        new = {k: mean[k].astype(state[k].dtype) for k in state}
    accepted = [
        SiteUpdate(site=site, state={}, num_examples=int(m.get("num-examples", w)), metrics=m)
        for site, w, m in secure.sites
    ]
    return RoundOutcome(state=new, accepted=accepted, rejected=[])


def _weighted(values: list[tuple[float, int]]) -> float | None:
    total = sum(n for _, n in values)
    return sum(v * n for v, n in values) / total if total else None


def _federated_evaluate(
    grid: Grid,
    nodes: list[int],
    state: ArrayRecord,
    config: dict[str, Any],
    timeout: float,
    record: RoundRecord,
) -> tuple[float | None, float | None]:
    """Example-weighted mean loss and accuracy over the sites that hold rows out.

    Sites without held-out rows say so and are listed in ``record.unevaluated``.
    """
    replies = grid.send_and_receive(
        _messages(nodes, state, config, MessageType.EVALUATE), timeout=timeout
    )
    losses, accs = [], []
    for reply in replies:
        if reply.has_error() or "metrics" not in reply.content.metric_records:
            continue
        site = reply.content.config_records.get("site")
        if site is not None and NO_EVALUATION in site:
            record.unevaluated.append({"site": _site_id(reply), "reason": str(site[NO_EVALUATION])})
            continue
        m = reply.content.metric_records["metrics"]
        n = int(m.get("num-examples", 0))  # type: ignore[arg-type]
        if n > 0 and np.isfinite(m.get("loss", np.nan)):  # type: ignore[arg-type]
            losses.append((float(m["loss"]), n))  # type: ignore[arg-type]
            accs.append((float(m["accuracy"]), n))  # type: ignore[arg-type]
    record.evaluated_sites = len(accs)
    return _weighted(losses), _weighted(accs)


def run_rounds(
    grid: Grid,
    settings: RunSettings,
    *,
    initial_state: dict[str, np.ndarray],
    tracker: Tracker,
    checkpoints: CheckpointStore,
    evaluator: Evaluator | None = None,
    resume_from: Checkpoint | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    best: BestRound | None = None,
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]], str | None]:
    """Run the remaining rounds.

    Args:
        best: Kept up to date with the best round on the central held-out file (and
            checkpointed with it); restored from `resume_from` when resuming.

    Returns:
        The final global state, the history (one dict per round) and, if the privacy
        budget stopped the run early, why.
    """
    best = best if best is not None else BestRound()
    if resume_from is not None and resume_from.best_round:
        best.round, best.state = resume_from.best_round, dict(resume_from.best_state)
        best.accuracy = float(resume_from.best_accuracy or float("-inf"))
    strategy = settings.strategy()
    optimizer = settings.server_optimizer
    state = resume_from.state if resume_from else initial_state
    server_state = dict(resume_from.server_state) if resume_from else {}
    history = list(resume_from.history) if resume_from else []
    first = resume_from.completed_round + 1 if resume_from else 1
    # Site sampling is seeded by the run so a resumed run samples what the original would.
    rng = random.Random(settings.spec.seed)
    for _ in range(first - 1):
        rng.random()

    wait_for_sites(grid, settings.min_available_clients, settings.round_timeout)
    dp, ledger = _client_dp(grid, settings, history)
    # Server-side DP noise: seeded from the OS, never from the run, so no site can predict it.
    noise_rng = np.random.default_rng()
    stopped: str | None = None
    for server_round in range(first, settings.rounds + 1):
        started = time.perf_counter()
        record = RoundRecord(round=server_round)
        nodes = sorted(grid.get_node_ids())
        k = max(settings.min_fit_clients, round(settings.fraction_train * len(nodes)))
        sampled = sorted(random.Random(rng.random()).sample(nodes, min(k, len(nodes))))
        sampling_rate = len(sampled) / len(nodes)
        if dp is not None and ledger is not None and settings.client_dp is not None:
            limit = settings.client_dp.max_epsilon
            after = ledger.epsilon_after(
                noise_multiplier=dp.noise_multiplier, sampling_rate=sampling_rate
            )
            if limit > 0 and after > limit:
                stopped = (
                    f"stopped before round {server_round}: client-level ε would reach "
                    f"{after:.4g} > dp.max-epsilon={limit}"
                )
                log.warning(stopped)
                break
        plan = settings.plan(server_round).to_config() | strategy.client_config()
        log.info("round %d/%d: training on %d site(s)", server_round, settings.rounds, len(sampled))

        try:
            if settings.secagg is not None:
                outcome = _secure_round(grid, settings, record, sampled, state, plan, dp, noise_rng)
            else:
                updates = _plain_round(
                    grid, record, sampled, to_record(state), plan, settings.round_timeout
                )
                wrapped = (
                    DifferentiallyPrivate(strategy, dp, noise_rng) if dp is not None else strategy
                )
                outcome = wrapped.aggregate(server_round, state, updates)
        except RoundFailed as exc:
            if settings.on_round_failure == "stop":
                raise
            log.warning("%s; skipping the round (on-round-failure=skip)", exc)
            record.skipped = True
        else:
            state, server_state = optimizer.step(
                state,
                outcome.state,
                server_state,
                spread=outcome.spread,
                num_updates=len(outcome.accepted),
            )
            record.rejections += [asdict(r) for r in outcome.rejected]
            record.site_ids = [u.site for u in outcome.accepted]
            record.sites = len(outcome.accepted)
            record.train_loss = _weighted(
                [
                    (u.metrics["train-loss"], int(u.num_examples))  # type: ignore[call-overload]
                    for u in outcome.accepted
                    if "train-loss" in u.metrics
                ]
            )
            record.max_site_train_seconds = max(
                (u.metrics.get("train-seconds", 0.0) for u in outcome.accepted), default=0.0
            )
            record.site_privacy = {
                u.site: {
                    "epsilon": u.metrics["site-epsilon"],
                    "delta": u.metrics["site-delta"],
                    "noise-multiplier": u.metrics["site-noise-multiplier"],
                    "max-grad-norm": u.metrics["site-max-grad-norm"],
                }
                for u in outcome.accepted
                if "site-epsilon" in u.metrics
            }
            if dp is not None and ledger is not None:
                ledger.step(noise_multiplier=dp.noise_multiplier, sampling_rate=sampling_rate)
        if dp is not None and ledger is not None:
            record.epsilon = ledger.epsilon
            record.delta = ledger.delta
            record.guarantee = "client-level"
            record.noise_multiplier = dp.noise_multiplier
            record.sampling_rate = None if record.skipped else sampling_rate
        record.rejected = len(record.rejections)
        record.failed = len(record.failures)
        record.refused = len(record.refusals)

        final_record = to_record(state)
        if settings.fraction_evaluate > 0:
            n_eval = max(1, round(settings.fraction_evaluate * len(nodes)))
            record.federated_loss, record.federated_accuracy = _federated_evaluate(
                grid, nodes[:n_eval], final_record, plan, settings.round_timeout, record
            )
        if evaluator is not None:
            record.central_loss, record.central_accuracy = evaluator(state)
            if not record.skipped:
                best.observe(server_round, record.central_accuracy, state)
        # The headline numbers: central evaluation when there is a held-out file, else the
        # mean over the sites that hold rows out; `headline` says which.
        record.loss = record.central_loss if evaluator else record.federated_loss
        record.accuracy = record.central_accuracy if evaluator else record.federated_accuracy
        record.headline = headline_source(
            central=evaluator is not None, evaluated_sites=record.evaluated_sites
        )
        record.seconds = time.perf_counter() - started

        history.append(asdict(record))
        tracker.log_round(server_round, record.metrics())
        tracker.set_tags({HEADLINE_TAG: record.headline})
        checkpoints.save(
            Checkpoint(
                completed_round=server_round,
                state=state,
                history=history,
                run_id=tracker.run_id,
                fingerprint=settings.fingerprint(),
                server_state=server_state,
                best_round=best.round,
                best_accuracy=best.accuracy if best.round else None,
                best_state=best.state,
            )
        )
        if on_round:
            on_round(record)
    return state, history, stopped


def _client_dp(
    grid: Grid, settings: RunSettings, history: list[dict[str, Any]]
) -> tuple[ClientLevelDP | None, PrivacyLedger | None]:
    """The DP mechanism of this run (solving z for a target ε) and its ledger so far."""
    cfg = settings.client_dp
    if cfg is None:
        return None, None
    z = cfg.noise_multiplier
    if cfg.target_epsilon > 0:
        # Planned sampling rate: the share of the sites connected now a round samples.
        n = len(grid.get_node_ids())
        k = min(n, max(settings.min_fit_clients, round(settings.fraction_train * n)))
        z = solve_noise_multiplier(
            target_epsilon=cfg.target_epsilon,
            delta=cfg.delta,
            sampling_rate=k / n,
            rounds=settings.rounds,
        )
        log.info("client-level DP: noise multiplier %.4g for ε=%s", z, cfg.target_epsilon)
    released = [
        (float(row["noise_multiplier"]), float(row["sampling_rate"]))
        for row in history
        if row.get("sampling_rate") is not None
    ]
    return ClientLevelDP(clip_norm=cfg.clip_norm, noise_multiplier=z), PrivacyLedger.replay(
        cfg.delta, released
    )
