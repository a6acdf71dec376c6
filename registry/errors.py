"""Errors of the model lifecycle: keys, signatures, freshness, the MLflow registry.

`VerificationError.reason` is a short, stable token (``signature``, ``untrusted-key``,
``wrong-release``, ``revoked-key``, ``revoked-release``, ``stale``, ``expired``,
``base-mismatch``, ``policy``, ``unsigned``, ``index``, ``fetch``, ``unloadable``) so an
edge node can count refusals by reason.
"""

from __future__ import annotations

from clients.task.errors import FedloraError

REASONS = (
    "unsigned",
    "signature",
    "untrusted-key",
    "wrong-release",  # validly signed, but not the release it was expected to be
    "revoked-key",
    "revoked-release",
    "stale",
    "expired",
    "index",
    "base-mismatch",
    "policy",
    "fetch",  # refused before download: a source, file or size the release cannot have
    # signed, but the loaded model would not use exactly the tensors of its files
    "unloadable",
)


class RegistryError(FedloraError):
    """A registry, key or artifact operation could not be done."""


class KeyFileError(RegistryError):
    """A key file is missing, malformed, of an unsupported type or locked."""


class RegistryUnavailable(RegistryError):
    """The MLflow tracking server cannot be reached or refused the credentials."""


class PromotionRefused(RegistryError):
    """A promotion gate of the policy file failed."""

    def __init__(self, gate: str, detail: str) -> None:
        super().__init__(f"promotion refused by gate {gate!r}: {detail}")
        self.gate = gate
        self.detail = detail


class VerificationError(RegistryError):
    """An artifact or its metadata did not verify; nothing of it may be loaded."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown verification reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
