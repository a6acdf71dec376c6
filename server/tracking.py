"""MLflow tracking of a training run: params, per-round metrics and the final adapter.

Uses an explicit `MlflowClient` (no global active run), so the round loop can run in any
thread. The tracking URI is the run's ``tracking-uri``, else ``MLFLOW_TRACKING_URI``, else
a SQLite store in the output directory.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from clients.task.errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_ARTIFACT = "run-config.toml"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
MAX_TAG_CHARS = 8000  # and on a tag value
BATCH_METRICS = 1000  # most metrics one log_batch call takes
# How long a stop's KILLED mark waits for the run's loop to leave `start` or `finish`.
KILL_WAIT_SECONDS = 1.0


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
        self.status: str | None = None  # how `finish` ended the run; None while it runs
        self._ending = threading.Lock()  # see `kill_unless_ended`
        self._kill_requested = False  # a stop began: a run opened from now on is KILLED
        self._site_keys: set[str] = set()

    def start(
        self,
        *,
        params: Mapping[str, str],
        run_id: str | None = None,
        run_name: str | None = None,
        config_toml: str | None = None,
    ) -> str:
        """Start a new run, or reopen `run_id` when resuming.

        ``config_toml`` (the whole run config, `server.run_config.to_toml`) is kept as the
        run's ``run-config.toml``: ``flwr run . --run-config run-config.toml`` repeats it,
        and it holds values longer than MLflow's param limit.
        """
        with self._ending:  # a stop that begins meanwhile is applied once the run is open
            try:
                if run_id is not None:
                    self.run_id = run_id
                    if not self._kill_requested:  # a stopped resume stays KILLED
                        self.client.update_run(run_id, status="RUNNING")
                else:
                    run = self.client.create_run(
                        self.experiment_id, run_name=run_name, tags={"fedlora.kind": "training"}
                    )
                    self.run_id = run.info.run_id
                    self.client.log_batch(
                        self.run_id,
                        params=[_param(k, v) for k, v in params.items()],
                    )
                    if config_toml is not None:
                        self.client.log_text(self.run_id, config_toml, CONFIG_ARTIFACT)
            finally:  # also where a call after create_run failed: the run exists
                if self._kill_requested and self.status is None and self.run_id is not None:
                    try:  # an error `start` raised stays the one that propagates
                        self._terminate("KILLED")
                    except Exception as exc:
                        log.warning("could not mark MLflow run %s KILLED: %s", self.run_id, exc)
        return self.run_id

    def log_round(
        self,
        server_round: int,
        metrics: Mapping[str, float],
        sites: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        """The round's metrics, and each site's as ``site/<site>/<name>`` (`site_key`).

        A site id may hold characters MLflow refuses in a metric name; the run's tags
        ``fedlora.site.<key>`` map each metric key back to the site id it stands for.
        """
        from mlflow.entities import Metric, RunTag

        assert self.run_id is not None
        now = int(time.time() * 1000)
        batch = [
            Metric(key=k, value=float(v), timestamp=now, step=server_round)
            for k, v in metrics.items()
        ]
        tags = []
        for site, values in (sites or {}).items():
            key = site_key(site)
            if key not in self._site_keys:
                self._site_keys.add(key)
                tags.append(RunTag(f"fedlora.site.{key}", site[:MAX_TAG_CHARS]))
            batch += [
                Metric(key=f"site/{key}/{name}", value=float(v), timestamp=now, step=server_round)
                for name, v in values.items()
                if v is not None
            ]
        for start in range(0, len(batch), BATCH_METRICS):  # MLflow's limit per log_batch
            self.client.log_batch(
                self.run_id, metrics=batch[start : start + BATCH_METRICS], tags=tags
            )
            tags = []

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) string tags of the run, e.g. what the headline metric is."""
        assert self.run_id is not None
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_artifacts(self, directory: Path, artifact_path: str) -> None:
        assert self.run_id is not None
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        with self._ending:
            if self.run_id is not None:
                self._terminate(status)

    def _terminate(self, status: str) -> None:
        """End the open run with ``status``; the caller holds ``_ending``."""
        self.client.set_terminated(str(self.run_id), status=status)
        self.status = status

    def kill_unless_ended(self) -> None:
        """Mark the run KILLED unless `finish` has ended it; a run not yet open is marked
        as `start` opens it.

        For a run whose loop is being stopped from another thread, which may be ending it
        at the same moment: the check and the mark are one step, so a run its loop
        finished is never marked KILLED after that. The loop's own `finish` still counts.
        Where the loop is inside `finish` (a slow remote store), that call ends the run and
        this one returns after `KILL_WAIT_SECONDS` instead of waiting for it.
        """
        self._kill_requested = True  # before the lock: `start` reads it under the lock
        if not self._ending.acquire(timeout=KILL_WAIT_SECONDS):
            return  # `finish` is ending the run, or `start` opens it and sees the flag
        try:
            if self.status is None and self.run_id is not None:
                self._terminate("KILLED")
        finally:
            self._ending.release()


def _param(key: str, value: str):
    from mlflow.entities import Param

    if len(value) > MAX_PARAM_CHARS:  # the whole value is in run-config.toml
        value = value[: MAX_PARAM_CHARS - 40] + f" … (cut; see {CONFIG_ARTIFACT})"
    return Param(key, value)


def site_key(site: str) -> str:
    """``site`` as one segment of an MLflow metric name, unique per site id.

    MLflow allows letters, digits, ``_ - . /`` and spaces (and ``:`` off Windows), and no
    segment that a path would resolve away (``.``, ``..``, an empty one). An id that
    already fits is used as it is; any other gets its other characters replaced by ``_``
    and 8 hex digits of its SHA-256 appended, so two ids do not share a key.
    """
    fits = (
        re.fullmatch(r"[\w.\- ]{1,100}", site) is not None
        and site not in (".", "..")
        and site == site.strip()
    )
    if fits:
        return site
    cleaned = re.sub(r"[^\w.\-]", "_", site)[:80].strip(".") or "site"
    return f"{cleaned}-{hashlib.sha256(site.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def run_name(model: str, when: datetime.datetime | None = None) -> str:
    """A training run's MLflow name: the model's name and the UTC start time."""
    stamp = (when or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%d-%H%M%S")
    return f"{Path(model).name or model}-{stamp}"
