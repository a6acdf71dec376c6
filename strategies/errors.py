"""Errors the server-side strategies raise while they judge a round.

They sit beside the strategies (not in ``clients.task.errors``, the layer everything
imports) because only the strategies and the round loop raise or handle them; both
derive from the one root, `FedloraError`.
"""

from __future__ import annotations

from clients.task.errors import FedloraError


class UpdateRejected(FedloraError):
    """A site's update failed a server-side check (see strategies.validation)."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"{check}: {detail}")
        self.check = check
        self.detail = detail


class RoundFailed(FedloraError):
    """Too few valid updates arrived to aggregate a round."""
