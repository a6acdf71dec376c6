"""Accept a release: the one place that decides whether a release directory may be loaded.

Like model-signing's `Verifier.verify`, the order is code, not a convention each caller
repeats. `accept` runs these steps and stops at the first that fails, raising
`VerificationError` with the step's reason:

1. signature: every file matches ``model.sig``, made by a key in the local trust store
   (``unsigned``, ``untrusted-key``, ``signature``), and, when the caller knows which
   release it must be (a cache entry named by its digest), it is that one
   (``wrong-release``); and its ``fedlora_task.json`` and provenance name the same
   pooling of the head (``unloadable``: an older publisher's provenance lacks it);
2. model name: the signed provenance names the model asked for (``index``);
3. revocation: the release index revokes neither the signing key nor the release
   (``revoked-key``, ``revoked-release``);
4. alias freshness: the signed index points the alias at exactly this release, so an
   older release aliased again is refused (``index``, ``stale``);
5. base digest: the release was trained on this consumer's base model (``base-mismatch``);
6. local policy: the caller's own rules, e.g. a maximum ε (``policy``) or the promotion
   gates (`PromotionRefused`).

It returns an `AcceptedRelease`, the only type `clients.edge.runtime.Runtime.load` takes.
The callers differ only in the arguments, never in the order:

    caller                               index                         alias         digest
    edge node refresh, edge pull         refreshed `IndexClient`       alias served  -
    edge node, a release from its cache  refreshed `IndexClient`       alias served  folder
    edge node restart, registry down     `IndexClient.load_cached()`   None          folder
    publish                              `IndexRepository`             None          -
    promote                              `IndexRepository`             None          record
    fedlora edge verify (offline)        None                          None          -

    accepted = accept(Path("release"), trust=trust, model="intents", index=client,
                      alias="production", base_digest=runtime.base_digest,
                      policy=LocalPolicy(max_epsilon=8.0))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from clients.task.choices import LEGACY_POOLING, TASK_FILE
from registry.artifact import Provenance
from registry.errors import RegistryError, VerificationError
from registry.index import ReleaseIndex, check_alias, check_not_revoked
from registry.keys import TrustStore
from registry.signing import verify_release


@dataclass(frozen=True)
class AcceptedRelease:
    """A release directory that passed every step of `accept` its caller asked for."""

    directory: Path
    key_id: str
    digest: str  # manifest digest (`registry.signing.manifest_digest`)
    provenance: Provenance


class ReleasePolicy(Protocol):
    """Step 6 of `accept`: the caller's own rules over a release's signed provenance."""

    def check(self, provenance: Provenance) -> None:
        """Raise (`VerificationError` or `PromotionRefused`) if the release is not wanted."""
        ...


def check_same_pooling(directory: Path, prov: Provenance) -> None:
    """Refuse a signed release whose ``fedlora_task.json`` and provenance disagree on what
    the head reads (a publisher from before ``pooling`` signs a v1 provenance without it
    over a task file that says ``mean``: served with BERT's pooler, it would answer wrong).

    Raises:
        VerificationError: ``unloadable``, naming both values.
    """
    try:
        task = json.loads((directory / TASK_FILE).read_text(encoding="utf-8"))
        said = task.get("pooling", LEGACY_POOLING) if isinstance(task, dict) else None
    except (OSError, ValueError) as exc:
        raise VerificationError("unloadable", f"{TASK_FILE}: unreadable: {exc}") from exc
    if said != prov.pooling:
        raise VerificationError(
            "unloadable",
            f"{TASK_FILE} says pooling={said!r}, provenance.json says {prov.pooling!r}: the "
            "head would be served with another pooling than it was trained with",
        )


def accept(
    directory: Path,
    *,
    trust: TrustStore,
    model: str | None,
    index: ReleaseIndex | None,
    alias: str | None,
    base_digest: str | None = None,
    policy: ReleasePolicy | None = None,
    digest: str | None = None,
) -> AcceptedRelease:
    """Run the fixed order of checks on ``directory``; return it as an `AcceptedRelease`.

    Args:
        directory: the release (a PEFT directory with ``provenance.json`` and ``model.sig``).
        trust: the local trust store; the only keys whose signatures count.
        model: the model the release must be of; None only to verify a directory offline
            without knowing what it is meant to be.
        index: the release index for revocation and alias freshness; None only offline,
            where neither can be known.
        alias: the alias the index must point at this release; None when the release is
            not being taken as an alias's current value (a restart from the cache, a
            promotion that is about to move the alias).
        base_digest: the digest of the base model the release will be loaded on.
        policy: the caller's rules, checked last.
        digest: the manifest digest the release must have, when the caller knows which
            release it must be: a cache folder is bound to the digest it is named after,
            a promoted version to the digest its signed release record names.

    Raises:
        VerificationError: the first step that fails, by reason (see the module docstring).
        RegistryError: an alias without an index or a model to check it against.
    """
    if alias is not None and (index is None or model is None):
        raise RegistryError(f"alias {alias!r} can only be checked with a model and an index")
    verified = verify_release(directory, trust)
    prov = verified.provenance
    check_same_pooling(verified.directory, prov)
    if digest is not None and verified.digest != digest:
        raise VerificationError(
            "wrong-release",
            f"{directory} holds release {prov.release} ({verified.digest[:16]}), "
            f"expected {digest[:16]}",
        )
    if model is not None and prov.model_name != model:
        raise VerificationError("index", f"release is of model {prov.model_name!r}, not {model!r}")
    if index is not None:
        check_not_revoked(index.revocations(), key=verified.key_id, digest=verified.digest)
    if index is not None and model is not None and alias is not None:
        check_alias(index, model=model, alias=alias, digest=verified.digest, release=prov.release)
    if base_digest is not None and prov.base_digest != base_digest:
        raise VerificationError(
            "base-mismatch",
            f"release {prov.release} was trained on base {prov.base_digest[:16]}, "
            f"this node has {base_digest[:16]}",
        )
    if policy is not None:
        policy.check(prov)
    return AcceptedRelease(verified.directory, verified.key_id, verified.digest, prov)
