"""The edge node: keep each model's adapter current, verified, and swappable.

For each model the node holds an ``active`` release (answers new requests) and the
``previous`` one (kept loaded for instant rollback). A refresh refreshes the release
index (TUF) and takes the release it names for the alias (MLflow's own aliases are never
read), downloads that release's recorded files into a staging folder in the cache,
accepts it (`registry.accept`) and installs it into the cache under its digest — all of
that in the node's refresh worker process (`clients.edge.fetcher`), so it never holds the
GIL a forward needs — then loads the accepted tensors as an adapter on the shared base
(`clients.edge.runtime`) in the serving process and swaps
with one assignment: requests that already hold the old release finish on it, and a
release that leaves both places is retired (its adapter is freed after its last request).
Any failure keeps the current release serving, reports ``degraded`` with the reason and
is counted by reason. A cache folder is accepted again, bound to the digest it is named
after, every time it is loaded from; with the registry down at start, the node accepts
its cached release against the cached index instead. Corrupt local state degrades the
node, it never stops it.

    node = EdgeNode(settings)
    node.start()                    # registry, or the verified cache when it is down
    node.slot("intents").active.predict(["hello"])
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients.edge.fetcher import Held, RegistryWorker, release_home
from clients.edge.metrics import EdgeMetrics
from clients.edge.runtime import Batching, LoadedRelease, Runtime
from clients.edge.settings import EdgeSettings, ModelRef
from clients.task.errors import FedloraError
from clients.task.files import write_atomic
from registry.accept import AcceptedRelease, accept
from registry.errors import RegistryUnavailable, VerificationError
from registry.index import Revocations
from registry.index_consumer import IndexClient
from registry.keys import TrustStore
from registry.policy import LocalPolicy

log = logging.getLogger(__name__)


@dataclass
class ModelSlot:
    ref: ModelRef
    active: LoadedRelease | None = None
    previous: LoadedRelease | None = None
    source: str = "none"  # registry | cache | none
    last_error: str | None = None
    last_used: float = field(default_factory=time.monotonic)

    def status(self) -> str:
        if self.active is None:
            return "unavailable"
        return "ok" if self.source == "registry" and self.last_error is None else "degraded"


class EdgeNode:
    def __init__(
        self,
        settings: EdgeSettings,
        *,
        runtime: Runtime | None = None,
        metrics: EdgeMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.trust = TrustStore.load(settings.trust)
        self.metrics = metrics or EdgeMetrics()
        if runtime is None:
            import torch

            torch.set_num_threads(settings.torch_threads)
            runtime = Runtime(
                base=settings.base,
                quantization=settings.quantization,
                max_new_tokens=settings.max_new_tokens,
                batching=Batching(
                    max_rows=settings.max_batch,
                    max_queue=settings.max_queue,
                    max_wait_s=settings.batch_wait_ms / 1000,
                    on_batch=self.metrics.batch_rows.observe,
                ),
            )
        self.runtime = runtime
        self.metrics.bases.set_function(lambda: len(self.runtime.bases))
        self.policy = LocalPolicy(
            base_digest=self.runtime.base_digest, max_epsilon=settings.max_epsilon
        )
        self.slots = {ref.name: ModelSlot(ref) for ref in settings.models}
        # The models the registry's index recorded at the last refresh that reached it.
        self.index_models: tuple[str, ...] | None = None
        self._refresh_lock = threading.Lock()  # one refresh at a time; serving never waits
        self.settings.cache.mkdir(parents=True, exist_ok=True)
        self.index = IndexClient(self._no_fetch, settings.cache / "tuf", self.trust)
        self.worker = RegistryWorker(
            registry_uri=settings.registry_uri,
            trust=settings.trust,
            cache=settings.cache,
            base_digest=self.policy.base_digest,
            max_epsilon=settings.max_epsilon,
            timeout_s=settings.refresh_timeout_s,
        )

    # registry access ---------------------------------------------------------------

    @staticmethod
    def _no_fetch(name: str, max_length: int) -> bytes | None:
        # This process reads the cached index only (at start, when the registry is down);
        # every fetch from the registry runs in the refresh worker.
        raise RegistryUnavailable(f"the serving process does not fetch {name}")

    def _accept(
        self, slot: ModelSlot, directory: Path, *, alias: str | None, digest: str | None = None
    ) -> AcceptedRelease:
        """`registry.accept` with this node's trust store, index, base and policy."""
        return accept(
            directory,
            trust=self.trust,
            model=slot.ref.name,
            index=self.index,
            alias=alias,
            base_digest=self.policy.base_digest,
            policy=self.policy,
            digest=digest,
        )

    # lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Load every model: from the registry, else from the verified cache."""
        for slot in self.slots.values():
            # Neither a failed check nor corrupt local state may keep the node from starting:
            # it serves what it can verify and reports the rest as degraded, with the reason.
            try:
                self.refresh(slot.ref.name)  # records a registry or check failure itself
                if slot.active is None:
                    self._load_cached(slot)
            except Exception as exc:
                log.exception("%s: could not load", slot.ref)
                slot.last_error = f"could not load: {type(exc).__name__}: {exc}"

    def unknown_models(self) -> list[str]:
        """The served models the release index does not know (a typo, most likely);
        empty when no refresh has reached the registry, so a node that starts from its
        cache is never refused by this."""
        if self.index_models is None:
            return []
        return [name for name in self.slots if name not in self.index_models]

    def close(self) -> None:
        """Stop the refresh worker process (a later refresh starts a new one)."""
        self.worker.close()

    def refresh_all(self) -> dict[str, bool]:
        cycle = time.monotonic()
        try:
            return {name: self.refresh(name) for name in self.slots}
        finally:  # the base kept for a release refused at load goes once it is not retried
            self.runtime.trim_idle(before=cycle)

    def refresh(self, name: str) -> bool:
        """Bring one model up to its alias; True if a new release was swapped in."""
        slot = self.slots[name]
        with self._refresh_lock:
            try:
                return self._refresh(slot)
            except RegistryUnavailable as exc:
                self.metrics.registry_errors.inc()
                slot.last_error = f"registry unreachable: {exc}"
                log.warning("%s: %s", slot.ref, slot.last_error)
                return False
            except VerificationError as exc:
                self.metrics.verification_failures.labels(name, exc.reason).inc()
                slot.last_error = f"refused: {exc}"
                log.warning("%s: %s", slot.ref, slot.last_error)
                return False
            except FedloraError as exc:
                slot.last_error = str(exc)
                log.warning("%s: %s", slot.ref, exc)
                return False
            except Exception as exc:  # one model's bug must not stop the others' refreshes
                log.exception("%s: refresh failed", slot.ref)
                slot.last_error = f"refresh failed: {type(exc).__name__}: {exc}"
                return False

    def _refresh(self, slot: ModelSlot) -> bool:
        def held(release: LoadedRelease | None) -> Held | None:
            if release is None:
                return None
            v = release.verified
            return Held(digest=v.digest, key_id=v.key_id, directory=v.directory)

        start = time.perf_counter()
        try:
            prepared = self.worker.prepare(
                slot.ref.name,
                slot.ref.alias,
                active=held(slot.active),
                previous=held(slot.previous),
            )
        except FedloraError:
            # The worker died or overran: what it may have verified of a fresh index is
            # on disk; revocations there must still take effect.
            self._revoke_from_cache()
            raise
        if prepared.models is not None:
            self.index_models = prepared.models
        if prepared.revocations is not None:
            for each in self.slots.values():  # revocations are global, not per alias
                self._drop_revoked(each, prepared.revocations)
        prepared.raise_for_error()
        # What the signed index names for the alias; MLflow only says where its files are.
        record, accepted = prepared.record, prepared.accepted
        assert record is not None
        if slot.active is not None and slot.active.verified.digest == record.digest:
            slot.source, slot.last_error = "registry", None
            return False
        if accepted is None:  # the worker found the alias on a release it did not fetch
            raise FedloraError(f"{slot.ref}: the refresh worker fetched no release to load")
        previous = slot.previous
        if previous is not None and previous.verified.digest == record.digest:
            # A rollback to the release still loaded, whose cached files passed again.
            self._swap(slot, previous, source="registry")
            return True
        checked = time.perf_counter()
        # The files are the cached copy of those just accepted.
        release = self.runtime.load(slot.ref.name, record.version, accepted)
        loaded = time.perf_counter()
        self._swap(slot, release, source="registry")  # serving it from here; then bookkeeping
        done = time.perf_counter()
        stages = self.metrics.swap_seconds
        stages.labels("download").observe(prepared.download_s)
        stages.labels("verify").observe(prepared.verify_s)
        stages.labels("load").observe(loaded - checked)
        stages.labels("total").observe(done - start)
        return True

    def _revoke_from_cache(self) -> None:
        """Apply the revocations of the verified index in the cache to every model."""
        try:
            self.index.load_cached()
            revocations = self.index.revocations()
        except FedloraError as exc:  # no verified index cached: nothing known to revoke
            log.warning("cached release index unreadable: %s", exc)
            return
        for slot in self.slots.values():
            self._drop_revoked(slot, revocations)

    def _drop_revoked(self, slot: ModelSlot, revocations: Revocations) -> None:
        """Stop serving a release the index revokes; fall back to a clean previous."""
        keys, digests = revocations

        def revoked(r: LoadedRelease | None) -> bool:
            return r is not None and (r.verified.digest in digests or r.verified.key_id in keys)

        if revoked(slot.previous):
            assert slot.previous is not None
            slot.previous.retire()
            slot.previous = None
        if revoked(slot.active):
            assert slot.active is not None
            self.metrics.verification_failures.labels(slot.ref.name, "revoked-release").inc()
            log.warning("%s: active release %s is revoked", slot.ref, slot.active.version)
            dropped = slot.active
            slot.active, slot.previous = slot.previous, None
            dropped.retire()  # requests already holding it finish; no new one gets it
            self._publish_state(slot)

    def _swap(self, slot: ModelSlot, release: LoadedRelease, *, source: str) -> None:
        dropped = slot.previous
        slot.previous, slot.active = slot.active, release  # new requests see `release`
        if dropped is not None and dropped is not release:
            dropped.retire()  # its adapter is freed once the requests holding it finish
        slot.source, slot.last_error = source, None
        self.metrics.swaps.labels(slot.ref.name).inc()
        self._publish_state(slot)
        self._evict()
        log.info("%s: serving version %s (%s)", slot.ref, release.version, source)

    def _publish_state(self, slot: ModelSlot) -> None:
        release = slot.active.verified.provenance.release if slot.active else 0
        self.metrics.active_release.labels(slot.ref.name).set(release)
        if slot.active is not None:
            try:
                self._write_state(slot)
            except OSError as exc:  # the cache is a convenience; serving goes on without it
                log.warning("could not record the served release: %s", exc)

    def _evict(self) -> None:
        """Keep at most ``max_loaded`` previous releases in memory (least recently used go)."""
        held = [s for s in self.slots.values() if s.previous is not None]
        held.sort(key=lambda s: s.last_used)
        while len(held) > self.settings.max_loaded:
            evicted = held.pop(0)
            assert evicted.previous is not None
            evicted.previous.retire()
            evicted.previous = None

    # cache -------------------------------------------------------------------------

    def _state_path(self) -> Path:
        return self.settings.cache / "state.json"

    def _read_state(self) -> dict[str, Any]:
        """The node's last served releases; a corrupt or truncated file reads as empty."""
        path = self._state_path()
        try:
            state = json.loads(path.read_bytes()) if path.exists() else {}
        except (OSError, ValueError, RecursionError) as exc:  # Recursion: nested too deep
            log.warning("%s is unreadable (%s); starting from the registry alone", path, exc)
            return {}
        return state if isinstance(state, dict) else {}

    def _write_state(self, slot: ModelSlot) -> None:
        assert slot.active is not None
        path = self._state_path()
        state = self._read_state()
        state[slot.ref.name] = {
            "alias": slot.ref.alias,
            "version": slot.active.version,
            "digest": slot.active.verified.digest,
        }
        write_atomic(path, json.dumps(state, indent=2).encode())

    def _load_cached(self, slot: ModelSlot) -> None:
        """Serve the last accepted release of ``slot`` after accepting it again offline.

        That is the release ``state.json`` names; if that file is missing or corrupt, the
        one the cached (signed) index names for the alias. Every check of `accept` holds.
        """
        try:
            self.index.load_cached()
        except VerificationError as exc:
            self.metrics.verification_failures.labels(slot.ref.name, exc.reason).inc()
            slot.last_error = f"cached release refused: {exc}"
            return
        entry = self._read_state().get(slot.ref.name)
        fields = ("alias", "version", "digest")
        if (
            isinstance(entry, dict)
            and all(isinstance(entry.get(k), str) for k in fields)
            and (entry["alias"] == slot.ref.alias)
        ):
            # No alias check: this is the release the node last served, possibly on purpose
            # instead of a newer one it refused; every other step still holds.
            version, digest, alias = entry["version"], entry["digest"], None
        else:
            indexed = self.index.alias(slot.ref.name, slot.ref.alias)
            if indexed is None:
                slot.last_error = slot.last_error or "no verified release cached"
                return
            version, digest, alias = indexed.version, indexed.digest, slot.ref.alias
        if not re.fullmatch("[0-9a-f]{64}", digest):
            slot.last_error = f"cached state names no release digest ({digest[:80]!r})"
            return
        home = release_home(self.settings.cache, slot.ref.name, digest)
        try:
            # The folder must hold the release it is named after.
            accepted = self._accept(slot, home, alias=alias, digest=digest)
            release = self.runtime.load(slot.ref.name, version, accepted)
        except VerificationError as exc:
            self.metrics.verification_failures.labels(slot.ref.name, exc.reason).inc()
            slot.last_error = f"cached release refused: {exc}"
            return
        except FedloraError as exc:  # e.g. a cache folder that is not a release at all
            slot.last_error = f"cached release unusable: {exc}"
            return
        self._swap(slot, release, source="cache")
        slot.last_error = "registry unreachable; serving the cached release"

    # queries -----------------------------------------------------------------------

    def slot(self, name: str | None) -> ModelSlot:
        if name is None:
            if len(self.slots) != 1:
                raise KeyError("several models are served; name one in 'model'")
            name = next(iter(self.slots))
        slot = self.slots[name]
        slot.last_used = time.monotonic()
        return slot

    def health(self) -> dict[str, Any]:
        models = {
            name: {
                "status": s.status(),
                "alias": s.ref.alias,
                "source": s.source,
                "version": s.active.version if s.active else None,
                "reason": s.last_error,
            }
            for name, s in self.slots.items()
        }
        states = {m["status"] for m in models.values()}
        overall = (
            "ok"
            if states == {"ok"}
            else "unavailable"
            if states == {"unavailable"}
            else ("degraded")
        )
        return {"status": overall, "models": models}

    def adapters(self) -> dict[str, Any]:
        return {
            name: {
                "alias": s.ref.alias,
                "active": s.active.summary() if s.active else None,
                "previous": s.previous.summary() if s.previous else None,
            }
            for name, s in self.slots.items()
        }
