"""Which release answers a request: the model's slot, its active release, held while queued.

Shared by the classic endpoints (`clients.edge.app`) and the OpenAI-compatible ones
(`clients.edge.openai_api`); every answer is an `HTTPException` the app turns into JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from fastapi import HTTPException

from clients.edge.node import EdgeNode, ModelSlot
from clients.edge.runtime import LoadedRelease, ReleaseRetired


def find_slot(node: EdgeNode, name: str | None) -> ModelSlot:
    try:
        return node.slot(name)
    except KeyError as exc:
        known = sorted(node.slots)
        detail = exc.args[0] if name is None else f"unknown model {name!r}; served: {known}"
        raise HTTPException(404 if name else 422, detail) from None


async def submit_to(
    slot: ModelSlot, task: str, submit: Callable[[LoadedRelease], Future[Any]]
) -> tuple[LoadedRelease, Future[Any]]:
    """Queue work for ``slot``'s active release (re-read if it retires in between)."""
    for _ in range(3):
        release = slot.active  # read once: a swap during this request does not affect it
        if release is None:
            raise HTTPException(503, f"no verified release of {slot.ref}: {slot.last_error}")
        if release.task != task:
            other = "/v1/generate" if release.task == "causal-lm" else "/v1/predict"
            raise HTTPException(400, f"model {slot.ref.name!r} is {release.task}; use {other}")
        try:
            return release, submit(release)
        except ReleaseRetired:
            continue
    raise HTTPException(503, f"{slot.ref} is changing releases; retry")


def check_texts(texts: list[str], node: EdgeNode) -> None:
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
