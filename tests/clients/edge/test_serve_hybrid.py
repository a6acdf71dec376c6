"""Hybrid routing between two real ``fedlora edge serve`` processes on 127.0.0.1.

The upstream node serves ``cloud`` and ``lm-cloud`` (other adapters on the same tiny base,
standing in for the cloud models); the hybrid node serves ``intents``, ``private`` and the
causal LM ``lm`` (whose generation the policy sends upstream) and escalates to it
through a recording proxy (`server.harness.capture`, a process of its own), which is what
the upstream really received and which can turn slow or failing on request. ``P = 1``
escalates every answer, so each test decides what reaches the upstream by policy alone.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.keys import TrustStore, generate_keypair
from registry.lifecycle import SigningKey, promote, publish
from registry.mlflow_store import MlflowStore
from registry.policy import Policy
from server.harness.capture import CaptureProxy
from server.harness.edge import EdgeNodeProcess
from tests.clients.edge.test_runtime import trained
from tests.conftest import PASSPHRASE

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).with_name("policy_example.toml")
NODE_KEY = "node-upstream-key"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")
PATIENT = re.compile(r"PN-?\d{6}", re.IGNORECASE)
ACCOUNT = re.compile(r"\b\d{8,12}\b")


def _wait(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def nodes(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("hybrid")
    pair = generate_keypair(root / "keys", passphrase=PASSPHRASE)
    (root / "trust").mkdir()
    shutil.copy(pair.public_path, root / "trust" / "k.pub")
    trust = TrustStore.load(root / "trust")
    key = SigningKey(pair.private_path, PASSPHRASE)
    store = MlflowStore(f"sqlite:///{root / 'mlflow.db'}")
    for model, seed, task in (("intents", 4, "sequence-classification"),
                              ("private", 5, "sequence-classification"),
                              ("cloud", 6, "sequence-classification"),
                              ("lm", 7, "causal-lm"), ("lm-cloud", 8, "causal-lm")):  # fmt: skip
        source = trained(tiny_llama, root / model, seed=seed, task=task)
        version = publish(store, source, model=model, key=key).version
        promote(store, model=model, version=version, key=key, trust=trust, policy=Policy())

    def node(name: str, models: list[str], options: list[str] = ()) -> EdgeNodeProcess:
        return EdgeNodeProcess(models=models, trust=root / "trust", cache=root / name,
                               log_path=root / f"{name}.log", registry=store.uri,
                               base=tiny_llama, poll_seconds=3600,
                               env={"FEDLORA_UPSTREAM_KEY": NODE_KEY},
                               options=list(options))  # fmt: skip

    budget_policy = root / "budget.toml"
    budget_policy.write_text(
        EXAMPLE.read_text().replace("per_key_per_day = 100000", "per_key_per_day = 2")
        .replace("global_per_day = 100000", "global_per_day = 3")
    )  # fmt: skip
    upstream = node("upstream", ["cloud", "lm-cloud"])
    proxy = CaptureProxy(target=upstream.url, log_path=root / "capture.log")
    routing = ["--upstream", proxy.url, "--upstream-model", "cloud", "--escalate-below", "1"]
    hybrid_options = [*routing, "--policy", str(EXAMPLE), "--upstream-timeout-s", "1",
                      "--breaker-failures", "2", "--breaker-backoff-s", "1"]  # fmt: skip
    hybrid = node("hybrid", ["intents", "private", "lm"], hybrid_options)
    budgeted = node("budgeted", ["intents"], [*routing, "--policy", str(budget_policy)])
    try:
        # All four start at once (each start waits for its own process to answer): no node
        # calls its upstream before a request asks it to, and none comes before all are ok.
        with ThreadPoolExecutor(4) as pool:
            for started in [pool.submit(s.start) for s in (upstream, proxy, hybrid, budgeted)]:
                started.result()
        for n in (upstream, hybrid, budgeted):
            _wait("ok", lambda n=n: httpx.get(f"{n.url}/healthz").json()["status"] == "ok", 180)
        yield {"upstream": upstream, "proxy": proxy, "hybrid": hybrid, "budgeted": budgeted}
    finally:
        for process in (hybrid, budgeted, proxy, upstream):
            process.stop()


def _predict(url: str, texts: list[str], *, key: str = "client-key", **extra: Any) -> dict:
    headers = {"Authorization": f"Bearer {key}", "traceparent": TRACEPARENT}
    body = {"model": "intents", "texts": texts} | extra
    response = httpx.post(f"{url}/v1/predict", json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _sent(proxy: CaptureProxy) -> list[list[str]]:
    return [json.loads(r["body"])["texts"] for r in proxy.requests() if r["path"] == "/v1/predict"]


def _metric(url: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and (not want or "{" + want + "}" in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_low_confidence_answer_comes_from_the_upstream_with_the_trace(nodes: dict) -> None:
    proxy, hybrid, upstream = nodes["proxy"], nodes["hybrid"], nodes["upstream"]
    proxy.clear()

    answer = _predict(hybrid.url, ["book a table for two"])
    ask = {"model": "cloud", "texts": ["book a table for two"]}
    direct = httpx.post(f"{upstream.url}/v1/predict", json=ask, timeout=30).json()

    assert (answer["served_by"], answer["reason"]) == ("upstream", "low-confidence")
    prediction = answer["predictions"][0]
    assert prediction["served_by"] == "upstream"
    assert prediction["label"] == direct["predictions"][0]["label"]
    assert prediction["scores"] == pytest.approx(direct["predictions"][0]["scores"])
    (seen,) = proxy.requests()
    assert json.loads(seen["body"]) == {"model": "cloud", "texts": ["book a table for two"]}
    version, trace, span, _ = seen["headers"]["traceparent"].split("-")
    assert (version, trace) == ("00", TRACE_ID) and span != TRACEPARENT.split("-")[2]
    # The node's own key goes upstream, never the client's.
    assert seen["headers"]["authorization"] == f"Bearer {NODE_KEY}"
    assert _metric(hybrid.url, "fedlora_edge_upstream_seconds_count", outcome="ok") >= 1
    health = httpx.get(f"{hybrid.url}/healthz").json()["routing"]
    assert health["upstream"] == proxy.url and health["policy"]["source"] == str(EXAMPLE)
    assert health["breaker"]["state"] == "closed" and len(health["policy"]["sha256"]) == 64


def test_every_policy_outcome(nodes: dict) -> None:
    proxy, hybrid = nodes["proxy"], nodes["hybrid"]
    proxy.clear()

    local_only = _predict(hybrid.url, ["book a flight"], residency="local-only")
    private = httpx.post(f"{hybrid.url}/v1/predict", timeout=30,
                         json={"model": "private", "texts": ["book a flight"]}).json()  # fmt: skip
    mixed = _predict(hybrid.url, ["mail ann@example.org", "patient pn123456 is here",
                                  "pay 12345678 now", "hello there"])  # fmt: skip

    assert (local_only["served_by"], local_only["reason"]) == ("local", "local-only")
    assert (private["served_by"], private["reason"]) == ("local", "policy-model")
    assert (mixed["served_by"], mixed["reason"]) == ("mixed", "per-prediction")
    reasons = [(p["served_by"], p["reason"]) for p in mixed["predictions"]]
    assert reasons == [("local", "policy-blocked"), ("local", "policy-blocked"),
                       ("upstream", "low-confidence"), ("upstream", "low-confidence")]  # fmt: skip
    assert mixed["predictions"][2]["redacted"] == ["account"]
    # One call for the request's escalated texts, the account number redacted.
    assert _sent(proxy) == [["pay [account] now", "hello there"]]
    assert _metric(hybrid.url, "fedlora_edge_policy_blocks_total", rule="patient") >= 1


WORD = st.sampled_from(["book", "a", "flight", "to", "pay", "my", "bill", "for", "lisbon"])
SECRET = st.one_of(
    st.from_regex(r"[a-z]{1,6}@[a-z]{1,6}\.(com|org)", fullmatch=True),
    st.from_regex(r"(PN|pn)-?[0-9]{6}", fullmatch=True),
    st.from_regex(r"[1-9][0-9]{7,11}", fullmatch=True),
)
TEXT = st.lists(st.one_of(WORD, WORD, SECRET), min_size=1, max_size=6).map(" ".join)


# Module-scoped nodes: every example talks to the same processes, on purpose.
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    texts=st.lists(TEXT, min_size=1, max_size=4),
    residency=st.sampled_from([None, "any", "local-only"]),
    model=st.sampled_from(["intents", "private"]),
)
def test_nothing_blocked_or_local_only_ever_reaches_the_upstream(
    nodes: dict, texts: list[str], residency: str | None, model: str
) -> None:
    proxy, hybrid = nodes["proxy"], nodes["hybrid"]
    proxy.clear()
    extra = {"model": model} | ({"residency": residency} if residency else {})

    answer = _predict(hybrid.url, texts, **extra)
    sent = [text for batch in _sent(proxy) for text in batch]

    if residency == "local-only" or model == "private":
        assert sent == []
    for text in sent:
        assert not EMAIL.search(text) and not PATIENT.search(text) and not ACCOUNT.search(text)
    allowed = [t for t in texts if not EMAIL.search(t) and not PATIENT.search(t)]
    if residency != "local-only" and model == "intents":
        assert sent == [ACCOUNT.sub("[account]", t) for t in allowed]
    upstream = [p for p in answer["predictions"] if p["served_by"] == "upstream"]
    assert len(upstream) == len(sent)


def test_budgets_per_key_and_global_survive_a_restart(nodes: dict) -> None:
    node = nodes["budgeted"]  # per key 2 a day, 3 in total

    alice = [_predict(node.url, ["hello"], key="alice")["reason"] for _ in range(3)]
    bob = _predict(node.url, ["hello"], key="bob")["reason"]
    node.stop()
    node.start()
    after = [_predict(node.url, ["hello"], key=k)["reason"] for k in ("alice", "bob", "carol")]
    anonymous = httpx.post(f"{node.url}/v1/predict", json={"texts": ["hello"]}, timeout=30)

    assert alice == ["low-confidence", "low-confidence", "over-budget"]
    assert bob == "low-confidence"
    assert after == ["over-budget"] * 3
    assert anonymous.json()["reason"] == "over-budget"
    assert _metric(node.url, "fedlora_edge_budget_refusals_total", scope="global") == 3


def test_a_slow_or_failing_upstream_opens_the_breaker_and_it_recovers(nodes: dict) -> None:
    proxy, hybrid = nodes["proxy"], nodes["hybrid"]  # deadline 1 s; 2 failures open; back-off 1 s

    def breaker() -> dict:
        return httpx.get(f"{hybrid.url}/healthz").json()["routing"]["breaker"]

    def reason() -> str:
        return _predict(hybrid.url, ["hello"])["reason"]

    try:
        proxy.mode(status=500)
        assert reason() == "upstream-unavailable"
        proxy.mode(delay_s=5)
        started = time.monotonic()
        assert reason() == "upstream-unavailable"
        assert time.monotonic() - started < 4  # the deadline, not the upstream, ended it
        assert breaker()["state"] == "open"
        calls = len(proxy.requests())
        assert reason() == "upstream-unavailable"
        assert len(proxy.requests()) == calls  # open: not even tried

        proxy.stop()  # down: connection refused
        _wait("half-open", lambda: breaker()["state"] == "half-open", 10)
        assert reason() == "upstream-unavailable"  # the probe failed: back-off doubles
        assert breaker()["state"] == "open" and breaker()["backoff_s"] == 2
    finally:
        proxy.start()
        proxy.mode()
    _wait("half-open", lambda: breaker()["state"] == "half-open", 10)
    assert reason() == "low-confidence"
    assert breaker()["state"] == "closed" and breaker()["backoff_s"] == 1
    for kind in ("status", "timeout", "connect"):
        assert _metric(hybrid.url, "fedlora_edge_upstream_errors_total", kind=kind) >= 1
    assert _metric(hybrid.url, "fedlora_edge_routed_total", served_by="local",
                   reason="upstream-unavailable") >= 4  # fmt: skip


def test_generation_the_policy_marks_goes_upstream_through_the_openai_api(nodes: dict) -> None:
    proxy, hybrid, upstream = nodes["proxy"], nodes["hybrid"], nodes["upstream"]
    client = openai.OpenAI(base_url=f"{hybrid.url}/v1", api_key="client-key", max_retries=0)
    direct = openai.OpenAI(base_url=f"{upstream.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "call 12345678 please"}]
    proxy.clear()

    answer = client.chat.completions.create(model="lm", messages=messages, max_tokens=6,
                                            temperature=0)  # fmt: skip
    redacted = [{"role": "user", "content": "call [account] please"}]
    cloud = direct.chat.completions.create(model="lm-cloud", messages=redacted, max_tokens=6,
                                           temperature=0)  # fmt: skip
    blocked = client.completions.create(model="lm", prompt="mail ann@example.org", max_tokens=4)
    local = client.completions.create(model="lm", prompt="hello", max_tokens=4,
                                      extra_body={"residency": "local-only"})  # fmt: skip
    streamed = client.completions.with_raw_response.create(model="lm", prompt="hello",
                                                           max_tokens=4, stream=True)  # fmt: skip

    extra = answer.model_extra or {}
    assert (extra["served_by"], extra["reason"]) == ("upstream", "policy-generation")
    assert answer.choices[0].message.content == cloud.choices[0].message.content
    (seen,) = proxy.requests()  # only the first: the others stayed local
    sent = json.loads(seen["body"])
    assert seen["path"] == "/v1/chat/completions" and sent["model"] == "lm-cloud"
    assert sent["messages"] == redacted
    assert seen["headers"]["traceparent"].startswith("00-")
    assert seen["headers"]["authorization"] == f"Bearer {NODE_KEY}"
    assert (blocked.model_extra or {})["reason"] == "policy-blocked"
    assert (local.model_extra or {})["served_by"] == "local"
    assert (local.model_extra or {})["reason"] == "local-only"
    assert streamed.headers["x-fedlora-served-by"] == "local"
    assert streamed.headers["x-fedlora-reason"] == "stream-local"
    assert "".join(c.choices[0].text for c in streamed.parse() if c.choices)
