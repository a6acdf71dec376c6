"""Burst budgets: per-key and global ceilings per minute and per day, kept across restarts."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from clients.edge.budget import BurstBudget
from clients.edge.residency import BudgetLimits


class Clock:
    def __init__(self, now: float = 1_000_000 * 86400.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_key_gets_its_minute_then_waits_for_the_next(tmp_path: Path) -> None:
    clock = Clock()
    budget = BurstBudget(tmp_path / "b.sqlite3", BudgetLimits(per_key_per_minute=2), clock=clock)

    assert [budget.spend("k1") for _ in range(3)] == [None, None, "key"]
    assert budget.spend("k2") is None  # another key has its own minute
    clock.now += 60
    assert budget.spend("k1") is None
    assert budget.spent("k1") == {"key_minute": 1, "key_day": 3, "global_minute": 1,
                                  "global_day": 4}  # fmt: skip


def test_the_global_ceiling_holds_across_keys_and_a_refusal_takes_nothing(tmp_path: Path) -> None:
    clock = Clock()
    limits = BudgetLimits(global_per_day=3, per_key_per_day=2)
    budget = BurstBudget(tmp_path / "b.sqlite3", limits, clock=clock)

    results = [budget.spend(k) for k in ("a", "a", "a", "b", "c", None)]

    assert results == [None, None, "key", None, "global", "global"]
    assert budget.spent("a")["key_day"] == 2 and budget.spent("c")["global_day"] == 3
    assert budget.spent("c")["key_day"] == 0
    clock.now += 86400
    assert budget.spend("c") is None  # a new UTC day


def test_counts_survive_a_restart_and_keys_are_not_stored(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "b.sqlite3"
    first = BurstBudget(path, BudgetLimits(per_key_per_day=2), clock=clock)
    assert first.spend("secret-key") is None and first.spend("secret-key") is None
    first.close()

    again = BurstBudget(path, BudgetLimits(per_key_per_day=2), clock=clock)

    assert again.spend("secret-key") == "key"
    assert again.spent("secret-key")["key_day"] == 2
    again.close()
    scopes = [row[0] for row in sqlite3.connect(path).execute("SELECT scope FROM spent")]
    assert scopes and not any("secret-key" in s for s in scopes)


def test_concurrent_spends_never_exceed_the_ceiling(tmp_path: Path) -> None:
    limits = BudgetLimits(per_key_per_minute=1000, global_per_minute=50)
    budget = BurstBudget(tmp_path / "b.sqlite3", limits, clock=Clock())
    taken: list[str | None] = []

    def spend() -> None:
        for _ in range(20):
            taken.append(budget.spend("k"))

    threads = [threading.Thread(target=spend) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert taken.count(None) == 50 and budget.spent("k")["global_minute"] == 50
