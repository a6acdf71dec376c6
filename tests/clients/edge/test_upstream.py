"""An upstream's answers, as a careless or hostile upstream writes them."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from clients.edge.upstream import Upstream, UpstreamError, _predictions


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


@pytest.mark.parametrize(
    "content",
    [
        *(f'{{"choices": [], "usage": {{"total_tokens": {n}}}}}'.encode()
          for n in ("NaN", "Infinity", "-Infinity", "1e400")),
        b'{"choices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["NaN", "Infinity", "-Infinity", "1e400", "nested-deep"],
)  # fmt: skip
def test_an_answer_json_cannot_carry_or_python_cannot_read_is_an_upstream_error(
    content: bytes,
) -> None:
    # A completion answer is passed on as it is: NaN or inf in it (Python's JSON reader takes
    # NaN and Infinity, and reads 1e400 as inf) made the node's own response fail to render,
    # and json.loads raises RecursionError (no ValueError) on deep nesting: either way a 500
    # instead of the local answer (the router catches only UpstreamError).
    upstream = Upstream("http://upstream.test", model=None, timeout_s=1.0, key=None)
    upstream._client = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda _: httpx.Response(200, content=content))
    )
    sent = {"model": "m", "prompt": "hi"}

    with pytest.raises(UpstreamError, match="answer"):
        asyncio.run(upstream.complete("/v1/completions", sent, traceparent="00-x", tracestate=None))
