"""The HTTP API of an edge node (FastAPI): predict, generate, the OpenAI-compatible
endpoints, health, adapters, metrics and refresh.

Requests are queued to their base's micro-batcher and awaited without holding a thread;
a full queue answers 503 with ``Retry-After``. Bad requests get a 4xx that says what is
wrong and the process stays up; 503 also means no verified release is loaded for the
model, with the reason. The OpenAPI schema is at ``/openapi.json`` and the docs at
``/docs``, whose files the node serves itself (clients/edge/docs.py).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Header, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from clients.edge.batching import QueueFull
from clients.edge.docs import serve_docs
from clients.edge.generation import Sampling
from clients.edge.guards import (
    BodyLimit,
    RequestMetrics,
    SafeJSONResponse,
    Text,
    detail_body,
    validation_detail,
)
from clients.edge.hybrid import HybridRouter, summary
from clients.edge.node import EdgeNode
from clients.edge.openai_api import (
    INTERNAL_ERROR,
    is_openai_path,
    openai_error,
    openai_error_body,
    openai_routes,
    served_headers,
)
from clients.edge.refresher import Refresher
from clients.edge.routing import check_texts, find_slot, submit_to
from clients.edge.runtime import PromptRefused
from clients.edge.settings import MAX_ITEMS

log = logging.getLogger(__name__)
REFRESH_TIMEOUT_S = 300


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text | None = Field(None, description="model name; optional when one is served")
    texts: list[Text] = Field(..., max_length=MAX_ITEMS, description="texts to classify")
    residency: Literal["local-only", "any"] | None = Field(
        None, description="local-only: never sent upstream, whatever the node's policy allows"
    )


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text | None = None
    prompt: Text
    max_new_tokens: int = Field(32, description="bounded by the node's --max-new-tokens")


def _handlers(app: FastAPI) -> None:
    def openai_path(request: Request) -> bool:
        return is_openai_path(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        detail = validation_detail(list(exc.errors()))
        if openai_path(request):
            first = _deepest(detail) or {"loc": [], "msg": "invalid request"}
            where = ".".join(str(p) for p in first["loc"] if p != "body")
            message = f"{where}: {first['msg']}" if where else first["msg"]
            return openai_error(422, message, param=where or None)
        return SafeJSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if openai_path(request):
            return openai_error(exc.status_code, str(exc.detail), headers=exc.headers)
        return SafeJSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(QueueFull)
    async def busy(request: Request, exc: QueueFull) -> Response:
        request.app.state.node.metrics.queue_full.inc()
        headers = {"Retry-After": str(int(exc.retry_after_s))}
        if openai_path(request):
            return openai_error(503, str(exc), headers=headers, kind="overloaded_error")
        return SafeJSONResponse({"detail": str(exc)}, 503, headers=headers)

    @app.exception_handler(PromptRefused)
    async def refused(request: Request, exc: PromptRefused) -> Response:
        if openai_path(request):
            param = "messages" if request.url.path == "/v1/chat/completions" else "prompt"
            return openai_error(400, str(exc), param=param, code=exc.code)
        return SafeJSONResponse({"detail": str(exc)}, 400)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> Response:
        # Starlette logs the exception; the client gets JSON that repeats none of it.
        if openai_path(request):
            return openai_error(500, INTERNAL_ERROR, kind="server_error")
        return SafeJSONResponse({"detail": INTERNAL_ERROR}, 500)


def _deepest(detail: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first field's most precise error: a union (``prompt``: a string or a list of
    them) fails once per branch; the branch meant went deepest, or got the right type."""
    if not detail:
        return None
    field = detail[0]["loc"][:2]
    return max(
        (e for e in detail if e["loc"][:2] == field),
        key=lambda e: (len(e["loc"]), not e["type"].endswith("_type")),
    )


def _error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """A refusal before routing, in OpenAI's shape on its paths (`BodyLimit`)."""
    if is_openai_path(path):
        return openai_error_body(message)
    return detail_body(path, status, message)


def _bearer(authorization: str | None) -> str | None:
    given = (authorization or "").removeprefix("Bearer ").strip()
    return given or None


def create_app(node: EdgeNode, *, poll: bool = True, router: HybridRouter | None = None) -> FastAPI:
    """The node's app; ``router`` escalates classifications (default: from its settings)."""
    refresher = Refresher(
        node.refresh_all, poll_seconds=node.settings.poll_seconds if poll else None
    )
    router = router or HybridRouter.from_settings(node.settings, node.metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        refresher.start()
        yield
        refresher.stop()
        node.close()  # the refresh worker process
        await router.close()

    app = FastAPI(
        title="fedlora edge node",
        description="Serves verified, signed LoRA adapters; see GET /v1/adapters.",
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
        docs_url=None,  # served from the node's own files, not a CDN (clients/edge/docs.py)
        redoc_url=None,
    )
    serve_docs(app)
    app.state.node, app.state.refresher, app.state.router = node, refresher, router
    settings = node.settings
    # JSON may spell a character in up to 4 bytes; 64 KiB for everything around the texts
    max_body = settings.max_items * settings.max_text_chars * 4 + 65536
    # Starlette puts the middleware added last outermost: RequestMetrics wraps BodyLimit,
    # so the body limit's refusals are counted and timed too, and bodies are bounded
    # before the app reads them.
    app.add_middleware(
        BodyLimit, max_bytes=max_body, timeout_s=settings.body_timeout_s, error_body=_error_body
    )
    app.add_middleware(RequestMetrics, metrics=node.metrics)
    _handlers(app)
    app.include_router(openai_routes(node, router))

    @app.post("/v1/predict")
    async def predict(
        body: PredictRequest, request: Request, authorization: str | None = Header(None)
    ) -> Response:
        """Classify texts with the model's active release: label and scores per text.

        With ``--upstream``, a text whose top score is below ``--escalate-below`` may be
        answered upstream (`clients.edge.hybrid`); ``served_by`` and ``reason`` say who
        answered and why, for the response and for each prediction. The bearer token is
        the client's API key for the burst budget; it never travels upstream."""
        check_texts(body.texts, node)
        slot = find_slot(node, body.model)
        request.state.model = slot.ref.name
        release, future = await submit_to(
            slot, "sequence-classification", lambda r: r.submit_predict(body.texts)
        )
        local = await asyncio.wrap_future(future)
        predictions = await router.route(
            model=slot.ref.name,
            texts=body.texts,
            predictions=local,
            residency=body.residency,
            api_key=_bearer(authorization),
            traceparent=request.headers.get("traceparent"),
            tracestate=request.headers.get("tracestate"),
        )
        served_by, reason = summary(predictions)
        # Plain JSON types already: answered as they are, without FastAPI's re-encoding.
        return SafeJSONResponse(headers=served_headers(served_by, reason), content={
            "model": slot.ref.name,
            "version": release.version,
            "digest": release.verified.digest,
            "served_by": served_by,
            "reason": reason,
            "predictions": predictions,
        })  # fmt: skip

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest, request: Request) -> dict[str, Any]:
        """Continue a prompt with a causal-LM release (greedy, bounded length)."""
        check_texts([body.prompt], node)
        limit = settings.max_new_tokens
        if not 1 <= body.max_new_tokens <= limit:
            raise HTTPException(422, f"max_new_tokens={body.max_new_tokens} must be in 1..{limit}")
        slot = find_slot(node, body.model)
        request.state.model = slot.ref.name
        sampling = Sampling(max_tokens=body.max_new_tokens)
        release, future = await submit_to(
            slot, "causal-lm", lambda r: r.submit_generate([body.prompt], sampling)[0]
        )
        completions = await asyncio.wrap_future(future)
        return {"model": slot.ref.name, "version": release.version, "text": completions[0].text}

    @app.get("/healthz")
    def healthz() -> Response:
        """ok: every model serves its registry alias; degraded: serving, but stale or
        offline; unavailable: nothing verified to serve (503). ``routing``: the upstream,
        the residency policy in force and the circuit breaker's state."""
        health = node.health() | {"routing": router.health()}
        return SafeJSONResponse(
            health, status_code=503 if health["status"] == "unavailable" else 200
        )

    @app.get("/v1/adapters")
    def adapters() -> dict[str, Any]:
        """Per model: the active and the previous release with their signed facts."""
        return node.adapters()

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/refresh")
    async def refresh(authorization: str | None = Header(None)) -> dict[str, Any]:
        """Check the registry now (admin token as ``Authorization: Bearer TOKEN``).

        Concurrent calls share one refresh; it runs on the node's refresh thread."""
        token = settings.admin_token
        if token is None:
            raise HTTPException(403, "refresh is disabled: start the node with FEDLORA_EDGE_TOKEN")
        given = _bearer(authorization) or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong admin token")
        try:
            swapped = await asyncio.wait_for(
                asyncio.wrap_future(refresher.request()), REFRESH_TIMEOUT_S
            )
        except TimeoutError:
            raise HTTPException(504, "the refresh is still running; see /healthz") from None
        return {"swapped": swapped, "health": node.health()}

    return app
