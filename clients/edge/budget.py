"""Burst budgets: how many escalations each API key, and the node in total, may spend.

Fixed windows of one minute and one UTC day, counted in a SQLite file in the node's cache,
so a restart does not hand out a fresh budget. One escalation takes one unit from all four
counters (the key's minute and day, the node's minute and day) in one transaction, or from
none of them. API keys are stored as HMAC-SHA256 under a random secret kept in the same
file, so the file never holds a client's key.

    budget = BurstBudget(cache / "routing" / "budget.sqlite3", limits)
    refused = budget.spend("client-key")   # None, or "key" / "global" when over a ceiling
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from clients.edge.residency import BudgetLimits

ANONYMOUS = "anonymous"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS secret (id INTEGER PRIMARY KEY CHECK (id = 0), value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS spent (
    scope TEXT NOT NULL, window TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (scope, window)
);
"""


class BurstBudget:
    """Escalation counters that survive a restart (thread-safe)."""

    def __init__(
        self, path: Path, limits: BudgetLimits, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self.limits = limits
        self.clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: transactions are the explicit BEGIN IMMEDIATE below.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        # WAL with synchronous=NORMAL: a committed count survives the process dying
        # (a power cut may lose the last few, which only ever returns budget).
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "INSERT OR IGNORE INTO secret (id, value) VALUES (0, ?)", (secrets.token_bytes(32),)
        )
        self._secret = bytes(self._db.execute("SELECT value FROM secret").fetchone()[0])

    def _scope(self, key: str | None) -> str:
        mac = hmac.new(self._secret, (key or ANONYMOUS).encode(), hashlib.sha256)
        return "key:" + mac.hexdigest()

    def _windows(self) -> tuple[str, str]:
        now = self.clock()
        return f"m{int(now // 60)}", f"d{int(now // 86400)}"

    def spend(self, key: str | None) -> str | None:
        """Take one escalation for ``key`` (None: anonymous).

        Returns:
            None if it was taken; ``"key"`` or ``"global"``, the ceiling that refused it,
            in which case nothing was taken.
        """
        minute, day = self._windows()
        scope = self._scope(key)
        limits = self.limits
        checks = (
            ("key", scope, minute, limits.per_key_per_minute),
            ("key", scope, day, limits.per_key_per_day),
            ("global", "global", minute, limits.global_per_minute),
            ("global", "global", day, limits.global_per_day),
        )
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")  # also excludes another process on the same file
            try:
                for which, who, window, ceiling in checks:
                    row = db.execute(
                        "SELECT count FROM spent WHERE scope = ? AND window = ?", (who, window)
                    ).fetchone()
                    if (row[0] if row else 0) >= ceiling:
                        db.execute("ROLLBACK")
                        return which
                for _, who, window, _ in checks:
                    db.execute(
                        "INSERT INTO spent (scope, window, count) VALUES (?, ?, 1) "
                        "ON CONFLICT (scope, window) DO UPDATE SET count = count + 1",
                        (who, window),
                    )
                # Windows that have passed are never read again.
                db.execute("DELETE FROM spent WHERE window NOT IN (?, ?)", (minute, day))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return None

    def spent(self, key: str | None) -> dict[str, int]:
        """This window's counts for ``key`` and in total (for tests and /healthz)."""
        minute, day = self._windows()
        scope = self._scope(key)
        with self._lock:
            rows = dict(
                ((s, w), c)
                for s, w, c in self._db.execute("SELECT scope, window, count FROM spent")
            )
        return {
            "key_minute": rows.get((scope, minute), 0),
            "key_day": rows.get((scope, day), 0),
            "global_minute": rows.get(("global", minute), 0),
            "global_day": rows.get(("global", day), 0),
        }

    def close(self) -> None:
        with self._lock:
            self._db.close()
