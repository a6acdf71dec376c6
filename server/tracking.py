"""MLflow tracking of a training run: params, per-round metrics and the final adapter.

Uses an explicit `MlflowClient` (no global active run), so the round loop can run in any
thread. The tracking URI is the run's ``tracking-uri``, else ``MLFLOW_TRACKING_URI``, else
a SQLite store in the output directory.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

from clients.task.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_tracking_uri(configured: str, out_dir: Path) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"


class Tracker:
    """One MLflow run per training run."""

    def __init__(self, uri: str, experiment: str, *, artifact_root: Path | None = None) -> None:
        # Fail fast when a remote store is down instead of MLflow's minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                location = artifact_root.resolve().as_uri() if artifact_root else None
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=location
                )
            else:
                self.experiment_id = found.experiment_id
        except Exception as exc:
            raise ConfigError(f"tracking-uri={uri!r}: MLflow is unreachable: {exc}") from exc
        self.run_id: str | None = None

    def start(self, *, params: Mapping[str, str], run_id: str | None = None) -> str:
        """Start a new run, or reopen `run_id` when resuming."""
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return run_id
        run = self.client.create_run(self.experiment_id, tags={"fedlora.kind": "training"})
        self.run_id = run.info.run_id
        self.client.log_batch(
            self.run_id,
            params=[_param(k, v) for k, v in params.items()],
        )
        return self.run_id

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        assert self.run_id is not None
        now = int(time.time() * 1000)
        batch = [
            Metric(key=k, value=float(v), timestamp=now, step=server_round)
            for k, v in metrics.items()
        ]
        self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) string tags of the run, e.g. what the headline metric is."""
        assert self.run_id is not None
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_artifacts(self, directory: Path, artifact_path: str) -> None:
        assert self.run_id is not None
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value[:6000])  # MLflow's limit on a param value
