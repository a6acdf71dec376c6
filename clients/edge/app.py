"""The HTTP API of an edge node (FastAPI): predict, generate, health, adapters, metrics.

Bad requests get a 4xx that says what is wrong and the process stays up; 503 means no
verified release is loaded for the model, with the reason. The OpenAPI schema is at
``/openapi.json`` and the docs at ``/docs``, whose files the node serves itself.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from clients.edge.docs import serve_docs
from clients.edge.node import EdgeNode, ModelSlot
from clients.edge.runtime import LoadedRelease

log = logging.getLogger(__name__)


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="model name; optional when one is served")
    texts: list[str] = Field(..., description="texts to classify")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str
    max_new_tokens: int = Field(32, description="bounded by the node's --max-new-tokens")


def _active(node: EdgeNode, name: str | None) -> tuple[ModelSlot, LoadedRelease]:
    try:
        slot = node.slot(name)
    except KeyError as exc:
        known = sorted(node.slots)
        detail = exc.args[0] if name is None else f"unknown model {name!r}; served: {known}"
        raise HTTPException(404 if name else 422, detail) from None
    release = slot.active  # read once: a swap during this request does not affect it
    if release is None:
        raise HTTPException(503, f"no verified release of {slot.ref}: {slot.last_error}")
    return slot, release


def _check_texts(texts: list[str], node: EdgeNode) -> None:
    limits = node.settings
    if not texts:
        raise HTTPException(422, "texts must hold at least one text")
    if len(texts) > limits.max_items:
        raise HTTPException(413, f"texts has {len(texts)} items; at most {limits.max_items}")
    for i, text in enumerate(texts):
        if not text.strip():
            raise HTTPException(422, f"texts[{i}] is empty")
        if len(text) > limits.max_text_chars:
            raise HTTPException(
                413, f"texts[{i}] has {len(text)} characters; at most {limits.max_text_chars}"
            )


def create_app(node: EdgeNode, *, poll: bool = True) -> FastAPI:
    stop = threading.Event()

    def poller() -> None:
        while not stop.wait(node.settings.poll_seconds):
            try:
                node.refresh_all()
            except Exception:  # the poller must outlive any one bad refresh
                log.exception("refresh failed")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        thread = threading.Thread(target=poller, name="fedlora-edge-poller", daemon=True)
        if poll:
            thread.start()
        yield
        stop.set()

    app = FastAPI(
        title="fedlora edge node",
        description="Serves verified, signed LoRA adapters; see GET /v1/adapters.",
        lifespan=lifespan,
        docs_url=None,  # served from the node's own files, not a CDN (clients/edge/docs.py)
        redoc_url=None,
    )
    serve_docs(app)
    max_body = node.settings.max_items * node.settings.max_text_chars * 4 + 65536

    @app.middleware("http")
    async def measure(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body:
            return JSONResponse({"detail": f"body of {size} bytes; at most {max_body}"}, 413)
        start = time.perf_counter()
        response = await call_next(request)
        endpoint = request.url.path
        if endpoint.startswith("/v1/") or endpoint in ("/healthz",):
            model = getattr(request.state, "model", "-")
            node.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            node.metrics.requests.labels(endpoint, model, str(response.status_code)).inc()
        return response

    @app.post("/v1/predict")
    def predict(body: PredictRequest, request: Request) -> dict[str, Any]:
        """Classify texts with the model's active release: label and scores per text."""
        _check_texts(body.texts, node)
        slot, release = _active(node, body.model)
        request.state.model = slot.ref.name
        if release.task != "sequence-classification":
            raise HTTPException(400, f"model {slot.ref.name!r} is {release.task}; use /v1/generate")
        return {
            "model": slot.ref.name,
            "version": release.version,
            "digest": release.verified.digest,
            "predictions": release.predict(body.texts),
        }

    @app.post("/v1/generate")
    def generate(body: GenerateRequest, request: Request) -> dict[str, Any]:
        """Continue a prompt with a causal-LM release (greedy, bounded length)."""
        _check_texts([body.prompt], node)
        limit = node.settings.max_new_tokens
        if not 1 <= body.max_new_tokens <= limit:
            raise HTTPException(422, f"max_new_tokens={body.max_new_tokens} must be in 1..{limit}")
        slot, release = _active(node, body.model)
        request.state.model = slot.ref.name
        if release.task != "causal-lm":
            raise HTTPException(400, f"model {slot.ref.name!r} is {release.task}; use /v1/predict")
        text = release.generate(body.prompt, max_new_tokens=body.max_new_tokens)
        return {"model": slot.ref.name, "version": release.version, "text": text}

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        """ok: every model serves its registry alias; degraded: serving, but stale or
        offline; unavailable: nothing verified to serve (503)."""
        health = node.health()
        return JSONResponse(health, status_code=503 if health["status"] == "unavailable" else 200)

    @app.get("/v1/adapters")
    def adapters() -> dict[str, Any]:
        """Per model: the active and the previous release with their signed facts."""
        return node.adapters()

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/refresh")
    def refresh(authorization: str | None = Header(None)) -> dict[str, Any]:
        """Check the registry now (admin token as ``Authorization: Bearer TOKEN``)."""
        token = node.settings.admin_token
        if token is None:
            raise HTTPException(403, "refresh is disabled: start the node with FEDLORA_EDGE_TOKEN")
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong admin token")
        swapped = node.refresh_all()
        return {"swapped": swapped, "health": node.health()}

    return app
