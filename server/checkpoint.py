"""Round checkpoints: the global adapter tensors and the run's history after each round.

Layout under ``OUT/checkpoint/``: ``round-<k>.npz`` holds the tensors and ``state.json``
points at the newest one. ``state.json`` is replaced by an atomic rename after the
tensors are on disk, so a kill at any moment leaves either the previous or the new
checkpoint, never a mix.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clients.task.errors import ConfigError
from clients.task.files import write_atomic

# The server optimiser's state shares the round's npz (one atomic file) under this prefix.
SERVER_STATE_PREFIX = "server-state::"
# So does the best round's adapter (server/selection.py), under this one.
BEST_STATE_PREFIX = "best-state::"


@dataclass(frozen=True)
class Checkpoint:
    completed_round: int
    state: dict[str, np.ndarray]
    history: list[dict[str, Any]]
    run_id: str | None
    fingerprint: dict[str, Any]
    server_state: dict[str, np.ndarray] = field(default_factory=dict)
    # The best round so far on the central held-out file and its tensors (0: none yet).
    best_round: int = 0
    best_accuracy: float | None = None
    best_state: dict[str, np.ndarray] = field(default_factory=dict)


def outputs_complete(out_dir: Path, *, completed_round: int, run_id: str | None) -> bool:
    """Whether ``OUT/metrics.json`` says the checkpointed run has written all its outputs.

    A run writes metrics.json last of its outputs (after ``OUT/adapter`` and the MLflow
    run's artifacts, server/app.py), naming its MLflow run and every round up to the one
    its checkpoint holds: the last, or an earlier one where its privacy budget
    (``dp.max-epsilon``) stopped it. So the run is complete where metrics.json names the
    checkpoint's MLflow run and round; one of another run (an earlier run in the same
    OUT) says nothing of this one.
    """
    if run_id is None or completed_round < 1:
        return False
    try:
        summary = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
        return (
            summary["mlflow_run_id"] == run_id
            and int(summary["rounds"][-1]["round"]) == completed_round
        )
    except (OSError, KeyError, IndexError, TypeError, ValueError, RecursionError):
        return False


class CheckpointStore:
    """Saves and loads checkpoints in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def save(self, checkpoint: Checkpoint) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"round-{checkpoint.completed_round}.npz"
        arrays = dict(checkpoint.state)
        arrays.update({SERVER_STATE_PREFIX + k: v for k, v in checkpoint.server_state.items()})
        arrays.update({BEST_STATE_PREFIX + k: v for k, v in checkpoint.best_state.items()})
        npz = io.BytesIO()
        np.savez(npz, **arrays)
        write_atomic(self.directory / name, npz.getvalue())
        meta = {
            "completed_round": checkpoint.completed_round,
            "tensors": name,
            "run_id": checkpoint.run_id,
            "fingerprint": checkpoint.fingerprint,
            "history": checkpoint.history,
            "best_round": checkpoint.best_round,
            "best_accuracy": checkpoint.best_accuracy,
        }
        write_atomic(self.directory / "state.json", json.dumps(meta, indent=1).encode())
        for old in self.directory.glob("round-*.npz"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def newest(self) -> tuple[int, str | None]:
        """The newest checkpoint's round and MLflow run id, (0, None) when there is none;
        reads no tensors.

        Raises:
            ConfigError: If ``state.json`` is unreadable.
        """
        meta_path = self.directory / "state.json"
        if not meta_path.is_file():
            return 0, None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            run_id = meta.get("run_id")
            return int(meta["completed_round"]), run_id if isinstance(run_id, str) else None
        except (
            OSError,
            AttributeError,
            KeyError,
            TypeError,
            ValueError,
            OverflowError,
            RecursionError,
        ) as exc:
            raise ConfigError(f"checkpoint in {self.directory} is unreadable: {exc}") from exc

    def load(self) -> Checkpoint | None:
        """The newest checkpoint, or None when there is none."""
        meta_path = self.directory / "state.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            with np.load(self.directory / meta["tensors"], allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"checkpoint in {self.directory} is unreadable: {exc}") from exc
        prefixes = (SERVER_STATE_PREFIX, BEST_STATE_PREFIX)
        state = {k: v for k, v in arrays.items() if not k.startswith(prefixes)}

        def under(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}

        return Checkpoint(
            completed_round=int(meta["completed_round"]),
            state=state,
            server_state=under(SERVER_STATE_PREFIX),
            best_round=int(meta.get("best_round") or 0),
            best_accuracy=meta.get("best_accuracy"),
            best_state=under(BEST_STATE_PREFIX),
            history=list(meta["history"]),
            run_id=meta.get("run_id"),
            fingerprint=dict(meta["fingerprint"]),
        )
