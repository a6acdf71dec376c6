"""Which round's adapter a run hands over as ``OUT/adapter``: the documented rule.

A federated run can lose accuracy late (a bad round, a drifting site mix), so the run keeps
two adapters: the **last** round's and the **best** round's on the central held-out file
(``eval-file``). ``adapter.keep`` picks which one becomes ``OUT/adapter``; the other is
kept beside it, and both go to MLflow:

- ``best`` (default): the round with the highest central held-out accuracy, the later
  round on a tie. Without an ``eval-file`` there is no central number to choose by, and
  the rule falls back to ``last`` (site evaluations are not used: they are weighted by
  the sites' own held-out rows and absent under some privacy settings).
- ``last``: the final round's adapter.

The chosen adapter's accuracy on the file it was chosen by is a maximum over rounds and
so overstates what it scores on new data; judge it on a second held-out file when that
matters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from clients.task.errors import ConfigError

RULES = ("best", "last")


@dataclass
class BestRound:
    """The best round so far on the central held-out file, with its tensors."""

    round: int = 0
    accuracy: float = float("-inf")
    state: dict[str, np.ndarray] = field(default_factory=dict)

    def observe(
        self, server_round: int, accuracy: float | None, state: Mapping[str, np.ndarray]
    ) -> bool:
        """Keep `state` if `accuracy` is at least the best so far; True if it was kept.

        A later round wins a tie (it has seen more data); NaN or None never wins.
        """
        if accuracy is None or not np.isfinite(accuracy) or accuracy < self.accuracy:
            return False
        self.round, self.accuracy = server_round, float(accuracy)
        self.state = {k: np.array(v, copy=True) for k, v in state.items()}
        return True


def chosen_round(*, rule: str, best_round: int, last_round: int) -> int:
    """The round whose adapter becomes ``OUT/adapter`` under `rule`.

    Raises:
        ConfigError: For an unknown rule.
    """
    if rule not in RULES:
        raise ConfigError(f"adapter.keep={rule!r} must be one of {', '.join(RULES)}")
    if rule == "best" and best_round > 0:
        return best_round
    return last_round
