"""What fedlora's commands show on a terminal: progress bars, the round table, quiet libraries.

Libraries log and return values; the CLIs, the demo and the benchmark scripts render them
with these helpers, so every command looks the same.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Errors and progress go to stderr; soft_wrap keeps a one-line error one line in logs,
# whatever the terminal width.
console = Console(stderr=True, soft_wrap=True)


def quiet_libraries() -> None:
    """Keep Ray, Flower, MLflow and deprecation chatter out of the user's terminal."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("flwr", "ray", "mlflow", "alembic", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def progress_bars() -> Progress:
    """The progress display of fedlora's long work (rounds, epochs): bar, count, status."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    )


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
