"""The MLflow side of the registry: versions, aliases, tags, and where files live.

MLflow indexes releases; it is never trusted (see ../shared/DESIGN.md). Every release's
files are uploaded as the artifacts of a dedicated MLflow run in the ``fedlora-registry``
experiment before its model version is created, and the release index (TUF metadata, see
`registry.index`) lives as the artifacts of one more run there, tagged
``fedlora.kind=release-index``.

Reading is guarded against whoever can write the registry: a release is read only from
this registry's own artifact store (an ``mlflow-artifacts:/`` or ``runs:/`` source; a
``file:`` source only inside the embedded store's artifact folder), and its listing is
checked against the files and sizes the signed index records before any byte is
downloaded. Every download stops at its limit: a release file's recorded size, an index
file's python-tuf limit (checked on the announced length before the body is read).

Credentials come from MLflow's own environment variables (``MLFLOW_TRACKING_URI``,
``MLFLOW_TRACKING_USERNAME``, ``MLFLOW_TRACKING_PASSWORD``).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from registry.errors import RegistryError, RegistryUnavailable, VerificationError
from registry.index import index_upload_order

log = logging.getLogger(__name__)

EXPERIMENT = "fedlora-registry"
INDEX_DIR = "tuf"
RELEASE_DIR = "release"
TAG = "fedlora."
T = TypeVar("T")


def default_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise RegistryError(
            "no registry: pass --registry URI or set MLFLOW_TRACKING_URI "
            "(e.g. sqlite:///mlflow.db or http://127.0.0.1:5000)"
        )
    return uri


# MLflow's rules for an alias name (mlflow.utils.validation): word characters and '-',
# at most 255; 'latest' and version-like 'v3' are reserved for its own lookups.
ALIAS_NAME = re.compile(r"[\w-]{1,255}")
RESERVED_ALIAS = re.compile(r"latest|[vV]\d+", re.IGNORECASE)


def check_alias(alias: str) -> None:
    """Refuse an alias name MLflow would refuse, before a command changes anything.

    Raises:
        RegistryError: naming the alias and the rule it breaks.
    """
    if not ALIAS_NAME.fullmatch(alias):
        raise RegistryError(
            f"alias {alias!r}: MLflow takes 1 to 255 letters, digits, '_' and '-' only"
        )
    if RESERVED_ALIAS.fullmatch(alias):
        raise RegistryError(f"alias {alias!r} is reserved by MLflow ('latest', 'v1', 'v2', ...)")


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` URI (SQLAlchemy's form: ``sqlite:///rel.db``,
    ``sqlite:////abs.db``, maybe with a ``?query``), or None for an in-memory one."""
    path = uri.removeprefix("sqlite:").removeprefix("///").partition("?")[0]
    if uri.startswith("sqlite://") and not uri.startswith("sqlite:///"):
        return None  # sqlite:// is SQLAlchemy's in-memory database
    return None if path in ("", ":memory:") else Path(path)


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

    def __init__(self, uri: str, *, create: bool = True) -> None:
        """``create`` False refuses a SQLite file that does not exist (MLflow would make a
        new, empty registry there): commands that only read or change a registry pass it.
        """
        # Fail fast instead of MLflow's minutes of retries against a server that is down.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        # fedlora moves a handful of small files; MLflow's per-download bars are noise.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.create = create
        self.check_reachable()
        # A scheme MLflow does not know, a store it refuses, a missing database driver.
        self.client = self.call(
            "open the registry", lambda: MlflowClient(tracking_uri=uri, registry_uri=uri)
        )
        self._experiment_id: str | None = None
        self._index_run: str | None = None
        self._index_repo: Any = None

    def check_reachable(self) -> None:
        if self.uri.startswith("sqlite:") and not self.create:
            path = sqlite_file(self.uri)
            if path is None or not path.is_file():
                where = "an in-memory database" if path is None else f"{path} does not exist"
                raise RegistryUnavailable(
                    f"registry {self.uri}: {where} (a typo in --registry or "
                    "MLFLOW_TRACKING_URI?); only `registry publish` creates a registry"
                )
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

    def fetch_index_file(self, name: str, max_length: int) -> bytes | None:
        """One metadata file of the release index, or None if it does not exist.

        Raises:
            VerificationError: ``fetch`` when the file is longer than ``max_length``
                (python-tuf's limit for it); the download stops there.
        """
        run = self.index_run(create=False)
        if run is None:
            return None
        if self._index_repo is None:
            run_uri = self.call("look up the release index run", lambda: self._run_uri(run))
            # Only this registry's artifact store, as for a release's files: a run whose
            # location names another host would get the node's credentials.
            location = self._release_location(
                f"{run_uri.rstrip('/')}/{INDEX_DIR}", "the release index run"
            )
            self._index_repo = self._repository(location)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            if not self._download_capped(self._index_repo, name, path, max_length):
                return None
            return path.read_bytes()

    def upload_index(self, files: dict[str, bytes]) -> None:
        run = self.index_run(create=True)
        assert run is not None

        with tempfile.TemporaryDirectory() as tmp:
            for name in index_upload_order(files):
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

    def download_release(
        self, model: str, version: str, dst: Path, *, allowed: dict[str, int]
    ) -> Path:
        """Download the files of a model version into ``dst`` (which must exist).

        ``allowed`` maps every file name the release may hold to its largest size in bytes
        (the signed index records the exact sizes). The version's source must be in this
        registry's artifact store, and its listing must hold only those names, none
        larger and no folder, before anything is downloaded.

        Raises:
            VerificationError: ``fetch``, naming the source, file or size refused.
        """
        mv = self.call(
            f"look up {model} version {version}",
            lambda: self.client.get_model_version(model, version),
        )
        where = f"{model} version {version}"
        location = self._release_location(str(mv.source), where)
        repo = self._repository(location)
        listing = self.call(f"list {where}", lambda: repo.list_artifacts())
        for info in listing:
            name = PurePosixPath(info.path).name
            if info.is_dir:
                raise VerificationError("fetch", f"{where} holds a folder {name!r}")
            if name not in allowed:
                raise VerificationError(
                    "fetch", f"{where} holds {name!r}, which is not a file of this release"
                )
            _check_size(f"{where}: {name}", info.file_size, allowed[name])
        for info in listing:
            name = PurePosixPath(info.path).name
            if not self._download_capped(repo, name, dst / name, allowed[name]):
                raise RegistryError(f"{where}: {name} vanished while it was downloaded")
        return dst

    def _run_uri(self, run_id: str) -> str:
        return str(self.client.get_run(run_id).info.artifact_uri)

    def _release_location(self, source: str, where: str) -> str:
        """The artifact URI of a version's files, if it is one this store may read."""
        refused = VerificationError(
            "fetch",
            f"{where} has source {source!r}: only this registry's artifact store is read "
            "(mlflow-artifacts:/ or runs:/)",
        )
        parsed = urllib.parse.urlparse(source)
        if ".." in PurePosixPath(urllib.parse.unquote(parsed.path)).parts:
            raise refused
        if parsed.scheme == "runs":
            run_id, _, path = source.removeprefix("runs:/").partition("/")
            if not run_id.isalnum():
                raise refused
            run_uri = self.call(f"look up the run of {where}", lambda: self._run_uri(run_id))
            return self._release_location(f"{run_uri.rstrip('/')}/{path}", where)
        remote = self.uri.startswith(("http://", "https://"))
        if remote and parsed.scheme == "mlflow-artifacts" and not parsed.netloc:
            return source
        if not remote and parsed.scheme == "file" and not parsed.netloc:
            exp = self.experiment_id(create=False)
            if exp is not None:
                root = self.call(
                    "look up the registry experiment",
                    lambda: self.client.get_experiment(exp).artifact_location,
                )
                store_root = Path(urllib.parse.urlparse(root).path).resolve()
                if Path(urllib.parse.unquote(parsed.path)).resolve().is_relative_to(store_root):
                    return source
        raise refused

    def _repository(self, artifact_uri: str) -> Any:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return self.call(
            "open the artifact store",
            lambda: get_artifact_repository(artifact_uri=artifact_uri, tracking_uri=self.uri),
        )

    def _download_capped(self, repo: Any, name: str, dst: Path, limit: int) -> bool:
        """Download one file to ``dst``, never more than ``limit`` bytes; False if absent."""
        from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
        from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

        if isinstance(repo, HttpArtifactRepository):
            from mlflow.utils.credentials import get_default_host_creds
            from mlflow.utils.rest_utils import augmented_raise_for_status, http_request

            def stream() -> bool:
                creds = get_default_host_creds(repo.artifact_uri)
                with http_request(creds, f"/{name}", "GET", stream=True) as resp:
                    if resp.status_code == 404:
                        return False
                    augmented_raise_for_status(resp)
                    return self._write_capped(resp, name, dst, limit)

            return self.call(f"download {name}", stream)
        if isinstance(repo, LocalArtifactRepository):  # an embedded store on this machine
            local = Path(repo.artifact_dir) / name
            if not local.is_file():
                return False
            _check_size(name, local.stat().st_size, limit)
            self.call(f"copy {name}", lambda: repo.download_artifacts(name, str(dst.parent)))
            _check_size(name, dst.stat().st_size, limit)
            return True
        raise RegistryError(f"{self.uri}: unsupported artifact store {repo.artifact_uri}")

    @staticmethod
    def _write_capped(resp: Any, name: str, dst: Path, limit: int) -> bool:
        # The announced size is checked before the body is asked for at all.
        announced = resp.headers.get("Content-Length")
        if announced is not None:
            _check_size(name, int(announced), limit)
        received = 0
        with dst.open("wb") as fh:
            for chunk in resp.iter_content(1 << 20):
                received += len(chunk)
                _check_size(f"{name} (while downloading)", received, limit)
                fh.write(chunk)
        return True

    @staticmethod
    def quietly(fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:  # cleanup after a failure; the first error is what matters
            log.warning("cleanup failed: %s", exc)


def _check_size(what: str, size: int | None, limit: int) -> None:
    if size is None:
        raise VerificationError("fetch", f"{what}: the registry does not say its size")
    if size > limit:
        raise VerificationError("fetch", f"{what} is {size} bytes, over its limit of {limit}")


@contextmanager
def staging(prefix: str, *, under: Path | None = None) -> Iterator[Path]:
    """A temporary folder, removed afterwards; ``under`` puts it on that folder's file system."""
    if under is not None:
        under.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=under) as tmp:
        yield Path(tmp)
