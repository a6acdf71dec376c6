"""Fetch a release for an alias and install it only once `registry.accept` accepted it.

resolve alias (MLflow, untrusted) -> refresh the release index (python-tuf) -> download
into a staging folder -> `accept` (signature, model, revocation, alias freshness, base
digest, local policy) -> swap into place (`clients.task.files.swap_directory`). Nothing
unaccepted is ever left at ``out``.

    release = pull(store, model="intents", alias="production", trust=trust,
                   out=Path("adapters/intents"), state=Path("~/.fedlora/edge"))
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from clients.task.files import swap_directory
from registry.accept import AcceptedRelease, accept
from registry.errors import RegistryError
from registry.index_consumer import IndexClient
from registry.keys import TrustStore
from registry.mlflow_store import MlflowStore, staging
from registry.policy import LocalPolicy


def pull(
    store: MlflowStore,
    *,
    model: str,
    alias: str,
    trust: TrustStore,
    out: Path,
    state: Path,
    policy: LocalPolicy | None = None,
) -> AcceptedRelease:
    """Download ``model@alias``, accept it, and install it at ``out``."""
    policy = policy or LocalPolicy()
    version = store.alias_version(model, alias)
    if version is None:
        raise RegistryError(f"{store.uri} has no alias {model}@{alias}")
    index = IndexClient(store.fetch_index_file, state / "tuf", trust)
    index.refresh()
    with staging("fedlora-pull-") as tmp:
        directory = store.download_version(model, version, tmp)
        accepted = accept(
            directory,
            trust=trust,
            model=model,
            index=index,
            alias=alias,
            base_digest=policy.base_digest,
            policy=policy,
        )
        swap_directory(directory, out)
    # The installed files are the accepted ones, moved (or copied) into place.
    return replace(accepted, directory=out)
