"""The MLflow side of the registry: versions, aliases, tags, and where files live.

MLflow indexes releases; it is never trusted (see ../shared/DESIGN.md). Every release's
files are uploaded as the artifacts of a dedicated MLflow run in the ``fedlora-registry``
experiment before its model version is created, and the release index (TUF metadata, see
`registry.index`) lives as the artifacts of one more run there, tagged
``fedlora.kind=release-index``.

Credentials come from MLflow's own environment variables (``MLFLOW_TRACKING_URI``,
``MLFLOW_TRACKING_USERNAME``, ``MLFLOW_TRACKING_PASSWORD``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from registry.errors import RegistryError, RegistryUnavailable

log = logging.getLogger(__name__)

EXPERIMENT = "fedlora-registry"
INDEX_DIR = "tuf"
RELEASE_DIR = "release"
TAG = "fedlora."
T = TypeVar("T")

# Upload order of the release index: a reader that races a publisher may see new roots or
# targets before the timestamp that points at them, never a timestamp without its targets.
INDEX_ORDER = ("root", "targets.json", "snapshot.json", "timestamp.json")


def default_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise RegistryError(
            "no registry: pass --registry URI or set MLFLOW_TRACKING_URI "
            "(e.g. sqlite:///mlflow.db or http://127.0.0.1:5000)"
        )
    return uri


def _denied(exc: Exception) -> bool:
    code = str(getattr(exc, "error_code", ""))
    text = str(exc)
    return (
        code in ("PERMISSION_DENIED", "UNAUTHENTICATED")
        or "401" in text.split("\n")[0]
        or "403" in text.split("\n")[0]
        or "Permission denied" in text
        or "Unauthorized" in text
    )


def name_filter(model: str) -> str:
    """An MLflow search filter that matches the model named ``model`` (and maybe others).

    MLflow's filter strings take a quoted value verbatim, with no escape for the quote:
    a name holding ``'`` (or a backslash, which some SQL stores read as an escape) is
    matched with ``LIKE`` and ``_`` in place of those characters, so the callers keep only
    exact matches of the results.
    """
    if "'" not in model and "\\" not in model:
        return f"name = '{model}'"
    return "name LIKE '" + model.replace("'", "_").replace("\\", "_") + "'"


class MlflowStore:
    """Thin wrapper over `MlflowClient` with fedlora's error messages."""

    def __init__(self, uri: str) -> None:
        # Fail fast instead of MLflow's minutes of retries against a server that is down.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        # fedlora moves a handful of small files; MLflow's per-download bars are noise.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.check_reachable()
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self._experiment_id: str | None = None
        self._index_run: str | None = None

    def check_reachable(self) -> None:
        if not self.uri.startswith(("http://", "https://")):
            return
        try:
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=5):
                pass
        except (urllib.error.URLError, OSError) as exc:
            raise RegistryUnavailable(f"registry {self.uri} is unreachable: {exc}") from exc

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one MLflow call; turn its failures into fedlora errors naming ``what``."""
        try:
            return fn()
        except RegistryError:
            raise
        except Exception as exc:
            user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
            if _denied(exc):
                who = f"user {user!r}" if user else "an unauthenticated client"
                raise RegistryUnavailable(
                    f"{what}: {self.uri} refused {who} (permission denied); a publisher "
                    "needs EDIT on the experiment and MANAGE or EDIT on the model"
                ) from exc
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RegistryError(f"{what} failed at {self.uri}: {first}") from exc

    # experiment and runs -------------------------------------------------------------

    def experiment_id(self, *, create: bool) -> str | None:
        if self._experiment_id is None:
            found = self.call(
                "look up experiment", lambda: self.client.get_experiment_by_name(EXPERIMENT)
            )
            if found is not None:
                self._experiment_id = found.experiment_id
            elif create:
                location = None
                if self.uri.startswith("sqlite:///"):
                    # beside the database, not in the current directory
                    db = Path(self.uri.removeprefix("sqlite:///"))
                    location = (db.parent / "mlartifacts").resolve().as_uri()
                self._experiment_id = self.call(
                    "create experiment",
                    lambda: self.client.create_experiment(EXPERIMENT, artifact_location=location),
                )
        return self._experiment_id

    def index_run(self, *, create: bool) -> str | None:
        if self._index_run is None:
            exp = self.experiment_id(create=create)
            if exp is None:
                return None
            runs = self.call(
                "find the release index",
                lambda: self.client.search_runs(
                    [exp], filter_string=f"tags.`{TAG}kind` = 'release-index'", max_results=2
                ),
            )
            if runs:
                self._index_run = runs[0].info.run_id
                if create and runs[0].info.status == "RUNNING":  # made by an older fedlora
                    self.quietly(lambda: self.client.set_terminated(runs[0].info.run_id))
            elif create:
                run = self.call(
                    "create the release index",
                    lambda: self.client.create_run(
                        exp, run_name="release-index", tags={f"{TAG}kind": "release-index"}
                    ),
                )
                self._index_run = run.info.run_id
                # The run only holds the index's files, which are logged to it later on:
                # it is finished at once rather than showing as running forever.
                self.call(
                    "close the release index run",
                    lambda: self.client.set_terminated(run.info.run_id),
                )
        return self._index_run

    # release index files -------------------------------------------------------------

    def fetch_index_file(self, name: str) -> bytes | None:
        """One metadata file of the release index, or None if it does not exist."""
        run = self.index_run(create=False)
        if run is None:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self.client.download_artifacts(run, f"{INDEX_DIR}/{name}", tmp)
            except Exception as exc:
                names = {
                    Path(f.path).name
                    for f in self.call(
                        "list the release index",
                        lambda: self.client.list_artifacts(run, INDEX_DIR),
                    )
                }
                if name not in names:
                    return None
                raise RegistryUnavailable(f"cannot download {name} from {self.uri}: {exc}") from exc
            return Path(path).read_bytes()

    def upload_index(self, files: dict[str, bytes]) -> None:
        run = self.index_run(create=True)
        assert run is not None

        def rank(name: str) -> int:
            for i, prefix in enumerate(INDEX_ORDER):
                if name.endswith(prefix):
                    return i
            return 0

        with tempfile.TemporaryDirectory() as tmp:
            for name in sorted(files, key=rank):
                path = Path(tmp) / name
                path.write_bytes(files[name])
                self.call(
                    f"upload {name} of the release index",
                    lambda p=path: self.client.log_artifact(run, str(p), INDEX_DIR),
                )

    # releases ------------------------------------------------------------------------

    def upload_release(self, directory: Path, *, model: str, release: int) -> str:
        """Upload a release directory as a run's artifacts; return that run's id."""
        exp = self.experiment_id(create=True)
        assert exp is not None
        run = self.call(
            "create the release run",
            lambda: self.client.create_run(
                exp,
                run_name=f"{model}-release-{release}",
                tags={f"{TAG}kind": "release", f"{TAG}model": model},
            ),
        )
        run_id = run.info.run_id
        try:
            self.call(
                "upload the release files",
                lambda: self.client.log_artifacts(run_id, str(directory), RELEASE_DIR),
            )
        except RegistryError:
            self.quietly(lambda: self.client.set_terminated(run_id, status="FAILED"))
            raise
        self.call("close the release run", lambda: self.client.set_terminated(run_id))
        return run_id

    def link_training_run(
        self, training_run: str | None, *, release: str
    ) -> tuple[str, str] | None:
        """Record a release as a logged model of the run that trained it, as MLflow's own
        ``log_model`` does, so its model version points at that run (``run_id``,
        ``model_id``). Returns (run id, model id), or None when the run is not in this
        store or may not be written by this account; the version then points at its
        release run.
        """
        if not training_run:
            return None
        from mlflow.entities import LoggedModelOutput

        try:
            run = self.client.get_run(training_run)
            logged = self.client.create_logged_model(
                run.info.experiment_id,
                name=release,
                source_run_id=training_run,
                tags={f"{TAG}kind": "release"},
            )
            self.client.log_outputs(training_run, [LoggedModelOutput(logged.model_id, step=0)])
            self.client.finalize_logged_model(logged.model_id, "READY")
        except Exception as exc:  # another store's run, or no right to write it: no link
            log.info("release not linked to training run %s: %s", training_run, exc)
            return None
        return training_run, logged.model_id

    def record_version(self, model_id: str, *, model: str, version: str) -> None:
        """Name the model version on its logged model (MLflow's ``mlflow.modelVersions``
        tag, as ``mlflow.register_model`` sets it), so the training run's model shows it."""
        import json

        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        def tag() -> None:
            found = self.client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
            value = [*json.loads(found or "[]"), {"name": model, "version": version}]
            self.client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(value)})

        self.quietly(tag)

    def versions(self, model: str) -> list[Any]:
        found = self.call(
            f"list versions of {model!r}",
            lambda: self.client.search_model_versions(name_filter(model)),
        )
        return sorted((v for v in found if v.name == model), key=lambda v: int(v.version))

    def registered(self, model: str) -> Any | None:
        from mlflow.exceptions import MlflowException

        def get() -> Any | None:
            try:
                return self.client.get_registered_model(model)
            except MlflowException as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return None
                raise

        return self.call(f"look up model {model!r}", get)

    def alias_version(self, model: str, alias: str) -> str | None:
        model_obj = self.registered(model)
        if model_obj is None:
            return None
        return dict(getattr(model_obj, "aliases", {}) or {}).get(alias)

    def download_version(self, model: str, version: str, dst: Path) -> Path:
        """Download a version's files into ``dst`` (which must exist); return the folder."""
        mv = self.call(
            f"look up {model} version {version}",
            lambda: self.client.get_model_version(model, version),
        )
        import mlflow.artifacts

        path = self.call(
            f"download {model} version {version}",
            lambda: mlflow.artifacts.download_artifacts(
                artifact_uri=mv.source, dst_path=str(dst), tracking_uri=self.uri
            ),
        )
        return Path(path)

    @staticmethod
    def quietly(fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:  # cleanup after a failure; the first error is what matters
            log.warning("cleanup failed: %s", exc)


@contextmanager
def staging(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)
