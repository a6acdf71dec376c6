"""The site's privacy-budget ledger: sample-level ε spent per run and in total.

The site, not the server, enforces its budget. Before it trains a DP-SGD round it asks
`SiteLedger.check` what the round would bring the total to and refuses if that passes the
site's ``max-epsilon``; otherwise it *charges the round first* (`SiteLedger.charge`) and
only then trains. Charging before training, rather than before sending, means a crash or
SIGKILL anywhere in the round leaves the round already counted: the ledger can over-count
a round whose update never left the site, but can never under-count one that did, so a
restarted site never exceeds its budget.

The file (``STATE/privacy-ledger.json``) is replaced with `write_atomic` (temporary file,
fsync, rename, fsync of the directory), so a kill at any point leaves either the old or
the new ledger, never a torn one.

A run's ε is accounted with RDP over all its DP-SGD steps (Opacus); runs compose by
adding their ε (and δ), which is conservative.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients.task.errors import ConfigError
from clients.task.files import write_atomic

LEDGER_FILE = "privacy-ledger.json"
VERSION = 1


@dataclass
class RunEntry:
    """One run's DP-SGD steps at this site, as (noise multiplier, sampling rate, steps)."""

    delta: float
    steps: list[tuple[float, float, int]] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)

    @property
    def epsilon(self) -> float:
        from clients.task.dpsgd import site_epsilon  # torch/opacus: not for `site budget`

        return site_epsilon(self.steps, delta=self.delta)


@dataclass
class SiteLedger:
    """ε spent by one site, per run (keyed by the Flower run id) and in total."""

    path: Path
    runs: dict[str, RunEntry] = field(default_factory=dict)
    # The site's budget when it last charged a round (node config max-epsilon), for display.
    max_epsilon: float | None = None

    @classmethod
    def load(cls, state_dir: Path) -> SiteLedger:
        """Read the ledger in ``state_dir`` (an empty ledger if there is none yet).

        Raises:
            ConfigError: If the file exists but cannot be read; a site must not train on
                a budget it cannot read.
        """
        path = Path(state_dir) / LEDGER_FILE
        if not path.exists():
            return cls(path)
        try:
            raw = json.loads(path.read_text())
            runs = {
                run: RunEntry(
                    delta=float(e["delta"]),
                    steps=[(float(z), float(q), int(n)) for z, q, n in e["steps"]],
                    rounds=[int(r) for r in e["rounds"]],
                )
                for run, e in raw["runs"].items()
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"privacy ledger {path} is unreadable: {exc}") from exc
        budget = raw.get("max_epsilon")
        return cls(path, runs, float(budget) if budget is not None else None)

    @property
    def total_epsilon(self) -> float:
        return sum(e.epsilon for e in self.runs.values())

    @property
    def total_delta(self) -> float:
        return sum(e.delta for e in self.runs.values())

    def epsilon_after(
        self, run: str, *, noise_multiplier: float, sampling_rate: float, steps: int, delta: float
    ) -> tuple[float, float]:
        """(this run's ε, the total ε) if the round were charged; the ledger is unchanged."""
        entry = self.runs.get(run, RunEntry(delta=delta))
        trial = RunEntry(
            delta=delta, steps=[*entry.steps, (noise_multiplier, sampling_rate, steps)]
        )
        others = sum(e.epsilon for r, e in self.runs.items() if r != run)
        return trial.epsilon, others + trial.epsilon

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
        """Record the round and persist the ledger atomically; return the run's new ε."""
        entry = self.runs.setdefault(run, RunEntry(delta=delta))
        entry.steps.append((noise_multiplier, sampling_rate, steps))
        entry.rounds.append(server_round)
        self.save()
        return entry.epsilon

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "max_epsilon": self.max_epsilon,
            "total_epsilon": self.total_epsilon,
            "total_delta": self.total_delta,
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


def budget_report(state: Path, max_epsilon: float | None) -> dict[str, Any]:
    """Spent and remaining budget from the ledger file (read as JSON: no torch here).

    Raises:
        ConfigError: If the directory or its ledger is missing or unreadable.
    """
    if not state.is_dir():
        raise ConfigError(f"--state {str(state)!r} is not a directory")
    path = state / LEDGER_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: this site has not trained with DP-SGD")
    try:
        ledger = json.loads(path.read_text())
        runs = {
            run: {"epsilon": float(e["epsilon"]), "delta": float(e["delta"]), "rounds": e["rounds"]}
            for run, e in ledger["runs"].items()
        }
        spent = float(ledger["total_epsilon"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a fedlora privacy ledger: {exc}") from exc
    budget = max_epsilon if max_epsilon is not None else ledger.get("max_epsilon")
    return {
        "ledger": str(path),
        "spent_epsilon": spent,
        "spent_delta": sum(r["delta"] for r in runs.values()),
        "max_epsilon": budget,
        "remaining_epsilon": max(budget - spent, 0.0) if budget is not None else None,
        "runs": runs,
    }
