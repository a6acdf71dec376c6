"""The site's privacy-budget ledger: sample-level ε spent per run and in total.

The site, not the server, enforces its budget. Before it trains a DP-SGD round it asks
`SiteLedger.epsilon_after` what the round would bring the total to and refuses if that
passes the site's ``max-epsilon``; otherwise it *charges the round first*
(`SiteLedger.charge`) and only then trains. Charging before training, rather than before
sending, means a crash or SIGKILL anywhere in the round leaves the round already counted:
the ledger can over-count a round whose update never left the site, but can never
under-count one that did, so a restarted site never exceeds its budget.

Three properties keep the total honest:

- **One writer at a time.** Flower starts a fresh ClientApp process per message, and two
  SuperNodes may share a state directory, so check-and-charge runs under an exclusive
  lock on ``STATE/privacy-ledger.lock`` (`SiteLedger.locked`, ``flock``): a second
  process waits and then sees the first one's charge.
- **No silent restart.** A site with a budget never creates its ledger by itself: a
  missing ledger is refused (`LedgerMissing`) until the site admin runs
  ``fedlora site budget --state DIR --reset --reason "..."`` (`SiteLedger.reset`), which
  writes a new ledger that records the reset, its reason and what was there before. So a
  deleted or lost ledger is noticed, not read as "nothing spent".
- **Only valid charges.** A round's parameters and the ε they yield are checked
  (`check_epsilon`): ε is finite and never negative, δ stays the run's, and the total
  never goes down.

The file (``STATE/privacy-ledger.json``) is replaced with `write_atomic` (temporary file,
fsync, rename, fsync of the directory), so a kill at any point leaves either the old or
the new ledger, never a torn one.

A run's ε is accounted with RDP over all its DP-SGD steps (Opacus); runs compose by
adding their ε (and δ), which is conservative. What the ledger cannot see: a copy of an
older ledger put back in place (a rollback of the file) reads as a valid ledger; keep
the state directory where only the site's user can write.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients.task.errors import ConfigError
from clients.task.files import write_atomic
from clients.task.numbers import check_delta, finite_number, is_integer

LEDGER_FILE = "privacy-ledger.json"
LOCK_FILE = "privacy-ledger.lock"
VERSION = 2
RESET_COMMAND = 'fedlora site budget --state {state} --reset --reason "..."'


class LedgerMissing(ConfigError):
    """A site with a budget has no ledger: lost, deleted, or never initialised."""


def check_epsilon(value: float, *, what: str) -> float:
    """``value`` if it is a valid ε (finite, ≥ 0).

    Raises:
        ConfigError: Naming ``what`` and the value otherwise; an accountant outside its
            range (e.g. a δ near 1 turns RDP's conversion negative) must not lower a total.
    """
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{what}: ε={value!r} is not a finite number >= 0; nothing charged")
    return value


def check_max_epsilon(value: float | None, *, what: str = "--max-epsilon") -> None:
    """Refuse a budget that is not a finite number > 0 (None is no budget).

    Raises:
        ConfigError: Naming ``what`` and the value.
    """
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{what}={value!r} must be a finite number > 0")


def _stored_number(value: object, *, what: str) -> float:
    """A number the ledger file holds, as a float: an int or float, never a bool or a
    numeric string (which ``float()`` would take), and finite.

    Raises:
        ConfigError: Naming ``what`` and the value.
    """
    if (number := finite_number(value)) is None:
        raise ConfigError(f"{what} {value!r} is not a finite number")
    return number


def _stored_count(value: object, *, what: str) -> int:
    """A count the ledger file holds: an int, never a bool, a float (``int(1.9)`` is 1,
    which would under-count ε) or a numeric string.

    Raises:
        ConfigError: Naming ``what`` and the value.
    """
    if not is_integer(value):
        raise ConfigError(f"{what} {value!r} is not an integer")
    return value


def _json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` with every non-finite float replaced by None, so the ledger file and
    ``site budget --json`` stay valid JSON (NaN and Infinity are not JSON); reset records
    are copied from files the site does not otherwise read, whatever they hold.

    Raises:
        ConfigError: If it nests deeper than 64 levels.
    """
    if depth > 64:
        raise ConfigError("a ledger reset record nests deeper than 64 levels")
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v, depth + 1) for v in value]
    return value


def _kept_record(record: Any) -> Any:
    """An old reset record as a reset keeps it (`_json_safe`), or a note in its place where
    it nests too deep: a reset must work on whatever the old ledger holds."""
    try:
        return _json_safe(record)
    except ConfigError as exc:
        return {"state": "unreadable", "error": str(exc)}


def _check_round(*, noise_multiplier: float, sampling_rate: float, steps: int, delta: float):
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ConfigError(f"ledger: noise multiplier {noise_multiplier!r} must be > 0")
    if not 0 < sampling_rate <= 1:
        raise ConfigError(f"ledger: sampling rate {sampling_rate!r} must be in (0, 1]")
    if not is_integer(steps) or steps < 1:
        raise ConfigError(f"ledger: steps {steps!r} must be an integer >= 1")
    check_delta("ledger: δ", delta)


@dataclass
class RunEntry:
    """One run's DP-SGD steps at this site, as (noise multiplier, sampling rate, steps)."""

    delta: float
    steps: list[tuple[float, float, int]] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)

    @property
    def epsilon(self) -> float:
        """The run's ε by RDP (`site_epsilon`, which caches it on the steps and δ)."""
        from clients.task.dpsgd import site_epsilon  # torch/opacus: not for `site budget`

        return site_epsilon(self.steps, delta=self.delta)


@dataclass
class SiteLedger:
    """ε spent by one site, per run (keyed by the Flower run id) and in total."""

    path: Path
    runs: dict[str, RunEntry] = field(default_factory=dict)
    # The site's budget when it last charged a round (node config max-epsilon), for display.
    max_epsilon: float | None = None
    # ε the admin declared spent when the ledger was (re)initialised.
    opening_epsilon: float = 0.0
    # Every re-initialisation: when, why, and what the ledger held before.
    resets: list[dict[str, Any]] = field(default_factory=list)
    # The total the file states (None: none, or not a finite number), read with the rest
    # so `budget_report` compares it with the recomputed total of the same version.
    stated_total_epsilon: float | None = field(default=None, compare=False)

    @classmethod
    @contextlib.contextmanager
    def locked(cls, state_dir: Path, *, required: bool = False) -> Iterator[SiteLedger]:
        """Load the ledger under the state directory's exclusive lock, held until exit.

        Raises:
            LedgerMissing: If ``required`` and there is no ledger.
            ConfigError: If the ledger is unreadable.
        """
        with _lock(Path(state_dir)):
            yield cls.load(state_dir, required=required)

    @classmethod
    def load(cls, state_dir: Path, *, required: bool = False) -> SiteLedger:
        """Read the ledger in ``state_dir``; without one, an empty ledger unless ``required``.

        Raises:
            LedgerMissing: If ``required`` and there is no ledger.
            ConfigError: If the file exists but cannot be read; a site must not train on
                a budget it cannot read.
        """
        path = Path(state_dir) / LEDGER_FILE
        if not path.exists():
            if required:
                raise LedgerMissing(
                    f"privacy ledger {path} is missing: the site has a budget and will not "
                    "train until its admin re-initialises the ledger with "
                    + RESET_COMMAND.format(state=state_dir)
                )
            return cls(path)
        try:
            raw = json.loads(path.read_text())
            runs = {
                str(run): RunEntry(
                    delta=_stored_number(e["delta"], what=f"run {run}: delta"),
                    steps=[
                        (
                            _stored_number(z, what=f"run {run}: noise multiplier"),
                            _stored_number(q, what=f"run {run}: sampling rate"),
                            _stored_count(n, what=f"run {run}: steps"),
                        )
                        for z, q, n in e["steps"]
                    ],
                    rounds=[_stored_count(r, what=f"run {run}: round") for r in e["rounds"]],
                )
                for run, e in raw["runs"].items()
            }
            for entry in runs.values():  # what a charge would have refused, refused on load
                for z, q, n in entry.steps:
                    _check_round(noise_multiplier=z, sampling_rate=q, steps=n, delta=entry.delta)
            raw_opening = raw.get("opening_epsilon", 0.0)
            if (opening := finite_number(raw_opening)) is None:
                raise ConfigError(f"opening_epsilon={raw_opening!r} is not a finite number")
            opening = check_epsilon(opening, what=str(path))
            resets = [_kept_record(r) for r in raw.get("resets", [])]
            budget = raw.get("max_epsilon")
            if budget is not None and ((number := finite_number(budget)) is None or number <= 0):
                raise ConfigError(f"max_epsilon={budget!r} is not a finite number > 0")
            budget = number if budget is not None else None
            stated = finite_number(raw.get("total_epsilon"))
        # OverflowError: an integer past float range, which JSON reads exactly.
        except (
            OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError,
            OverflowError, ConfigError,
        ) as exc:  # fmt: skip
            raise ConfigError(
                f"privacy ledger {path} is unreadable: {exc}; fix it or re-initialise it with "
                + RESET_COMMAND.format(state=state_dir)
            ) from exc
        return cls(path, runs, budget, opening, resets, stated)

    @classmethod
    def reset(
        cls,
        state_dir: Path,
        *,
        reason: str,
        spent: float = 0.0,
        now: dt.datetime | None = None,
    ) -> SiteLedger:
        """Write a new ledger whose total starts at ``spent``, recording why and what was there.

        Earlier resets are kept when the old ledger can be read.

        Raises:
            ConfigError: Without a reason, or for an invalid ``spent``.
        """
        if not reason.strip():
            raise ConfigError("a ledger reset needs --reason (it is recorded in the ledger)")
        check_epsilon(spent, what="--spent")
        with _lock(Path(state_dir)):
            path = Path(state_dir) / LEDGER_FILE
            previous: dict[str, Any] = {"state": "missing"}
            history: list[dict[str, Any]] = []
            if path.exists():
                try:  # read as JSON: a reset must work on a ledger that no longer parses
                    raw = json.loads(path.read_text())
                    previous = {
                        "state": "present",
                        "total_epsilon": finite_number(raw["total_epsilon"]),
                        "runs": sorted(map(str, raw["runs"])),
                    }
                    history = [
                        _kept_record(r) for r in raw.get("resets", []) if isinstance(r, dict)
                    ]
                # RecursionError: nesting past the parser's depth
                except (
                    OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError,
                ) as exc:  # fmt: skip
                    previous = {"state": "unreadable", "error": f"{type(exc).__name__}: {exc}"}
                    history = []
            at = (now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds")
            entry = {"at": at, "reason": reason, "opening_epsilon": spent, "previous": previous}
            ledger = cls(path, opening_epsilon=spent, resets=[*history, _json_safe(entry)])
            ledger.save()
            return ledger

    @property
    def total_epsilon(self) -> float:
        """Opening ε plus every run's; a run whose ε is negative or NaN (e.g. one charged
        with a δ near 1 before δ was the site's) raises instead of lowering the total.

        Raises:
            ConfigError: Naming the run.
        """
        return self.opening_epsilon + sum(
            check_epsilon(self._run_epsilon(r, e), what=f"{self.path}: run {r}")
            for r, e in self.runs.items()
        )

    def _run_epsilon(self, run: str, entry: RunEntry) -> float:
        try:
            return entry.epsilon
        except ConfigError as exc:  # steps the accountant cannot account: name the file
            raise ConfigError(f"{self.path}: run {run}: {exc}; nothing charged") from exc

    @property
    def total_delta(self) -> float:
        return sum(e.delta for e in self.runs.values())

    def epsilon_after(
        self, run: str, *, noise_multiplier: float, sampling_rate: float, steps: int, delta: float
    ) -> tuple[float, float]:
        """(this run's ε, the total ε) if the round were charged; the ledger is unchanged.

        Raises:
            ConfigError: For invalid round parameters, a δ other than the run's, or an ε
                that is not finite, negative or would lower the total.
        """
        _check_round(
            noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps, delta=delta
        )
        entry = self.runs.get(run, RunEntry(delta=delta))
        if entry.delta != delta:
            raise ConfigError(
                f"ledger: run {run} was charged with δ={entry.delta}, this round asks δ={delta}"
            )
        trial = RunEntry(
            delta=delta, steps=[*entry.steps, (noise_multiplier, sampling_rate, steps)]
        )
        run_eps = check_epsilon(trial.epsilon, what=f"ledger: run {run} with δ={delta}")
        before = self.total_epsilon
        total = before - (entry.epsilon if run in self.runs else 0.0) + run_eps
        if total < before:
            raise ConfigError(f"ledger: the round would lower the total ε from {before} to {total}")
        return run_eps, total

    def charge(
        self,
        run: str,
        server_round: int,
        *,
        noise_multiplier: float,
        sampling_rate: float,
        steps: int,
        delta: float,
    ) -> float:
        """Record the round and persist the ledger atomically; return the run's new ε.

        Raises:
            ConfigError: As `epsilon_after`; nothing is recorded then.
        """
        run_eps, _ = self.epsilon_after(
            run, noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps,
            delta=delta,
        )  # fmt: skip
        entry = self.runs.setdefault(run, RunEntry(delta=delta))
        entry.steps.append((noise_multiplier, sampling_rate, steps))
        entry.rounds.append(server_round)
        self.save()
        return run_eps

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "max_epsilon": self.max_epsilon,
            "opening_epsilon": self.opening_epsilon,
            "total_epsilon": self.total_epsilon,
            "total_delta": self.total_delta,
            "resets": self.resets,
            "runs": {
                run: {
                    "delta": e.delta,
                    "epsilon": e.epsilon,
                    "rounds": e.rounds,
                    "steps": [list(s) for s in e.steps],
                }
                for run, e in self.runs.items()
            },
        }

    def save(self) -> None:
        write_atomic(self.path, (json.dumps(self.to_json(), indent=2) + "\n").encode())


@contextlib.contextmanager
def _lock(state_dir: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the state directory's lock file (never deleted).

    Raises:
        ConfigError: If ``state_dir`` exists and is not a directory.
    """
    if state_dir.exists() and not state_dir.is_dir():
        raise ConfigError(f"state directory {str(state_dir)!r} is not a directory")
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def budget_report(state: Path, max_epsilon: float | None) -> dict[str, Any]:
    """Spent and remaining budget as the site enforces it.

    The ledger is read with `SiteLedger.load` (the checks a training round applies) and
    every run's ε is recomputed with the RDP accountant from its recorded steps, so the
    report shows the total the site would charge against, not the ``total_epsilon`` the
    file states. When the file's stated totals disagree with the recomputed ones (an
    edited file, or one written by another accountant version), the report keeps the
    stated values under ``stored_*`` and says so in ``warning``.

    Returns:
        ``ledger`` (path), ``spent_epsilon``/``spent_delta`` (recomputed), ``max_epsilon``,
        ``remaining_epsilon`` (None without a budget), ``runs`` (per run: ε, δ, rounds),
        ``resets``; plus ``stored_total_epsilon`` and ``warning`` on a disagreement.

    Raises:
        ConfigError: If the directory or its ledger is missing, or if the ledger is one a
            site would refuse to train on (unreadable, invalid steps, a NaN or negative ε).
    """
    if not state.is_dir():
        raise ConfigError(f"--state {str(state)!r} is not a directory")
    check_max_epsilon(max_epsilon)
    path = state / LEDGER_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path} does not exist: this site has not trained with DP-SGD (a site with "
            "max-epsilon needs one: fedlora site budget --state DIR --reset --reason ...)"
        )
    ledger = SiteLedger.load(state, required=True)
    spent = ledger.total_epsilon  # recomputed; raises on a run the site would refuse
    runs = {
        run: {"epsilon": e.epsilon, "delta": e.delta, "rounds": list(e.rounds)}
        for run, e in ledger.runs.items()
    }
    budget = max_epsilon if max_epsilon is not None else ledger.max_epsilon
    report: dict[str, Any] = {
        "ledger": str(path),
        "spent_epsilon": spent,
        "spent_delta": ledger.total_delta,
        "max_epsilon": budget,
        "remaining_epsilon": max(budget - spent, 0.0) if budget is not None else None,
        "runs": runs,
        "resets": ledger.resets,
    }
    stored = ledger.stated_total_epsilon  # from the same read: no concurrent charge between
    if stored is None or not math.isclose(stored, spent, rel_tol=1e-9, abs_tol=1e-12):
        report["stored_total_epsilon"] = stored  # None, never NaN: --json stays valid JSON
        states = "no valid total ε" if stored is None else f"total ε {stored!r}"
        report["warning"] = (
            f"{path} states {states}, but its recorded steps give {spent!r}; "
            "the site enforces the recomputed total (was the file edited?)"
        )
    return report
