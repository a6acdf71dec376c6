"""What fedlora's commands show: progress (bars or plain lines), the round table, quiet libraries.

Libraries log and return values; the CLIs, the demo and the benchmark scripts render them
with these helpers, so every command looks the same.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Errors and progress go to stderr; soft_wrap keeps a one-line error one line in logs,
# whatever the terminal width.
console = Console(stderr=True, soft_wrap=True)


# fedlora's own packages: their warnings (a site that failed, a refused update) are for the
# user; every other library's records are shown only with --verbose.
OWN_LOGGERS = ("server", "clients", "strategies", "registry")


class _OwnRecords(logging.Filter):
    """Pass fedlora's records, and other libraries' errors that are not Flower's."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name.split(".", 1)[0]
        return name in OWN_LOGGERS or (record.levelno >= logging.ERROR and name != "flwr")


class _Quiet(logging.Filter):
    """Drop a library's records below a level, whatever level the library set itself."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def quiet_libraries(*, verbose: bool = False, timestamps: bool = False) -> None:
    """Keep Ray, Flower, MLflow, SQLAlchemy and deprecation chatter out of the terminal.

    Called once by the CLI before any library is imported. Without ``verbose``, only
    fedlora's own warnings and errors are logged (to stderr), and library warnings
    (``warnings.warn``) go to the log, where they are dropped. Filters, not levels, do it:
    Flower sets its logger to DEBUG when it is imported and re-enables deprecation
    warnings; opacus configures the root logger on import, which a root handler set
    here first prevents.
    """
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "DEBUG" if verbose else "WARNING")
    handler = logging.StreamHandler()  # stderr
    when = "%(asctime)s " if timestamps else ""
    handler.setFormatter(logging.Formatter(when + "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "fedlora", False)]:
        root.removeHandler(old)
    handler.fedlora = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.captureWarnings(True)
    flwr = logging.getLogger("flwr")
    for old in [f for f in flwr.filters if isinstance(f, _Quiet)]:
        flwr.removeFilter(old)
    if verbose:
        return
    handler.addFilter(_OwnRecords())
    # Flower logs to its own console handler too; only its errors reach the user.
    flwr.addFilter(_Quiet(logging.ERROR))
    for name in ("ray", "mlflow", "alembic", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def progress_bars(*, out: Console = console) -> Progress:
    """The progress display of fedlora's long work (rounds, epochs): bar, count, status."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=out,
    )


class RoundProgress:
    """A run's rounds as they end: a live bar on a terminal, one plain line each elsewhere.

    Rich draws a live display only on a terminal; written to a file, a pipe, CI or nohup's
    log it would show nothing until the run ends. There each round prints one line
    instead, ``round 2/6: acc 0.412, 4 sites, 0 rejected, 0:01:12 elapsed``, after a
    first line saying the rounds have started.

    Usage::

        with RoundProgress("federated rounds", total=6) as progress:
            progress.update(1, "acc 0.412, 4 sites, 0 rejected")
    """

    def __init__(
        self,
        description: str,
        *,
        total: int,
        out: Console = console,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.description = description
        self.total = total
        self.out = out
        self.clock = clock
        self.live = out.is_terminal and not out.is_dumb_terminal
        self._bars: Progress | None = None
        self._task: Any = None
        self._started = 0.0

    def __enter__(self) -> RoundProgress:
        self._started = self.clock()
        if self.live:
            self._bars = progress_bars(out=self.out)
            self._bars.start()
            self._task = self._bars.add_task(self.description, total=self.total, status="starting")
        else:
            self._line(f"{self.description}: starting {self.total} round(s)")
        return self

    def update(self, completed: int, status: str) -> None:
        """Round ``completed`` (of ``total``) has ended; ``status`` says how it went."""
        if self._bars is not None:
            self._bars.update(self._task, completed=completed, status=status)
            return
        elapsed = datetime.timedelta(seconds=int(self.clock() - self._started))
        self._line(f"round {completed}/{self.total}: {status}, {elapsed} elapsed")

    def _line(self, text: str) -> None:
        self.out.print(text, highlight=False, markup=False, soft_wrap=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._bars is not None:
            self._bars.stop()


def round_table(history: Sequence[dict[str, Any]]) -> Table:
    """One row per round of a run's history (``metrics.json`` ``rounds``)."""
    table = Table(title="rounds")
    for col in ("round", "accuracy", "loss", "sites", "rejected", "failed", "seconds"):
        table.add_column(col, justify="right")
    for row in history:
        acc = row.get("accuracy")
        loss = row.get("loss")
        table.add_row(
            str(row["round"]),
            "-" if acc is None else f"{acc:.3f}",
            "-" if loss is None else f"{loss:.4f}",
            str(row["sites"]),
            str(row["rejected"]),
            str(row["failed"]),
            f"{row['seconds']:.1f}",
        )
    return table
