"""`clients.edge.guards.BodyLimit` as plain ASGI: bodies past the size or the deadline."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from clients.edge.guards import BodyLimit

SCOPE = {"type": "http", "path": "/v1/predict", "headers": [(b"content-length", b"100")]}


async def _app(scope: Any, receive: Any, send: Any) -> None:
    body = (await receive())["body"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def _serve(messages: list[dict[str, Any]], *, stall: bool) -> tuple[int, bytes]:
    """Send ``messages`` to a `BodyLimit` (100 bytes, 0.05 s), then stall or leave."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        if stall:
            await asyncio.Event().wait()  # a client that never sends the rest
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    limit = BodyLimit(_app, max_bytes=100, timeout_s=0.05)
    asyncio.run(asyncio.wait_for(limit(dict(SCOPE), receive, send), timeout=5))
    return int(sent[0]["status"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_a_body_that_stalls_is_refused_at_the_deadline_and_the_connection_closed() -> None:
    status, body = _serve([{"type": "http.request", "body": b"x" * 99, "more_body": True}],
                          stall=True)  # fmt: skip

    assert status == 408
    assert json.loads(body) == {"detail": "the body took more than 0.05 s"}


@pytest.mark.parametrize(
    ("chunks", "status", "answer"),
    [
        ([b"{}"], 200, b"{}"),
        ([b"x" * 60, b"x" * 41], 413, b'{"detail": "body of more than 100 bytes"}'),
    ],
)
def test_a_body_in_time_is_handed_on_whole_or_refused_past_the_size(
    chunks: list[bytes], status: int, answer: bytes
) -> None:
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                for i, c in enumerate(chunks)]  # fmt: skip

    assert _serve(messages, stall=False) == (status, answer)
