"""A refresh's registry work in a child process: the serving process only loads and swaps.

Refreshing the signed index (TUF), downloading a release's files and accepting them
(`registry.accept`) is mostly Python: about 35 ms of CPU per refresh on a small adapter.
Run in the node's own process, it holds the GIL in slices that every torch op of a
concurrent forward has to wait for (a MiniLM forward goes from 10 ms to ~40 ms beside a
busy Python thread, for any `sys.setswitchinterval`), so requests that overlap a refresh
were the node's p99. Here that work runs in one long-lived child process, forked from a
fork server that has these modules imported (no copy of the node's threads or model), at
a lower CPU priority than serving. The node hands it what it has loaded and gets back
what the fresh index says and, when a release is to be loaded, an `AcceptedRelease`
whose folder is the cache copy the child installed.

The child is the node's own code with the node's own trust store and cache, not a new
party: the trust chain is the one `registry.accept` documents, and the node loads the
files from the folder they were accepted in (`clients.edge.runtime` re-reads and re-hashes
them against the accepted digest, so a folder changed in between is refused).

Two things to know when embedding `EdgeNode` in a script of one's own: as with any
multiprocessing start method but fork, the worker imports the script's main module, so
it needs an ``if __name__ == "__main__":`` guard; and the worker takes the process
environment as it is when the worker starts (registry credentials from environment
variables that change later reach it after `RegistryWorker.close`, or after a failed
refresh; credentials files are read on every use).

    worker = RegistryWorker(registry_uri=uri, trust=trust_dir, cache=cache, base_digest=d)
    prepared = worker.prepare("intents", "production", active=held, previous=None)
    prepared.raise_for_error()   # after applying prepared.revoked_*
    worker.close()
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path

from clients.task.errors import FedloraError
from clients.task.files import swap_directory
from registry.accept import AcceptedRelease, accept
from registry.errors import RegistryUnavailable, VerificationError
from registry.index import ReleaseRecord, Revocations
from registry.index_consumer import IndexClient
from registry.keys import TrustStore
from registry.mlflow_store import MlflowStore, staging
from registry.policy import LocalPolicy
from registry.pull import aliased_release, download

log = logging.getLogger(__name__)

# Serving runs at the node's priority; the registry work yields the CPU to it when both
# want a core (CFS weight of nice 10 is about a tenth of nice 0's).
WORKER_NICENESS = 10


@dataclass(frozen=True)
class Held:
    """A release the node has loaded: what the child needs to compare and re-accept it."""

    digest: str
    key_id: str
    directory: Path


@dataclass(frozen=True)
class Refusal:
    """An error of the child, carried as data (exception pickling loses fields)."""

    kind: str  # unavailable | verification | fedlora (any other error: its type and text)
    message: str
    reason: str = ""  # VerificationError.reason
    detail: str = ""

    def exception(self) -> FedloraError:
        if self.kind == "unavailable":
            return RegistryUnavailable(self.message)
        if self.kind == "verification":
            return VerificationError(self.reason, self.detail)
        return FedloraError(self.message)


@dataclass(frozen=True)
class Prepared:
    """What one refresh of one model found, from the child.

    Attributes:
        revocations: The (key ids, release digests) the fresh index revokes; None when
            the index could not be refreshed (then ``error`` is set).
        record: The release the index names for the alias; None with ``error``.
        accepted: The release to swap in, accepted (its folder is in the cache): the
            cached previous release accepted again, or a new one; None when the alias
            names the active release or with ``error``.
        models: The models the fresh index records; None when it could not be
            refreshed (or read back).
        error: Why the refresh stops; raise it after applying the revocations.
        download_s: Seconds spent downloading (0 when nothing was downloaded).
        verify_s: Seconds spent accepting and installing.
    """

    revocations: Revocations | None = None
    record: ReleaseRecord | None = None
    accepted: AcceptedRelease | None = None
    models: tuple[str, ...] | None = None
    error: Refusal | None = None
    download_s: float = 0.0
    verify_s: float = 0.0

    def raise_for_error(self) -> None:
        if self.error is not None:
            raise self.error.exception()


def release_home(cache: Path, model: str, digest: str) -> Path:
    """The cache folder of an accepted release: named after its manifest digest."""
    return cache / "releases" / model / digest


# ------------------------------------------------------------------------- child side


@dataclass
class _Child:
    registry_uri: str
    trust: TrustStore
    cache: Path
    policy: LocalPolicy
    index: IndexClient
    store: MlflowStore | None = None

    def registry(self) -> MlflowStore:
        if self.store is None:
            # A node only reads: a mistyped SQLite path is an unreachable registry, never a
            # new empty one (a node started before the first publish finds it later).
            self.store = MlflowStore(self.registry_uri, create=False)
        else:
            self.store.check_reachable()
        return self.store

    def fetch_index(self, name: str, max_length: int) -> bytes | None:
        # The refresh asking for it checked the registry is reachable a moment ago.
        store = self.store if self.store is not None else self.registry()
        return store.fetch_index_file(name, max_length)


_child: _Child | None = None
_child_args: tuple[str, Path, Path, str | None, float | None] | None = None


def _log_setup() -> bytes:
    """How this process logs (the CLI's `quiet_libraries`: format, time stamps, filters),
    pickled for the worker to log the same way (`_install_logging`): the root's level,
    whether warnings are captured, and each plain stream handler's stream, formatter,
    filters and level. Handlers of other kinds (a file, a test's capture) are not copied.
    A handler that cannot be pickled (a lambda filter) is not copied either, and then the
    worker logs nothing (a filter may redact), which is warned of here."""
    root = logging.getLogger()
    handlers: list[tuple[bool, logging.Formatter | None, list, int]] | None = []
    for handler in root.handlers:
        if type(handler) is not logging.StreamHandler:
            continue
        stdout = handler.stream in (sys.stdout, sys.__stdout__)
        part = (stdout, handler.formatter, list(handler.filters), handler.level)
        try:
            pickle.dumps(part)
        except Exception as exc:
            log.warning("the refresh worker will log nothing: a log handler of this process "
                        "cannot be passed to it (%s)", exc)  # fmt: skip
            handlers = None
            break
        handlers.append(part)  # type: ignore[union-attr]  # None only after the break
    captured = getattr(warnings.showwarning, "__module__", None) == "logging"
    return pickle.dumps((root.level, captured, handlers))


def _install_logging(setup: bytes) -> None:
    """The worker's side of `_log_setup`. A fresh process from the fork server has no
    handlers, and without these its records (a refresh's traceback) would reach stderr
    bare, with no time or level. Fails closed: what cannot be set up logs nothing."""
    root = logging.getLogger()
    try:
        level, captured, handlers = pickle.loads(setup)
    except Exception as exc:  # e.g. a filter's class the worker cannot import
        with contextlib.suppress(Exception):  # no stderr at all: nothing to say it on
            sys.stderr.write(f"refresh worker: its log records are dropped ({exc!r})\n")
        handlers = None
    if handlers is None:
        root.addHandler(logging.NullHandler())  # not Python's last resort either
        return
    root.setLevel(level)
    logging.captureWarnings(captured)
    for stdout, formatter, filters, handler_level in handlers:
        # The fork server's streams: the node's.
        handler = logging.StreamHandler(sys.stdout if stdout else sys.stderr)
        handler.setFormatter(formatter)
        handler.setLevel(handler_level)
        for f in filters:
            handler.addFilter(f)
        root.addHandler(handler)


def _start_child(
    args: tuple[str, Path, Path, str | None, float | None],
    environ: dict[str, str],
    logs: bytes,
) -> None:
    """Worker initializer: the node's environment and log format, a lower priority, no
    Ctrl-C. Never raises (an initializer error breaks the pool without a reason);
    `_child_state` reports errors."""
    global _child_args
    _install_logging(logs)
    # Ctrl-C reaches the whole process group; the node stops its worker itself
    # (`RegistryWorker.close`), and a KeyboardInterrupt here would only print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The fork server started with the environment of its first user; credentials and
    # proxies are the node's as of the worker's start, as with a spawned process.
    os.environ.clear()
    os.environ.update(environ)
    _child_args = args
    try:
        os.nice(WORKER_NICENESS)
    except OSError as exc:  # e.g. a sandbox that forbids it: slower serving, same results
        log.warning("could not lower the refresh worker's priority: %s", exc)


def _child_state() -> _Child:
    """The child's registry side, built on first use (errors are the refresh's errors)."""
    global _child
    if _child is None:
        assert _child_args is not None, "the refresh worker was not initialised"
        registry_uri, trust, cache, base_digest, max_epsilon = _child_args
        trust_store = TrustStore.load(trust)
        child = _Child(
            registry_uri=registry_uri,
            trust=trust_store,
            cache=cache,
            policy=LocalPolicy(base_digest=base_digest, max_epsilon=max_epsilon),
            index=None,  # type: ignore[arg-type]  # set below: it calls back into the child
        )
        child.index = IndexClient(child.fetch_index, cache / "tuf", trust_store)
        # A worker killed mid-download (timeout, node stopped) leaves its staging folder;
        # this node's worker is the only writer there, so what is left is garbage.
        for stale in (cache / "staging").glob("fedlora-edge-*"):
            shutil.rmtree(stale, ignore_errors=True)
        _child = child
    return _child


def _refusal(exc: Exception) -> Refusal:
    if isinstance(exc, RegistryUnavailable):
        return Refusal("unavailable", str(exc))
    if isinstance(exc, VerificationError):
        return Refusal("verification", str(exc), reason=exc.reason, detail=exc.detail)
    if isinstance(exc, FedloraError):
        return Refusal("fedlora", str(exc))
    log.error("refresh failed", exc_info=exc)  # a bug or the machine: the traceback matters
    return Refusal("fedlora", f"refresh failed: {type(exc).__name__}: {exc}")


def _models(index: IndexClient) -> tuple[str, ...] | None:
    try:
        return tuple(index.models())
    # Only `EdgeNode.unknown_models`'s warning is at stake: no error reading the cached
    # listing (python-tuf's included) may cost the refresh the revocations it read.
    except Exception:
        return None


def _prepare(model: str, alias: str, active: Held | None, previous: Held | None) -> Prepared:
    """The child's refresh of one model; every fedlora error comes back as data."""
    try:
        child = _child_state()
        store = child.registry()
        child.index.refresh()
    except Exception as exc:  # all of it back as data: nothing else crosses to the node
        return Prepared(error=_refusal(exc))
    keys, digests = child.index.revocations()
    found = Prepared(revocations=(keys, digests), models=_models(child.index))
    try:
        record = aliased_release(child.index, model=model, alias=alias)
        found = replace(found, record=record)

        def holds(held: Held | None) -> bool:
            return (
                held is not None
                and held.digest == record.digest
                and held.digest not in digests
                and held.key_id not in keys
            )

        if holds(active):
            return found

        def check(directory: Path, digest: str | None = None) -> AcceptedRelease:
            return accept(
                directory,
                trust=child.trust,
                model=model,
                index=child.index,
                alias=alias,
                base_digest=child.policy.base_digest,
                policy=child.policy,
                digest=digest,
            )

        start = time.perf_counter()
        if holds(previous):
            # A rollback to the release still loaded: its cached files must pass again, as
            # the release they are named after, and the index must agree.
            assert previous is not None
            accepted = check(previous.directory, record.digest)
            return replace(found, accepted=accepted, verify_s=time.perf_counter() - start)
        with staging("fedlora-edge-", under=child.cache / "staging") as tmp:
            directory = download(store, record, model=model, dst=tmp / "release")
            downloaded = time.perf_counter()
            accepted = check(directory)
            # A folder already in the cache is never trusted as it is: it may have been
            # changed since it was accepted, or hold another release's files.
            home = release_home(child.cache, model, accepted.digest)
            swap_directory(directory, home)
        return replace(
            found,
            accepted=replace(accepted, directory=home),
            download_s=downloaded - start,
            verify_s=time.perf_counter() - downloaded,
        )
    except Exception as exc:  # e.g. a full disk: the revocations must reach the node anyway
        return replace(found, error=_refusal(exc))


# ------------------------------------------------------------------------ node side


class RegistryWorker:
    """One child process that does the registry side of every refresh of one node.

    Started on first use; a child that dies (killed, out of memory) or overruns
    ``timeout_s`` fails that refresh with a `FedloraError` (the overrunning one is killed)
    and is replaced on the next one. Calls are serialised by the node's refresh lock;
    this class adds its own for `close`.

    Args:
        registry_uri: The MLflow tracking URI.
        trust: The node's trust directory (`registry.keys.TrustStore`).
        cache: The node's cache; the child owns ``tuf/``, ``staging/`` and ``releases/``
            writes under it while the node serves.
        base_digest: The digest of the base the node serves (`LocalPolicy`).
        max_epsilon: The node's ε limit (`LocalPolicy`), or None.
        timeout_s: The longest one `prepare` may take (seconds).
    """

    def __init__(
        self,
        *,
        registry_uri: str,
        trust: Path,
        cache: Path,
        base_digest: str | None,
        max_epsilon: float | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self._args = (registry_uri, trust, cache, base_digest, max_epsilon)
        self._timeout_s = timeout_s
        self._pool: ProcessPoolExecutor | None = None
        self._pid: int | None = None
        self._busy = False
        self._lock = threading.Lock()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # forkserver: the child is forked from a clean server process with this
                # module and MLflow (1.7 s to import) imported, never from the serving
                # process (its threads, its model).
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload([__name__, "mlflow"])
                pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=context,
                    initializer=_start_child,
                    initargs=(self._args, dict(os.environ), _log_setup()),
                )
                self._pool = pool
                self._pid = pool.submit(os.getpid).result(timeout=self._timeout_s)
            return self._pool

    def prepare(
        self, model: str, alias: str, *, active: Held | None, previous: Held | None
    ) -> Prepared:
        """Refresh the index and fetch what ``model@alias`` needs, in the child.

        Raises:
            RegistryUnavailable: The work took longer than ``timeout_s``; the child was
                killed (the next call starts a new one).
            FedloraError: The child process stopped (the next call starts a new one).
        """
        pool = self._executor()
        self._busy = True
        try:
            return pool.submit(_prepare, model, alias, active, previous).result(
                timeout=self._timeout_s
            )
        except TimeoutError:
            self._stop(pool, kill=True)
            raise RegistryUnavailable(
                f"refreshing {model}@{alias} took longer than {self._timeout_s:g} s "
                "(--refresh-timeout-s); its worker was stopped"
            ) from None
        except BrokenProcessPool as exc:
            self._stop(pool, kill=False)
            raise FedloraError(
                f"the refresh worker process stopped ({exc}); the next refresh starts another"
            ) from exc
        finally:
            self._busy = False

    def _stop(self, pool: ProcessPoolExecutor, *, kill: bool) -> None:
        with self._lock:
            pid = self._pid
            if self._pool is pool:
                self._pool, self._pid = None, None
        if kill and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Prompt in every case: an idle worker exits on its own, a dead or killed one is
        # seen by the pool's manager thread.
        pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Stop the worker; one stuck in a refresh is killed rather than waited for."""
        with self._lock:
            pool = self._pool
        if pool is not None:
            self._stop(pool, kill=self._busy)
