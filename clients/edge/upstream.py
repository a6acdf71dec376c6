"""The upstream an edge node escalates to, and the W3C trace context it carries there.

The upstream speaks fedlora's ``POST /v1/predict`` (another fedlora node, or anything that
answers ``{"predictions": [{"label", "scores"}, ...]}`` for ``{"model", "texts"}``). Every
call has a deadline; any error, timeout or malformed answer raises `UpstreamError`. The
client's own credentials never travel: the upstream gets the node's key
(``FEDLORA_UPSTREAM_KEY``), if any, and a ``traceparent`` that continues the client's
trace (W3C Trace Context, https://www.w3.org/TR/trace-context/).
"""

from __future__ import annotations

import json
import math
import re
import secrets
from typing import Any

import httpx

from clients.task.errors import FedloraError
from clients.task.numbers import finite_number

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
MAX_TRACESTATE = 512  # the spec's limit is 32 members; a longer header is not forwarded


class UpstreamError(FedloraError):
    """The upstream did not give a usable answer in time."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"upstream {kind}: {detail}")
        self.kind = kind  # timeout | connect | status | answer


def child_traceparent(incoming: str | None) -> str:
    """The ``traceparent`` for a call this request makes: the client's trace id with a new
    span id, or a new trace when the header is missing or invalid (spec §3.2, §4.3)."""
    match = _TRACEPARENT.fullmatch((incoming or "").strip())
    span = secrets.token_hex(8)
    if match is not None:
        version, trace, parent, flags = match.groups()
        if version != "ff" and trace != "0" * 32 and parent != "0" * 16:
            return f"00-{trace}-{span}-{flags}"
    return f"00-{secrets.token_hex(16)}-{span}-01"


def _refuse(constant: str) -> float:
    """NaN and ±Infinity: Python's JSON reader takes them, no JSON response can carry them."""
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    """A JSON float that stays finite (``1e400`` reads as inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is past float range")
    return value


def _predictions(answer: Any, count: int) -> list[dict[str, Any]]:
    """The predictions of an upstream answer, checked: one per text, a label, finite scores."""
    predictions = answer.get("predictions") if isinstance(answer, dict) else None
    if not isinstance(predictions, list) or len(predictions) != count:
        raise UpstreamError("answer", f"expected {count} predictions")
    checked = []
    for p in predictions:
        if not isinstance(p, dict) or not isinstance(p.get("label"), str):
            raise UpstreamError("answer", "a prediction has no label")
        scores = p.get("scores", {})
        if not isinstance(scores, dict) or not all(
            finite_number(v) is not None for v in scores.values()
        ):
            raise UpstreamError("answer", "a prediction's scores are not numbers")
        checked.append(
            {"label": p["label"], "scores": {str(k): float(v) for k, v in scores.items()}}
        )
    return checked


class Upstream:
    """An HTTP client for one upstream URL (one connection pool for the node's life)."""

    def __init__(self, url: str, *, model: str | None, timeout_s: float, key: str | None) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(timeout_s), follow_redirects=False
        )

    async def predict(
        self, *, model: str, texts: list[str], traceparent: str, tracestate: str | None
    ) -> list[dict[str, Any]]:
        """Classify ``texts`` upstream with the upstream's ``model``."""
        body = {"model": model, "texts": texts}
        answer = await self._post(
            "/v1/predict", body, traceparent=traceparent, tracestate=tracestate
        )
        return _predictions(answer, len(texts))

    async def _post(
        self, path: str, body: dict[str, Any], *, traceparent: str, tracestate: str | None
    ) -> Any:
        headers = {"traceparent": traceparent}
        if tracestate and len(tracestate) <= MAX_TRACESTATE and tracestate.isascii():
            headers["tracestate"] = tracestate
        try:
            response = await self._client.post(f"{self.url}{path}", json=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise UpstreamError("timeout", f"no answer within {self.timeout_s} s") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError("connect", type(exc).__name__) from exc
        if response.status_code != 200:
            raise UpstreamError("status", f"HTTP {response.status_code}")
        try:
            return json.loads(response.content, parse_constant=_refuse, parse_float=_finite)
        except (ValueError, RecursionError):  # RecursionError: nested past the parser's limit
            raise UpstreamError("answer", "not JSON, or a number past float range") from None

    async def complete(
        self, path: str, body: dict[str, Any], *, traceparent: str, tracestate: str | None
    ) -> dict[str, Any]:
        """An OpenAI-compatible, non-streamed ``/v1/completions`` or
        ``/v1/chat/completions`` upstream; ``body`` names the upstream's model."""
        answer = await self._post(path, body, traceparent=traceparent, tracestate=tracestate)
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
            raise UpstreamError("answer", "no choices")
        return answer

    async def close(self) -> None:
        await self._client.aclose()
