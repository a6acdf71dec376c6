"""Fetch a release for an alias and accept it only if it verifies, end to end.

resolve alias (MLflow, untrusted) -> download into a staging folder -> signature by a
trusted key -> release index refreshed with python-tuf: not revoked, and the alias really
points at this release (no replay of an older one) -> local policy (base-model digest,
maximum ε) -> swap into place (`clients.task.files.swap_directory`). Nothing unverified is
ever left at ``out``.

    release = pull(store, model="intents", alias="production", trust=trust,
                   out=Path("adapters/intents"), state=Path("~/.fedlora/edge"))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clients.task.files import swap_directory
from registry.errors import RegistryError, VerificationError
from registry.freshness import IndexClient
from registry.keys import TrustStore
from registry.mlflow_store import MlflowStore, staging
from registry.signing import VerifiedRelease, verify_release


@dataclass(frozen=True)
class LocalPolicy:
    """What this consumer accepts on top of a valid signature and a fresh index."""

    base_digest: str | None = None
    max_epsilon: float | None = None

    def check(self, verified: VerifiedRelease) -> None:
        prov = verified.provenance
        if self.base_digest is not None and prov.base_digest != self.base_digest:
            raise VerificationError(
                "base-mismatch",
                f"release {prov.release} was trained on base {prov.base_digest[:16]}, "
                f"this node has {self.base_digest[:16]}",
            )
        eps = prov.epsilon()
        if self.max_epsilon is not None and eps is not None and eps > self.max_epsilon:
            raise VerificationError(
                "policy", f"release {prov.release} has ε={eps:.4g} > max-epsilon={self.max_epsilon}"
            )


def check_release(
    verified: VerifiedRelease,
    index: IndexClient,
    *,
    model: str,
    alias: str | None,
    policy: LocalPolicy,
) -> None:
    """Every check after the signature: revocation, alias freshness, local policy."""
    if verified.provenance.model_name != model:
        raise VerificationError(
            "index", f"release is of model {verified.provenance.model_name!r}, not {model!r}"
        )
    index.check(
        model=model,
        alias=alias,
        key=verified.key_id,
        digest=verified.digest,
        release=verified.provenance.release,
    )
    policy.check(verified)


def pull(
    store: MlflowStore,
    *,
    model: str,
    alias: str,
    trust: TrustStore,
    out: Path,
    state: Path,
    policy: LocalPolicy | None = None,
) -> VerifiedRelease:
    """Download ``model@alias``, verify it, and install it at ``out``."""
    version = store.alias_version(model, alias)
    if version is None:
        raise RegistryError(f"{store.uri} has no alias {model}@{alias}")
    index = IndexClient(store.fetch_index_file, state / "tuf", trust)
    index.refresh()
    with staging("fedlora-pull-") as tmp:
        directory = store.download_version(model, version, tmp)
        verified = verify_release(directory, trust)
        check_release(verified, index, model=model, alias=alias, policy=policy or LocalPolicy())
        swap_directory(directory, out)
    return VerifiedRelease(out, verified.key_id, verified.digest, verified.provenance)
