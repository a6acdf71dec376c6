"""Privacy accounting of client-level DP across rounds, on Opacus' RDP accountant.

Each round that releases a noisy aggregate is one step of the subsampled Gaussian
mechanism with noise multiplier ``z`` and sampling rate ``q = sampled / connected`` sites
(Mironov et al. 2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism").
The analysis assumes Poisson sampling; fedlora samples a fixed number of sites without
replacement, the usual approximation (also Flower's). A skipped round releases nothing
and is not charged. `ClientPrivacy` ties a run's mechanism to its ledger: it wraps the
run's strategy in `DifferentiallyPrivate` and says when ``dp.max-epsilon`` stops the run.

Sample-level DP (DP-SGD) runs at the sites, where the server cannot watch it. Its ε in
the run's record is the server's own figure (`SampleLevelAccounts`): what the round plan
the server sent (noise multiplier, steps, batch size) gives with the example count each
site claimed, never a number copied from a reply. Under ``site-dp.target-epsilon`` the
noise multiplier is the one the server solves for the site's claimed count, exactly as
the site does (`TrainPlan.sample_dp`); the site must state at least that much
(server/sites.py), so the recorded ε is the largest any accepted site's DP-SGD gives.
It holds only if the site trained as planned, so the summary marks it ``verified: false``
and no promotion gate or policy counts it as DP (registry/artifact.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opacus.accountants import RDPAccountant

from clients.task import dpsgd
from clients.task.errors import ConfigError
from clients.task.plan import TrainPlan
from clients.task.secure_random import SecureRandom
from strategies.dp import ClientLevelDP, DifferentiallyPrivate
from strategies.secagg import PRGS, SecAggSettings
from strategies.strategy import Strategy

if TYPE_CHECKING:
    from server.settings import ClientDPSettings

ACCOUNTANT = "rdp"
log = logging.getLogger(__name__)


def solve_noise_multiplier(
    *, target_epsilon: float, delta: float, sampling_rate: float, rounds: int
) -> float:
    """The smallest ``z`` (to Opacus' tolerance) whose ε after ``rounds`` is ≤ the target:
    `clients.task.dpsgd.solve_noise_multiplier` with one step per round.

    Raises:
        ConfigError: Naming ``dp.target-epsilon`` if no noise multiplier reaches it.
    """
    return dpsgd.solve_noise_multiplier(
        target_epsilon=target_epsilon,
        delta=delta,
        sampling_rate=sampling_rate,
        steps=rounds,
        setting="dp.target-epsilon",
        delta_setting="dp.delta",
        step_name="round",
    )


@dataclass
class PrivacyLedger:
    """The (z, q) of every released round and the (ε, δ) they add up to."""

    delta: float

    def __post_init__(self) -> None:
        self._accountant = RDPAccountant()

    @classmethod
    def replay(cls, delta: float, steps: Iterable[tuple[float, float]]) -> PrivacyLedger:
        """Rebuild the ledger from earlier rounds' (noise multiplier, sampling rate)."""
        ledger = cls(delta)
        for z, q in steps:
            ledger.step(noise_multiplier=z, sampling_rate=q)
        return ledger

    def step(self, *, noise_multiplier: float, sampling_rate: float) -> None:
        self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sampling_rate)

    @property
    def epsilon(self) -> float:
        return (
            float(self._accountant.get_epsilon(delta=self.delta))
            if self._accountant.history
            else 0.0
        )

    def epsilon_after(self, *, noise_multiplier: float, sampling_rate: float) -> float:
        """ε if one more round with (z, q) were released; the ledger is unchanged."""
        trial = PrivacyLedger.replay(self.delta, self.steps())
        trial.step(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate)
        return trial.epsilon

    def steps(self) -> list[tuple[float, float]]:
        return [(z, q) for z, q, n in self._accountant.history for _ in range(n)]


@dataclass
class ClientPrivacy:
    """Client-level DP of one run: the mechanism, the ledger so far and the ε limit."""

    mechanism: ClientLevelDP
    ledger: PrivacyLedger
    max_epsilon: float = 0.0

    @classmethod
    def start(
        cls,
        settings: ClientDPSettings,
        *,
        planned_rate: float,
        rounds: int,
        history: Iterable[Mapping[str, Any]],
        population: int,
    ) -> ClientPrivacy:
        """The run's mechanism (``z`` solved for ``dp.target-epsilon`` at the planned
        sampling rate) and a ledger replaying the rounds ``history`` released.

        Args:
            population: The sites that may be sampled (connected members). δ must be below
                ``1 / population``: at δ ≥ 1/n, publishing one site's update in the clear
                is (0, δ)-DP, so the guarantee would protect no site (Dwork and Roth 2014,
                "The Algorithmic Foundations of Differential Privacy", §2.3).

        Raises:
            ConfigError: If the target ε is unreachable or δ is not below 1/population.
        """
        if problem := _delta_problem(settings.delta, population):
            raise ConfigError(problem)
        z = settings.noise_multiplier
        if settings.target_epsilon > 0:
            z = solve_noise_multiplier(
                target_epsilon=settings.target_epsilon,
                delta=settings.delta,
                sampling_rate=planned_rate,
                rounds=rounds,
            )
            log.info("client-level DP: noise multiplier %.4g for ε=%s", z, settings.target_epsilon)
        released = [
            (float(row["noise_multiplier"]), float(row["sampling_rate"]))
            for row in history
            if row.get("sampling_rate") is not None
        ]
        return cls(
            mechanism=ClientLevelDP(clip_norm=settings.clip_norm, noise_multiplier=z),
            ledger=PrivacyLedger.replay(settings.delta, released),
            max_epsilon=settings.max_epsilon,
        )

    def wrap(self, strategy: Strategy) -> Strategy:
        """The run's strategy with the mechanism's clipping and noise on every aggregate."""
        # Server-side DP noise from the OS CSPRNG, never from the run: no site can predict it.
        return DifferentiallyPrivate(strategy, self.mechanism, SecureRandom())

    def stop_reason(
        self, server_round: int, sampling_rate: float, *, population: int
    ) -> str | None:
        """Why the run must stop before this round, or None.

        Args:
            population: The sites that may be sampled this round. More sites than at the
                start can push 1/population down to δ; the round is not run then (the
                check `start` made, made again every round).

        Fails closed: an ε that is NaN (not comparable) stops the run too, as does ε
        passing ``dp.max-epsilon``.
        """
        if problem := _delta_problem(self.ledger.delta, population):
            return f"stopped before round {server_round}: {problem}"
        if self.max_epsilon <= 0:
            return None
        after = self.ledger.epsilon_after(
            noise_multiplier=self.mechanism.noise_multiplier, sampling_rate=sampling_rate
        )
        if not after <= self.max_epsilon:
            return (
                f"stopped before round {server_round}: client-level ε would reach "
                f"{after:.4g} > dp.max-epsilon={self.max_epsilon}"
            )
        return None

    def charge(self, sampling_rate: float) -> None:
        """Account one released round."""
        self.ledger.step(
            noise_multiplier=self.mechanism.noise_multiplier, sampling_rate=sampling_rate
        )


def _delta_problem(delta: float, population: int) -> str | None:
    """Why δ protects no site among ``population``, or None."""
    if delta < 1 / max(population, 1):
        return None
    return (
        f"dp.delta={delta!r} must be < 1/{population} (the {population} sites the run "
        "covers: enrolled, connected, or in an earlier round; a connected node that has not "
        "named its site yet counts as one more): at δ >= 1/n a mechanism may publish one "
        "site's update in the clear and still claim (ε, δ)-DP"
    )


@dataclass
class SampleLevelAccounts:
    """Per site, the DP-SGD steps the plan gave it this run, and the ε they add up to."""

    delta: float
    steps: dict[str, list[tuple[float, float, int]]] = field(default_factory=dict)

    @classmethod
    def replay(cls, delta: float, history: Iterable[Mapping[str, Any]]) -> SampleLevelAccounts:
        """Rebuild from the rounds' records (a resumed run)."""
        accounts = cls(delta)
        for row in history:
            for site, entry in (row.get("site_privacy") or {}).items():
                accounts.steps.setdefault(site, []).append(
                    (
                        float(entry["noise-multiplier"]),
                        float(entry["sampling-rate"]),
                        int(entry["steps"]),
                    )
                )
        return accounts

    def charge(self, site: str, *, noise_multiplier: float, num_examples: int, plan: TrainPlan):
        """Account one round the site trained in; return its record entry."""
        rate = plan.sampling_rate(num_examples)
        steps = plan.steps_for(num_examples)
        history = [*self.steps.get(site, []), (noise_multiplier, rate, steps)]
        # ε first: a step the accountant refuses (ConfigError) is not kept in the history.
        epsilon = dpsgd.site_epsilon(history, delta=self.delta)
        self.steps[site] = history
        return {
            "epsilon": epsilon,
            "delta": self.delta,
            "noise-multiplier": noise_multiplier,
            "max-grad-norm": plan.site_dp_max_grad_norm,
            "sampling-rate": rate,
            "steps": steps,
        }


def privacy_summary(
    *,
    history: list[Mapping[str, Any]],
    clip_norm: float | None,
    secagg: SecAggSettings | None,
) -> dict[str, Any]:
    """The ``privacy`` object of metrics.json: one entry per guarantee in effect.

    ``{}`` when the run used no privacy mechanism. The registry copies it verbatim into
    the adapter's provenance.
    """
    out: dict[str, Any] = {}
    released = [r for r in history if r.get("sampling_rate") is not None]
    accounted = [r for r in history if r.get("guarantee") == "client-level"]
    if clip_norm is not None and accounted:
        last = accounted[-1]
        rates = sorted({float(r["sampling_rate"]) for r in released})
        out["client-level"] = {
            "epsilon": last["epsilon"],
            "delta": last["delta"],
            "noise-multiplier": last["noise_multiplier"],
            "clip-norm": clip_norm,
            # The largest rate used: ε was accounted round by round with the actual one.
            "sampling-rate": rates[-1] if rates else None,
            "rounds": len(released),
            "accountant": ACCOUNTANT,
        }
    sites: dict[str, Any] = {}
    for row in history:  # a site's latest figures: its ε for the whole run so far
        sites.update(row.get("site_privacy") or {})
    if sites:
        out["sample-level"] = {
            "sites": sites,
            "accountant": ACCOUNTANT,
            # DP-SGD ran at the sites; the server computed ε from its plan and the sites'
            # claimed example counts and cannot check that a site really added the noise.
            "verified": False,
        }
    if secagg is not None:
        out["secure-aggregation"] = {
            "enabled": True,
            "num-shares": secagg.num_shares,
            "reconstruction-threshold": secagg.reconstruction_threshold,
            "clipping-range": secagg.clipping_range,
            "quantization-range": secagg.quantization_range,
            "max-weight": secagg.max_weight,
            "prg": PRGS[secagg.prg],
        }
    return out
