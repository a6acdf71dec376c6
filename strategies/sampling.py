"""Which sites a round asks: how many (`sample_size`) and which ones (`sample_sites`).

Like Flower's ``fraction_train`` / ``min_train_nodes``: a round asks a fraction of the
connected sites, never fewer than a minimum, never more than are connected. The choice is
seeded by the run (``seed``) and the round, so a resumed run asks the sites the original
run would have asked in that round.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def sample_size(n: int, *, fraction: float, minimum: int) -> int:
    """Sites a round asks out of ``n`` connected: ``round(fraction·n)``, within [minimum, n]."""
    return min(n, max(minimum, round(fraction * n)))


def round_seed(seed: int, server_round: int) -> float:
    """The seed of round ``server_round``'s sample: the round-th draw of the run's generator."""
    run = random.Random(seed)
    for _ in range(server_round - 1):
        run.random()
    return run.random()


def sample_sites(nodes: Sequence[int], k: int, *, seed: int, server_round: int) -> list[int]:
    """``k`` of ``nodes``, drawn for ``server_round`` of the run seeded ``seed``; sorted."""
    return sorted(random.Random(round_seed(seed, server_round)).sample(sorted(nodes), k))
