"""The edge node's HTTP guards: body limits, encodable text, safe errors, bounded metrics.

* `BodyLimit` reads a request body, declared or chunked, up to a byte limit and answers
  413 past it (408 past a deadline), before any JSON parsing or application code sees the
  request.
* `Text` is a string that is valid Unicode: JSON can carry lone surrogates (``"\\ud800"``),
  which Python accepts but tokenizers and UTF-8 encoders do not, so they are refused (422).
* `SafeJSONResponse` writes ASCII-only JSON, so no answer (an error that repeats a
  client's key, say) can fail to encode; `validation_detail` never repeats client values.
* `RequestMetrics` labels requests by the route's template, never the client's path, and
  by model only once the handler matched a model the node serves.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any

from pydantic import AfterValidator
from starlette.responses import JSONResponse

from clients.edge.metrics import EdgeMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode at character {exc.start} (a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
CLIENT_LEFT = 499  # the status counted for a request whose client left before an answer


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: encodable whatever strings it holds; NaN refused."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode()


def validation_detail(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic's errors without the client's values (``input``, ``ctx``): where and what.

    The location names fields and list indexes only, never pydantic's own parts (the
    branch of a union, ``function-after[...]``, a JSON error's byte offset).
    """
    return [
        {"loc": _where(e), "msg": _what(e), "type": str(e.get("type", "value_error"))}
        for e in errors[:16]
    ]


def _where(error: dict[str, Any]) -> list[str | int]:
    loc = list(error.get("loc", ()))
    if error.get("type") == "json_invalid":
        return loc[:1]  # ("body", byte offset): the offset is in the message
    key = loc.pop() if error.get("type") == "extra_forbidden" and loc else None  # theirs
    where: list[str | int] = [
        part for part in loc
        if isinstance(part, int) or (part.isidentifier() and part not in _UNION_TAGS)
    ]  # fmt: skip
    return where if key is None else [*where, key if isinstance(key, int) else str(key)[:64]]


def _what(error: dict[str, Any]) -> str:
    message = str(error.get("msg", "invalid"))
    if error.get("type") == "json_invalid":
        reason = str((error.get("ctx") or {}).get("error", "it does not parse"))[:200]
        loc = error.get("loc", ())
        at = f" at byte {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
        return f"the body is not valid JSON: {reason}{at}"
    return message.removeprefix("Value error, ")


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def detail_body(path: str, status: int, message: str) -> dict[str, Any]:
    """FastAPI's shape of an error, ``{"detail": message}``, whatever the path."""
    return {"detail": message}


async def _answer(send: Send, content: dict[str, Any], status: int) -> None:
    body = json.dumps(content, ensure_ascii=True).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    """A body past `BodyLimit`'s ``max_bytes``."""


class BodyLimit:
    """ASGI middleware: read at most ``max_bytes`` of any request body, else answer 413,
    within ``timeout_s`` seconds, else answer 408 (and close the connection).

    The body is buffered (it is small by construction) and handed on in one piece, so the
    limit holds for ``Transfer-Encoding: chunked`` bodies as well as declared ones.
    ``error_body(path, status, message)`` shapes a refusal's JSON for the request's path.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        timeout_s: float = 30.0,
        error_body: Callable[[str, int, str], dict[str, Any]] = detail_body,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.error_body = error_body

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body; None if the client left; `_TooLarge` past ``max_bytes``."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, scope: Scope, send: Send, status: int, message: str) -> None:
        await _answer(send, self.error_body(str(scope.get("path", "")), status, message), status)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._refuse(scope, send, 400, "Content-Length is not a number")
                return
            if int(declared) > self.max_bytes:
                await self._refuse(
                    scope, send, 413, f"body of {int(declared)} bytes; at most {self.max_bytes}"
                )
                return
        try:
            async with asyncio.timeout(self.timeout_s):
                body = await self._read(receive)
        except _TooLarge:
            await self._refuse(scope, send, 413, f"body of more than {self.max_bytes} bytes")
            return
        except TimeoutError:  # a stalled client must not hold its buffer for ever
            await self._refuse(scope, send, 408, f"the body took more than {self.timeout_s:g} s")
            return
        if body is None:  # the client left
            return
        handed = False

        async def replay() -> Message:
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the client to leave

        await self.app(scope, replay, send)


class RequestMetrics:
    """ASGI middleware: count and time requests by route template, model and status.

    Outside `BodyLimit`, so its refusals count too (as ``unmatched``: no route has run).
    """

    def __init__(self, app: ASGIApp, *, metrics: EdgeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = CLIENT_LEFT  # until a response starts; 500 if the app raises first

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observe)
        except BaseException:
            status = 500 if status == CLIENT_LEFT else status
            raise
        finally:
            route = scope.get("route")
            endpoint = str(getattr(route, "path", "unmatched"))
            if endpoint != "/metrics":
                model = str((scope.get("state") or {}).get("model", "-"))
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
                self.metrics.requests.labels(endpoint, model, str(status)).inc()
