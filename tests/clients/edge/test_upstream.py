"""An upstream's answers, as a careless or hostile upstream writes them."""

from __future__ import annotations

import json

import pytest

from clients.edge.upstream import UpstreamError, _predictions


@pytest.mark.parametrize(
    "score", ["1" + "0" * 400, "1e400", "NaN", "true", '"0.5"'], ids=lambda s: s[:8]
)
def test_a_score_that_is_not_a_finite_number_is_an_upstream_error(score: str) -> None:
    # JSON reads 1000…0 as an int past float range: math.isfinite raised OverflowError,
    # which the router does not catch (only UpstreamError), so the client got a 500.
    answer = json.loads(f'{{"predictions": [{{"label": "a", "scores": {{"a": {score}}}}}]}}')

    with pytest.raises(UpstreamError, match="scores are not numbers"):
        _predictions(answer, 1)


def test_finite_scores_are_kept_as_floats() -> None:
    answer = {"predictions": [{"label": "a", "scores": {"a": 1, "b": 0.0}}]}

    assert _predictions(answer, 1) == [{"label": "a", "scores": {"a": 1.0, "b": 0.0}}]
