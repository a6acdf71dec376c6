"""The hybrid router's decisions that need no upstream call, the trace context it sends and
the routing flags. Calls to a real upstream are in test_serve_hybrid.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from clients.edge.breaker import CircuitBreaker
from clients.edge.budget import BurstBudget
from clients.edge.hybrid import HybridRouter, summary
from clients.edge.metrics import EdgeMetrics
from clients.edge.residency import BudgetLimits, ResidencyPolicy
from clients.edge.settings import EdgeSettings, ModelRef
from clients.edge.upstream import Upstream, child_traceparent
from clients.task.errors import ConfigError

EXAMPLE = Path(__file__).with_name("policy_example.toml")
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _router(tmp_path: Path, *, upstream: bool = True, budget: int = 100) -> HybridRouter:
    # No call reaches this port in these tests: every case decides before calling.
    remote = Upstream("http://127.0.0.1:9", model="cloud", timeout_s=1, key=None)
    return HybridRouter(
        upstream=remote if upstream else None,
        escalate_below=0.8,
        policy=ResidencyPolicy.load(EXAMPLE),
        budget=BurstBudget(tmp_path / "b.sqlite3", BudgetLimits(per_key_per_minute=budget)),
        breaker=CircuitBreaker(failures=1, backoff_s=60),
        metrics=EdgeMetrics(),
        timeout_s=1,
    )


def _route(router: HybridRouter, texts: list[str], tops: list[float], **kw: Any) -> list[dict]:
    local = [{"label": "a", "scores": {"a": t, "b": 1 - t}} for t in tops]
    args = {"model": "intents", "residency": None, "api_key": "k", "traceparent": None} | kw
    return asyncio.run(router.route(texts=texts, predictions=local, **args))


def _reasons(answers: list[dict]) -> list[tuple[str, str]]:
    return [(a["served_by"], a["reason"]) for a in answers]


def test_confident_answers_and_nodes_without_upstream_stay_local(tmp_path: Path) -> None:
    confident = _route(_router(tmp_path), ["hi", "bye"], [0.9, 0.8])
    alone = _route(_router(tmp_path, upstream=False), ["hi"], [0.5])

    assert _reasons(confident) == [("local", "confident")] * 2
    assert confident[0]["scores"] == {"a": 0.9, "b": pytest.approx(0.1)}
    assert _reasons(alone) == [("local", "no-upstream")]


def test_policy_outcomes_decide_before_any_call(tmp_path: Path) -> None:
    router = _router(tmp_path)
    router.breaker.record(success=False)  # open: a text the policy lets go stops here

    answers = _route(router, ["x@y.org", "PN-123456", "ok", "fine"], [0.5, 0.5, 0.5, 0.9])
    private = _route(router, ["ok"], [0.5], model="private")
    local = _route(router, ["ok"], [0.5], residency="local-only")

    assert _reasons(answers) == [
        ("local", "policy-blocked"),
        ("local", "policy-blocked"),
        ("local", "upstream-unavailable"),
        ("local", "confident"),
    ]
    assert _reasons(private) == [("local", "policy-model")]
    assert _reasons(local) == [("local", "local-only")]
    metrics = router.metrics.registry
    assert metrics.get_sample_value("fedlora_edge_policy_blocks_total", {"rule": "email"}) == 1
    labels = {"served_by": "local", "reason": "policy-blocked"}
    assert metrics.get_sample_value("fedlora_edge_routed_total", labels) == 2


def test_over_budget_keeps_it_local_and_frees_the_breaker_probe(tmp_path: Path) -> None:
    router = _router(tmp_path, budget=0)

    answers = _route(router, ["ok"], [0.5])

    assert _reasons(answers) == [("local", "over-budget")]
    assert router.breaker.allow()  # the slot it took was given back
    labels = {"scope": "key"}
    assert router.metrics.registry.get_sample_value("fedlora_edge_budget_refusals_total", labels)


def _generate(router: HybridRouter, texts: list[str], **kw: Any) -> tuple[Any, str]:
    args = {"model": "lm", "path": "/v1/completions", "stream": False, "residency": None,
            "api_key": "k", "traceparent": None} | kw  # fmt: skip
    return asyncio.run(router.route_generation(texts=texts, body=lambda t: {"prompt": t}, **args))


def test_generation_goes_upstream_only_where_the_policy_marks_it(tmp_path: Path) -> None:
    router = _router(tmp_path)
    router.breaker.record(success=False)  # open: what the policy lets go stops there

    assert _generate(_router(tmp_path, upstream=False), ["hi"]) == (None, "no-upstream")
    assert _generate(router, ["hi"], model="intents") == (None, "policy-model")
    assert _generate(router, ["hi"], residency="local-only") == (None, "local-only")
    assert _generate(router, ["hi"], stream=True) == (None, "stream-local")
    assert _generate(router, ["hi", "x@y.org"]) == (None, "policy-blocked")
    # Strings beside the prompt travel too: a rule matching one keeps the request local.
    stop = asyncio.run(router.route_generation(
        model="lm", path="/v1/completions", texts=["hi"], stream=False, residency=None,
        api_key="k", traceparent=None, body=lambda t: {"prompt": t, "stop": ["12345678"]},
    ))  # fmt: skip
    assert stop == (None, "policy-blocked")
    assert _generate(router, ["hi"]) == (None, "upstream-unavailable")
    assert router.upstream_name("lm") == "lm-cloud" and router.upstream_name("intents") == "cloud"


def test_the_summary_of_a_response() -> None:
    one = [{"served_by": "upstream", "reason": "low-confidence"}]
    two = [*one, {"served_by": "local", "reason": "confident"}]
    local = [{"served_by": "local", "reason": "confident"}, {"served_by": "local", "reason": "x"}]

    assert summary(one) == ("upstream", "low-confidence")
    assert summary(two) == ("mixed", "per-prediction")
    assert summary(local) == ("local", "per-prediction")


def test_traceparent_continues_the_clients_trace_with_a_new_span() -> None:
    child = child_traceparent(TRACE)
    fresh = {child_traceparent(bad) for bad in (None, "", "00-xyz", "ff" + TRACE[2:], TRACE + "x")}

    version, trace, span, flags = child.split("-")
    assert (version, trace, flags) == ("00", TRACE.split("-")[1], "01")
    assert span != TRACE.split("-")[2] and len(span) == 16
    assert len(fresh) == 5 and not any(TRACE.split("-")[1] in f for f in fresh)
    assert all(len(f.split("-")[1]) == 32 for f in fresh)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"upstream": "ftp://cloud"}, "--upstream 'ftp://cloud' must be an http"),
        ({"upstream": "https://u:p@cloud"}, "no credentials"),
        ({"policy": Path("p.toml")}, "--policy and --upstream-model need --upstream"),
        ({"upstream": "http://c", "escalate_below": 0.0}, "--escalate-below 0.0 must be in"),
        ({"upstream": "http://c", "upstream_timeout_s": 0.0}, "--upstream-timeout-s 0.0"),
        ({"upstream": "http://c", "breaker_failures": 0}, "--breaker-failures 0 must be"),
        ({"upstream": "http://c", "policy": Path("/absent.toml")}, "is not a file"),
    ],
)
def test_routing_flags_are_checked(tmp_path: Path, change: dict, message: str) -> None:
    base = {"models": (ModelRef("m"),), "trust": tmp_path, "cache": tmp_path,
            "registry_uri": "sqlite:///x.db"}  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        EdgeSettings(**(base | change))
