"""OpenAI-compatible endpoints for causal-LM releases, the convention of vLLM, LoRAX and TGI.

``GET /v1/models`` lists each served ``name@alias``; ``POST /v1/completions`` and
``POST /v1/chat/completions`` (the base's chat template when it has one) answer with
``max_tokens``, ``temperature``, ``top_p`` and ``stop``, whole or streamed as server-sent
events (``data: {chunk}`` lines ending with ``data: [DONE]``). A request names its model
as ``name`` or ``name@alias``; errors have OpenAI's shape, ``{"error": {"message", ...}}``.
Options the node does not implement (``n`` > 1, ``logprobs``, penalties, ``seed``) are
refused, never silently ignored.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")
    client.completions.create(model="lm@production", prompt="Hello", max_tokens=8)
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from clients.edge.generation import Completion, Sampling
from clients.edge.guards import CLIENT_LEFT, SafeJSONResponse, Text
from clients.edge.hybrid import LOCAL, UPSTREAM, HybridRouter
from clients.edge.node import EdgeNode, ModelSlot
from clients.edge.routing import submit_to
from clients.edge.runtime import LoadedRelease, PromptRefused
from clients.edge.settings import MAX_ITEMS

OPENAI_PATHS = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions"})
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256
NULL_IS_DEFAULT = frozenset({"temperature", "top_p", "n", "stream"})  # nullable in OpenAI's API
INTERNAL_ERROR = "the node failed to answer this request; its log has the reason"


def is_openai_path(path: str) -> bool:
    """Whether ``path`` is an OpenAI-compatible endpoint, whose errors have OpenAI's shape."""
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


T = TypeVar("T")
# A list refused past the ceiling of --max-items before its items are validated.
Items = Annotated[list[T], Field(max_length=MAX_ITEMS)]


def openai_error(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """An error answer in OpenAI's shape (`openai_error_body`) with HTTP ``status``."""
    body = openai_error_body(message, kind=kind, param=param, code=code)
    return SafeJSONResponse(body, status_code=status, headers=headers)


def openai_error_body(
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error object, ``{"error": {"message", "type", "param", "code"}}``, the one
    its clients parse (``openai.APIStatusError.body``); also a stream's error event."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text = Field(..., max_length=256, description="NAME or NAME@ALIAS (GET /v1/models)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: Text | Items[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only 1")
    user: Text | None = Field(None, max_length=256)
    residency: Literal["local-only", "any"] | None = Field(
        None, description="fedlora: local-only is never sent upstream (not sent on either)"
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """OpenAI's clients send null for an option the caller passed as None: its default."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in NULL_IS_DEFAULT}
        return data


class CompletionRequest(_Common):
    prompt: Text | Items[Text]
    max_tokens: int | None = Field(16, ge=1, description="bounded by --max-new-tokens")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Items[TextPart]
    name: Text | None = Field(None, max_length=64)

    def as_template_input(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content
        )  # fmt: skip
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_ITEMS)
    max_tokens: int | None = Field(None, ge=1, description="bounded by --max-new-tokens")
    max_completion_tokens: int | None = Field(None, ge=1)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise HTTPException(
            422, f"stop: at most {MAX_STOPS} strings of 1..{MAX_STOP_CHARS} characters", None
        )
    return tuple(stops)


def _sampling(
    body: _Common, max_tokens: int | None, *, limit: int, name: str = "max_tokens"
) -> Sampling:
    """The row's sampling; ``name`` is the field the client sent ``max_tokens`` as."""
    tokens = limit if max_tokens is None else max_tokens
    if not 1 <= tokens <= limit:
        raise HTTPException(422, f"{name}={tokens} must be in 1..{limit}")
    return Sampling(
        max_tokens=tokens, temperature=body.temperature, top_p=body.top_p, stop=_stops(body.stop)
    )


def _usage(completions: list[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in completions)
    completion = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def _sse(data: dict[str, Any] | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=True)
    return f"data: {text}\n\n"


async def _unless_client_leaves(
    request: Request, future: Future[list[Completion]], stop: Callable[[], None]
) -> list[Completion] | None:
    """The completions, or None after calling ``stop`` if the client disconnects first.

    Without this a non-streamed generation runs to ``max_tokens`` for a client that is
    gone, holding its batch row (a stream stops in its generator's ``finally``). After the
    body, the ASGI ``receive`` blocks until ``http.disconnect`` (as vLLM listens for it).
    """

    async def client_leaves() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answer = asyncio.ensure_future(asyncio.wrap_future(future))
    watcher = asyncio.ensure_future(client_leaves())
    try:
        await asyncio.wait({answer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the handler is cancelled (shutdown): its rows stop too
        stop()
        answer.cancel()
        raise
    finally:
        watcher.cancel()
    if answer.done():
        return answer.result()
    stop()
    answer.cancel()
    return None


class _Stream:
    """Generated text from the batcher's thread to the event loop, then out as SSE."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()

    def on_text(self, index: int, text: str) -> None:  # the batcher's thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, text))

    def follow(self, future: Future[Any]) -> None:
        future.add_done_callback(
            lambda _: self.loop.call_soon_threadsafe(self.queue.put_nowait, None)
        )


def _stream_error(error: BaseException) -> dict[str, Any]:
    """The error event of a stream that failed after it began: the client's own mistake
    with its reason, anything else without internals (the node's log has them)."""
    if isinstance(error, PromptRefused):
        return openai_error_body(str(error), code=error.code)
    return openai_error_body(INTERNAL_ERROR, kind="server_error")


def served_headers(served_by: str, reason: str) -> dict[str, str]:
    """Who answered and why, also for streamed answers (whose body has no room for it)."""
    return {"X-Fedlora-Served-By": served_by, "X-Fedlora-Reason": reason}


def openai_routes(node: EdgeNode, hybrid: HybridRouter) -> APIRouter:
    """The OpenAI-compatible routes; a model the residency policy marks with
    ``generation = "upstream"`` is answered upstream when allowed (`HybridRouter`)."""
    router = APIRouter()
    settings = node.settings

    def resolve(model: str, request: Request) -> ModelSlot:
        name, _, alias = model.partition("@")
        slot = node.slots.get(name)
        if slot is None or (alias and alias != slot.ref.alias):
            raise HTTPException(404, f"model {model!r} is not served; GET /v1/models lists them")
        request.state.model = slot.ref.name
        return node.slot(name)

    def check_prompt(text: str, what: str) -> None:
        if len(text) > settings.max_text_chars:
            raise HTTPException(413, f"{what} has {len(text)} characters; at most "
                                f"{settings.max_text_chars}")  # fmt: skip

    def card(slot: ModelSlot) -> dict[str, Any] | None:
        release = slot.active
        if release is None:
            return None
        try:
            created = datetime.fromisoformat(release.verified.provenance.created_at).timestamp()
        except ValueError:
            created = 0.0
        return {"id": str(slot.ref), "object": "model", "created": int(created),
                "owned_by": "fedlora", "task": release.task, "version": release.version,
                "digest": release.verified.digest}  # fmt: skip

    @router.get("/v1/models")
    def models() -> dict[str, Any]:
        """Every ``name@alias`` with a verified release, whatever its task."""
        cards = [c for slot in node.slots.values() if (c := card(slot)) is not None]
        return {"object": "list", "data": cards}

    @router.get("/v1/models/{model}")
    def model_card(model: str) -> dict[str, Any]:
        name, _, alias = model.partition("@")
        slot = node.slots.get(name)
        found = card(slot) if slot is not None and alias in ("", slot.ref.alias) else None
        if found is None:
            raise HTTPException(404, f"model {model!r} is not served")
        return found

    async def escalate(
        request: Request,
        slot: ModelSlot,
        body: _Common,
        texts: list[str],
        rewrite: Callable[[dict[str, Any], list[str]], dict[str, Any]],
    ) -> tuple[dict[str, Any] | None, str]:
        """The upstream's answer when the policy sends this request there, and the reason."""
        sent = body.model_dump(exclude_unset=True, exclude={"residency"})

        def build(redacted: list[str]) -> dict[str, Any]:
            return rewrite(sent, redacted)

        authorization = request.headers.get("authorization") or ""
        return await hybrid.route_generation(
            model=slot.ref.name,
            path=request.url.path,
            texts=texts,
            body=build,
            stream=body.stream,
            residency=body.residency,
            api_key=authorization.removeprefix("Bearer ").strip() or None,
            traceparent=request.headers.get("traceparent"),
            tracestate=request.headers.get("tracestate"),
        )

    async def respond(
        request: Request,
        slot: ModelSlot,
        prompts: list[str | list[dict[str, str]]],
        sampling: Sampling,
        body: _Common,
        shape: Callable[[str, int, str | None, bool], dict[str, Any]],
        whole: Callable[[list[Completion]], list[dict[str, Any]]],
        kind: str,
        routed: tuple[dict[str, Any] | None, str],
    ) -> Response:
        """Queue, then answer whole or as a stream; ``shape`` builds one choice of a chunk.

        ``routed`` is `escalate`'s answer: an upstream answer is returned as it is, marked.
        """
        remote, reason = routed
        if remote is not None:
            served = {"served_by": UPSTREAM, "reason": reason}
            return SafeJSONResponse(remote | served, headers=served_headers(UPSTREAM, reason))
        rid, created, name = f"{kind}-{secrets.token_hex(12)}", int(time.time()), str(slot.ref)
        head = {"id": rid, "created": created, "model": name}
        headers = served_headers(LOCAL, reason)
        if not body.stream:
            stop: Callable[[], None] = lambda: None  # noqa: E731

            def submit_whole(release: LoadedRelease) -> Future[list[Completion]]:
                nonlocal stop
                future, stop = release.submit_generate(prompts, sampling)
                return future

            release, future = await submit_to(slot, "causal-lm", submit_whole)
            completions = await _unless_client_leaves(request, future, stop)
            if completions is None:  # the client left: nobody reads the answer
                return Response(status_code=CLIENT_LEFT)  # counted in /metrics as 499
            answer = {
                "object": "chat.completion" if kind == "chatcmpl" else "text_completion",
                "choices": whole(completions),
                "usage": _usage(completions),
                "system_fingerprint": release.verified.digest[:16],
                "served_by": LOCAL,
                "reason": reason,
            }
            return SafeJSONResponse(head | answer, headers=headers)
        stream = _Stream()
        cancel: Callable[[], None] = lambda: None  # noqa: E731
        chunk_object = "chat.completion.chunk" if kind == "chatcmpl" else "text_completion"

        def submit(release: LoadedRelease) -> Future[list[Completion]]:
            nonlocal cancel
            future, cancel = release.submit_generate(prompts, sampling, stream.on_text)
            return future

        release, future = await submit_to(slot, "causal-lm", submit)
        stream.follow(future)
        first = await stream.queue.get()
        if first is None and future.exception() is not None:
            raise future.exception()  # type: ignore[misc]  # before any byte: a real status

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return _sse(head | {"object": chunk_object, "choices": choices} | extra)

        async def events() -> AsyncIterator[str]:
            try:
                item = first
                started = False
                while item is not None:
                    index, text = item
                    yield chunk([shape(text, index, None, not started)])
                    started = True
                    item = await stream.queue.get()
                error = future.exception()
                if error is not None:  # status 200 is sent: the error is an event, then DONE
                    yield _sse(_stream_error(error))
                    yield _sse("[DONE]")
                    return
                completions = future.result()
                yield chunk([shape("", i, c.finish_reason, not started)
                             for i, c in enumerate(completions)])  # fmt: skip
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield chunk([], usage=_usage(completions))
                yield _sse("[DONE]")
            finally:
                cancel()  # a client that left stops its rows; no-op once they finished

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"} | headers,
        )

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Continue one prompt (or a list of up to --max-items) with a causal-LM release."""
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not 1 <= len(prompts) <= settings.max_items:
            raise HTTPException(422, f"prompt: 1..{settings.max_items} prompts, not {len(prompts)}")
        for i, prompt in enumerate(prompts):
            check_prompt(prompt, f"prompt[{i}]")
        slot = resolve(body.model, request)
        sampling = _sampling(body, body.max_tokens, limit=settings.max_new_tokens)

        def shape(text: str, index: int, finish: str | None, _: bool) -> dict[str, Any]:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

        def whole(done: list[Completion]) -> list[dict[str, Any]]:
            return [shape(c.text, i, c.finish_reason, True) for i, c in enumerate(done)]

        def rewrite(sent: dict[str, Any], texts: list[str]) -> dict[str, Any]:
            return sent | {"prompt": texts[0] if isinstance(body.prompt, str) else texts}

        routed = await escalate(request, slot, body, list(prompts), rewrite)
        return await respond(
            request, slot, list(prompts), sampling, body, shape, whole, "cmpl", routed
        )

    @router.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        """Answer a conversation, rendered with the base's chat template when it has one."""
        if len(body.messages) > settings.max_items:
            raise HTTPException(422, f"messages: at most {settings.max_items}")
        messages = [m.as_template_input() for m in body.messages]
        check_prompt("".join(m["content"] for m in messages), "messages")
        slot = resolve(body.model, request)
        if body.max_completion_tokens is not None:  # OpenAI's newer name wins
            tokens, name = body.max_completion_tokens, "max_completion_tokens"
        else:
            tokens, name = body.max_tokens, "max_tokens"
        sampling = _sampling(body, tokens, limit=settings.max_new_tokens, name=name)

        def shape(text: str, index: int, finish: str | None, first: bool) -> dict[str, Any]:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            return {"index": index, "delta": delta if text or first else {},
                    "logprobs": None, "finish_reason": finish}  # fmt: skip

        def whole(done: list[Completion]) -> list[dict[str, Any]]:
            return [{"index": i, "message": {"role": "assistant", "content": c.text},
                     "logprobs": None, "finish_reason": c.finish_reason}
                    for i, c in enumerate(done)]  # fmt: skip

        def rewrite(sent: dict[str, Any], texts: list[str]) -> dict[str, Any]:
            rewritten = [{"role": m.role, "content": text} | ({"name": m.name} if m.name else {})
                         for m, text in zip(body.messages, texts, strict=True)]  # fmt: skip
            return sent | {"messages": rewritten}

        routed = await escalate(request, slot, body, [m["content"] for m in messages], rewrite)
        return await respond(
            request, slot, [messages], sampling, body, shape, whole, "chatcmpl", routed
        )

    return router
