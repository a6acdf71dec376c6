"""Hybrid routing: answer locally first; escalate low-confidence answers to an upstream
only where the residency policy allows it and the burst budget remains; when the upstream
is down or slow, the local answer stands.

For each classification the node has already answered, in this order (the first that
applies decides; ``served_by`` and ``reason`` of the answer say which):

=====================  ==========  ==============================================
case                   served_by   reason
=====================  ==========  ==============================================
no ``--upstream``      local       ``no-upstream``
top score ≥ P          local       ``confident``
client: local-only     local       ``local-only``
model may not leave    local       ``policy-model``
a content rule         local       ``policy-blocked``
breaker open           local       ``upstream-unavailable``
budget spent           local       ``over-budget``
upstream error/late    local       ``upstream-unavailable``
upstream answered      upstream    ``low-confidence``
=====================  ==========  ==============================================

One request's escalated texts go upstream in one call, which takes one unit of budget.
A generation request (`route_generation`) has no score: it goes upstream, with reason
``policy-generation``, when the policy marks its model ``generation = "upstream"`` and it
is not streamed; the same checks then apply from "client: local-only" down.

    router = HybridRouter.from_settings(settings, metrics)
    predictions = await router.route(model="intents", texts=texts, predictions=local,
                                     residency=None, api_key=key, traceparent=header)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from clients.edge.breaker import CircuitBreaker
from clients.edge.budget import BurstBudget
from clients.edge.metrics import EdgeMetrics
from clients.edge.residency import LOCAL_ONLY, ResidencyPolicy, Verdict
from clients.edge.settings import EdgeSettings
from clients.edge.upstream import Upstream, UpstreamError, child_traceparent

LOCAL, UPSTREAM = "local", "upstream"


def top_score(prediction: dict[str, Any]) -> float:
    scores = prediction.get("scores") or {}
    return max(scores.values()) if scores else 0.0


@dataclass
class HybridRouter:
    upstream: Upstream | None
    escalate_below: float
    policy: ResidencyPolicy
    budget: BurstBudget | None
    breaker: CircuitBreaker
    metrics: EdgeMetrics
    timeout_s: float

    @classmethod
    def from_settings(cls, settings: EdgeSettings, metrics: EdgeMetrics) -> HybridRouter:
        policy = ResidencyPolicy.load(settings.policy) if settings.policy else ResidencyPolicy()
        upstream = budget = None
        if settings.upstream is not None:
            upstream = Upstream(
                settings.upstream,
                model=settings.upstream_model,
                timeout_s=settings.upstream_timeout_s,
                key=settings.upstream_key,
            )
            budget = BurstBudget(settings.cache / "routing" / "budget.sqlite3", policy.budget)
        return cls(
            upstream=upstream,
            escalate_below=settings.escalate_below,
            policy=policy,
            budget=budget,
            breaker=CircuitBreaker(
                failures=settings.breaker_failures, backoff_s=settings.breaker_backoff_s
            ),
            metrics=metrics,
            timeout_s=settings.upstream_timeout_s,
        )

    def _mark(
        self, predictions: list[dict[str, Any]], indices: list[int], served_by: str, reason: str
    ) -> None:
        for i in indices:
            predictions[i] |= {"served_by": served_by, "reason": reason}
        if indices:
            self.metrics.routed.labels(served_by, reason).inc(len(indices))

    async def route(
        self,
        *,
        model: str,
        texts: list[str],
        predictions: list[dict[str, Any]],
        residency: str | None,
        api_key: str | None,
        traceparent: str | None,
        tracestate: str | None = None,
    ) -> list[dict[str, Any]]:
        """``predictions`` (the local ones, one per text), each marked with ``served_by``
        and ``reason``; escalated ones replaced by the upstream's."""
        answers = [dict(p) for p in predictions]
        if self.upstream is None:
            self._mark(answers, list(range(len(texts))), LOCAL, "no-upstream")
            return answers
        low = [i for i, p in enumerate(answers) if top_score(p) < self.escalate_below]
        self._mark(answers, [i for i in range(len(texts)) if i not in set(low)], LOCAL, "confident")
        verdicts: dict[int, Verdict] = {}
        for i in low:
            verdict = self.policy.check(model=model, text=texts[i], residency=residency)
            if verdict.allowed:
                verdicts[i] = verdict
                continue
            self._mark(answers, [i], LOCAL, verdict.reason)
            for rule in verdict.rules:
                self.metrics.policy_blocks.labels(rule).inc()
        escalate = sorted(verdicts)
        if not escalate:
            return answers
        sent = [verdicts[i].text or "" for i in escalate]
        remote, reason = await self._call(
            lambda parent: self.upstream.predict(  # type: ignore[union-attr]
                model=self.upstream_name(model),
                texts=sent,
                traceparent=parent,
                tracestate=tracestate,
            ),
            api_key=api_key,
            traceparent=traceparent,
        )
        if remote is None:
            self._mark(answers, escalate, LOCAL, reason)
            return answers
        for i, prediction in zip(escalate, remote, strict=True):
            redacted = {"redacted": list(verdicts[i].rules)} if verdicts[i].redacted else {}
            answers[i] = prediction | redacted
        self._mark(answers, escalate, UPSTREAM, reason)
        return answers

    def upstream_name(self, model: str) -> str:
        """The upstream's name of a local model: the policy's ``upstream_model``, else
        ``--upstream-model``, else the same name."""
        assert self.upstream is not None
        return self.policy.upstream_models.get(model) or self.upstream.model or model

    async def _call(
        self,
        call: Callable[[str], Awaitable[Any]],
        *,
        api_key: str | None,
        traceparent: str | None,
    ) -> tuple[Any, str]:
        """Breaker, then budget, then the call under the deadline: ``(answer, reason)``
        with ``answer`` None when the local answer stands."""
        if not self.breaker.allow():
            return None, "upstream-unavailable"
        assert self.budget is not None
        refused = await asyncio.to_thread(self.budget.spend, api_key)
        if refused is not None:
            self.breaker.cancel()
            self.metrics.budget_refusals.labels(refused).inc()
            return None, "over-budget"
        started = time.perf_counter()
        try:
            # The deadline holds for the whole call; httpx's timeout is per read.
            answer = await asyncio.wait_for(call(child_traceparent(traceparent)), self.timeout_s)
        except (UpstreamError, TimeoutError) as exc:
            kind = exc.kind if isinstance(exc, UpstreamError) else "timeout"
            self.metrics.upstream_seconds.labels("error").observe(time.perf_counter() - started)
            self.metrics.upstream_errors.labels(kind).inc()
            self.breaker.record(success=False)
            return None, "upstream-unavailable"
        finally:
            self.metrics.breaker_open.set(self.breaker.state != "closed")
        self.metrics.upstream_seconds.labels("ok").observe(time.perf_counter() - started)
        self.breaker.record(success=True)
        self.metrics.breaker_open.set(0)
        return answer, "low-confidence"

    async def route_generation(
        self,
        *,
        model: str,
        path: str,
        texts: list[str],
        body: Callable[[list[str]], dict[str, Any]],
        stream: bool,
        residency: str | None,
        api_key: str | None,
        traceparent: str | None,
        tracestate: str | None = None,
    ) -> tuple[dict[str, Any] | None, str]:
        """Send a generation request upstream if the policy marks its model for it.

        ``texts`` are the request's prompt or message contents and ``body(texts)`` the
        OpenAI-compatible request with them in place (redacted ones, when a rule says so).

        Returns:
            The upstream's answer, or None to answer locally, and the reason.
        """
        if self.upstream is None:
            reason = "no-upstream"
        elif residency == LOCAL_ONLY:
            reason = LOCAL_ONLY
        elif model not in self.policy.generation:
            reason = "policy-model"
        elif stream:
            reason = "stream-local"  # streamed answers are generated here
        else:
            verdicts = [self.policy.check(model=model, text=t, residency=residency) for t in texts]
            refused = next((v for v in verdicts if not v.allowed), None)
            sent = body([v.text or "" for v in verdicts]) | {"model": self.upstream_name(model)}
            # Fail closed on every other string that would travel (stop strings, user,
            # message names): none may match any rule.
            stray = sorted({r for text in _strings(sent) for r in self.policy.matching(text)})
            if refused is None and not stray:
                upstream = self.upstream
                answer, reason = await self._call(
                    lambda parent: upstream.complete(
                        path, sent, traceparent=parent, tracestate=tracestate
                    ),
                    api_key=api_key,
                    traceparent=traceparent,
                )
                if answer is not None:
                    reason = "policy-generation"
                    self.metrics.routed.labels(UPSTREAM, reason).inc()
                    return answer, reason
            else:
                reason = refused.reason if refused is not None else "policy-blocked"
                for rule in refused.rules if refused is not None else stray:
                    self.metrics.policy_blocks.labels(rule).inc()
        self.metrics.routed.labels(LOCAL, reason).inc()
        return None, reason

    def health(self) -> dict[str, Any]:
        """The routing part of ``/healthz``."""
        return {
            "upstream": self.upstream.url if self.upstream else None,
            "escalate_below": self.escalate_below,
            "deadline_s": self.timeout_s,
            "policy": self.policy.describe(),
            "breaker": self.breaker.snapshot(),
        }

    async def close(self) -> None:
        if self.upstream is not None:
            await self.upstream.close()
        if self.budget is not None:
            self.budget.close()


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def summary(predictions: list[dict[str, Any]]) -> tuple[str, str]:
    """The response's own ``served_by`` and ``reason``: those of its predictions when they
    agree, else ``mixed`` / ``per-prediction``."""
    pairs = {(p["served_by"], p["reason"]) for p in predictions}
    if len(pairs) == 1:
        return next(iter(pairs))
    served = {s for s, _ in pairs}
    return (served.pop() if len(served) == 1 else "mixed"), "per-prediction"
