"""The edge node's HTTP API in process (FastAPI's TestClient) over a real node and registry."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from clients.edge.app import PredictRequest, create_app
from clients.edge.generation import Sampling
from clients.edge.node import EdgeNode
from clients.edge.openai_api import ChatRequest, CompletionRequest
from clients.edge.runtime import PromptRefused, SharedBase
from clients.edge.settings import MAX_ITEMS, EdgeSettings, ModelRef
from clients.task.errors import ConfigError
from clients.task.model import ModelSpec, build_model, save_adapter
from registry.keys import TrustStore
from registry.lifecycle import SigningKey, promote, publish
from registry.mlflow_store import MlflowStore
from registry.policy import Policy
from tests.conftest import PASSPHRASE

pytestmark = pytest.mark.integration
TOKEN = "admin-token-for-tests"


@pytest.fixture(scope="module")
def client(
    training_outputs: list[Path], tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> TestClient:
    from registry.keys import generate_keypair

    root = tmp_path_factory.mktemp("edge-app")
    pair = generate_keypair(root / "keys", passphrase=PASSPHRASE)
    (root / "trust").mkdir()
    (root / "trust" / "k.pub").write_bytes(pair.public_path.read_bytes())
    store = MlflowStore(f"sqlite:///{root / 'mlflow.db'}")
    key = SigningKey(pair.private_path, PASSPHRASE)
    lm = root / "lm-train"
    spec = ModelSpec(base=str(tiny_llama), task="causal-lm", lora_r=4)
    save_adapter(build_model(spec), lm / "adapter")
    for model, source in (("intents", training_outputs[0]), ("lm", lm)):
        publish(store, source, model=model, key=key)
        promote(
            store, model=model, version="1", key=key,
            trust=TrustStore.load(root / "trust"), policy=Policy(),
        )  # fmt: skip
    node = EdgeNode(
        EdgeSettings(
            models=(ModelRef("intents"), ModelRef("lm"), ModelRef("absent")),
            trust=root / "trust",
            cache=root / "cache",
            registry_uri=store.uri,
            base=str(tiny_llama),
            admin_token=TOKEN,
            max_items=8,
            max_text_chars=200,
        )
    )
    node.start()
    return TestClient(create_app(node, poll=False))


def test_predict_answers_with_the_verified_release(client: TestClient) -> None:
    response = client.post("/v1/predict", json={"model": "intents", "texts": ["hi", "bye now"]})

    assert response.status_code == 200
    body = response.json()
    assert body["version"] == "1"
    for row in body["predictions"]:
        assert row["label"] in ("greet", "bye")
        assert sum(row["scores"].values()) == pytest.approx(1.0, abs=1e-4)


def test_health_and_adapters_describe_what_is_served(client: TestClient) -> None:
    health = client.get("/healthz")
    adapters = client.get("/v1/adapters").json()

    assert health.status_code == 200 and health.json()["status"] == "degraded"  # 'absent'
    assert health.json()["models"]["absent"]["status"] == "unavailable"
    active = adapters["intents"]["active"]
    assert active["version"] == "1" and len(active["digest"]) == 64
    assert {"key_id", "epsilon", "provenance"} <= set(active)
    assert adapters["absent"]["active"] is None


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": "intents", "texts": []}, 422, "at least one text"),
        ({"model": "intents", "texts": ["ok", "  "]}, 422, "texts[1] is empty"),
        ({"model": "intents", "texts": ["x"] * 9}, 413, "texts has 9 items; at most 8"),
        ({"model": "intents", "texts": ["x" * 201]}, 413, "201 characters; at most 200"),
        ({"model": "intents", "texts": "hi"}, 422, "valid list"),
        ({"model": "intents", "texts": [1]}, 422, "valid string"),
        ({"model": "intents", "texts": ["hi"], "extra": 1}, 422, "Extra inputs"),
        ({"model": "nope", "texts": ["hi"]}, 404, "unknown model 'nope'"),
        ({"texts": ["hi"]}, 422, "several models are served"),
        ({"model": "absent", "texts": ["hi"]}, 503, "no verified release of absent@production"),
    ],
)
def test_bad_requests_get_a_clear_4xx(
    client: TestClient, body: dict, status: int, message: str
) -> None:
    response = client.post("/v1/predict", json=body)
    assert response.status_code == status
    assert message in json.dumps(response.json())


def test_one_node_serves_several_models_each_on_its_endpoint(client: TestClient) -> None:
    text = client.post("/v1/generate", json={"model": "lm", "prompt": "hello", "max_new_tokens": 3})
    assert text.status_code == 200 and isinstance(text.json()["text"], str)
    too_long = client.post("/v1/generate", json={"model": "lm", "prompt": "hi",
                                                 "max_new_tokens": 10_000})  # fmt: skip
    assert too_long.status_code == 422 and "must be in 1..64" in too_long.json()["detail"]
    wrong = client.post("/v1/generate", json={"model": "intents", "prompt": "hi"})
    assert wrong.status_code == 400 and "use /v1/predict" in wrong.json()["detail"]
    wrong = client.post("/v1/predict", json={"model": "lm", "texts": ["hi"]})
    assert wrong.status_code == 400 and "use /v1/generate" in wrong.json()["detail"]


def test_refresh_needs_the_admin_token(client: TestClient) -> None:
    assert client.post("/v1/refresh").status_code == 401
    bad = client.post("/v1/refresh", headers={"Authorization": "Bearer guess"})
    assert bad.status_code == 401
    ok = client.post("/v1/refresh", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    assert ok.json()["swapped"] == {"intents": False, "lm": False, "absent": False}


def test_metrics_count_requests_in_prometheus_format(client: TestClient) -> None:
    client.post("/v1/predict", json={"model": "intents", "texts": ["hi"]})
    text = client.get("/metrics").text
    assert 'fedlora_edge_requests_total{endpoint="/v1/predict",model="intents",status="200"}' in (
        text
    )
    assert "fedlora_edge_request_seconds_bucket" in text
    assert "fedlora_edge_bases_loaded 2.0" in text  # the classifier's base and the LM's


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
BODIES = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"texts": st.lists(st.text(max_size=300), max_size=10)},
        optional={"model": st.sampled_from(["intents", "absent", "", "x"]) | JSON},
    ),
    st.fixed_dictionaries(
        {"prompt": st.text(max_size=50)},
        optional={"max_new_tokens": st.integers(-5, 10_000) | JSON, "model": JSON},
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(["/v1/predict", "/v1/generate", "/v1/refresh"]), body=BODIES)
def test_fuzzed_json_never_gets_a_5xx_except_a_missing_release(
    client: TestClient, path: str, body: object
) -> None:
    # Encoded here: NaN and ±Infinity are what a hostile client may send (Python's json
    # reads them), and the test client's encoder would refuse them before the node sees them.
    response = client.post(
        path, content=json.dumps(body), headers={"content-type": "application/json"}
    )
    if response.status_code == 503:  # the one model with nothing verified: a stated reason
        assert "no verified release of absent" in response.json()["detail"]
        return
    assert response.status_code < 500, response.text


@settings(max_examples=20, deadline=None)
@given(raw=st.binary(max_size=200))
def test_fuzzed_raw_bytes_never_get_a_5xx(client: TestClient, raw: bytes) -> None:
    response = client.post("/v1/predict", content=raw, headers={"content-type": "application/json"})
    assert response.status_code < 500


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"models": ()}, "--model is required"),
        ({"models": (ModelRef("a"), ModelRef("a", "x"))}, "lists a model twice"),
        ({"port": 0}, "--port 0 is not a TCP port"),
        ({"poll_seconds": 0.0}, "--poll-seconds 0.0 must be > 0"),
        ({"quantization": "8bit"}, "--quantization '8bit'"),
        ({"max_items": 0}, "--max-items 0 must be ≥ 1"),
    ],
)
def test_edge_settings_name_the_bad_flag(tmp_path: Path, change: dict, message: str) -> None:
    base = dict(models=(ModelRef("m"),), trust=tmp_path, cache=tmp_path, registry_uri="x")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        EdgeSettings(**(base | change))


def test_model_ref_parsing() -> None:
    assert ModelRef.parse("intents") == ModelRef("intents", "production")
    assert ModelRef.parse("intents@candidate") == ModelRef("intents", "candidate")
    with pytest.raises(ConfigError, match="NAME or NAME@ALIAS"):
        ModelRef.parse("intents@")


def test_a_chunked_body_past_the_limit_is_refused(client: TestClient) -> None:
    # In process the test client buffers the body; test_serve.py sends one to a real
    # node and checks that it stops reading at the limit.
    chunks = (b"x" * 65536 for _ in range(100))  # no Content-Length: chunked

    response = client.post("/v1/predict", content=chunks,
                           headers={"content-type": "application/json"})  # fmt: skip

    assert response.status_code == 413 and "more than" in response.json()["detail"]


@pytest.mark.parametrize(
    ("raw", "status", "message"),
    [
        ('{"model": "intents", "texts": ["ok \\ud800"]}', 422, "lone surrogate"),
        ('{"model": "\\udfff", "texts": ["ok"]}', 422, "lone surrogate"),
        ('{"model": "intents", "texts": ["ok"], "\\ud800": 1}', 422, "unicode"),
        ('{"model": "intents", "texts": [NaN]}', 422, "valid string"),
        ('{"model": "intents", "texts": ["ok"], "x": Infinity}', 422, "Extra inputs"),
        ('{"model": "intents", "texts": ' + "1" * 5000 + "}", 400, "parsing the body"),
        ('{"model": "intents", "texts": 1e400}', 422, "valid list"),
        ('{"texts": ' + "[" * 20_000 + "]" * 20_000 + "}", 400, "parsing the body"),
    ],
)
def test_requests_that_cannot_be_encoded_get_a_4xx(
    client: TestClient, raw: str, status: int, message: str
) -> None:
    response = client.post("/v1/predict", content=raw.encode(),
                           headers={"content-type": "application/json"})  # fmt: skip

    assert response.status_code == status, response.text
    assert message in response.text
    response.content.decode("ascii")  # always encodable, whatever the client sent


def test_client_chosen_paths_and_models_never_become_metric_labels(client: TestClient) -> None:
    for i in range(30):
        client.get(f"/v1/probe-{i}")
        client.post("/v1/predict", json={"model": f"probe-{i}", "texts": ["hi"]})

    text = client.get("/metrics").text

    assert "probe-" not in text
    assert 'endpoint="unmatched"' in text


def test_a_full_queue_answers_503_with_retry_after(client: TestClient) -> None:
    release = client.app.state.node.slots["intents"].active  # type: ignore[attr-defined]
    batcher = release.base.batcher
    gate = threading.Event()
    batcher.call(gate.wait, wait=False)
    fillers = []
    try:
        while batcher.waiting < batcher.max_queue:  # what many slow clients would queue
            fillers.append(release.submit_predict(["filler"]))
        response = client.post("/v1/predict", json={"model": "intents", "texts": ["hi"]})
        chat = client.post("/v1/completions", json={"model": "lm", "prompt": "hi"})
    finally:
        gate.set()

    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    assert chat.status_code in (200, 503)  # another base: its own queue
    assert all(f.result(timeout=120)[0]["label"] in ("greet", "bye") for f in fillers)


OPENAI_BODIES = st.one_of(
    BODIES,
    st.fixed_dictionaries(
        {"model": st.sampled_from(["lm", "lm@production", "lm@x", "intents", "absent"]) | JSON},
        optional={
            "prompt": st.text(max_size=40) | st.lists(st.text(max_size=20), max_size=3) | JSON,
            "messages": st.lists(
                st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "bot"]),
                                       "content": st.text(max_size=20) | JSON}),
                max_size=3,
            ) | JSON,
            "max_tokens": st.integers(-2, 100) | JSON,
            "temperature": st.floats() | JSON,
            "top_p": st.floats() | JSON,
            "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6) | JSON,
            "stream": st.booleans() | JSON,
            "n": st.integers(0, 3),
        },
    ),
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=OPENAI_BODIES)
@example(path="/v1/completions", body={"model": "lm", "prompt": "x", "temperature": math.nan})
@example(path="/v1/chat/completions", body={"model": "lm", "messages": [], "top_p": math.inf})
def test_fuzzed_openai_requests_never_get_a_5xx_except_a_missing_release(
    client: TestClient, path: str, body: object
) -> None:
    # Encoded here: NaN and ±Infinity are what a hostile client may send (Python's json
    # reads them), and the test client's encoder would refuse them before the node sees them.
    response = client.post(
        path, content=json.dumps(body), headers={"content-type": "application/json"}
    )
    if response.status_code == 503:
        assert "no verified release of absent" in response.json()["error"]["message"]
        return
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()["error"]) >= {"message", "type"}


RAISING_TEMPLATE = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"


class NoSpecialTokens:
    """The base's tokenizer adding no BOS or EOS token, as many bases': "" has no tokens."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str, **kwargs: Any) -> Any:
        return self.tokenizer(text, **(kwargs | {"add_special_tokens": False}))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def lm_base(client: TestClient) -> SharedBase:
    return client.app.state.node.slots["lm"].active.base  # type: ignore[attr-defined]


def test_one_bad_row_never_fails_the_other_requests_of_its_batch(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = client.app.state.node.slots["lm"].active  # type: ignore[attr-defined]
    monkeypatch.setattr(release.base, "tokenizer", NoSpecialTokens(release.base.tokenizer))
    monkeypatch.setattr(release.base.tokenizer.tokenizer, "chat_template", RAISING_TEMPLATE)
    gate = threading.Event()
    release.base.batcher.call(gate.wait, wait=False)  # the requests below make one batch
    requests = {
        "subnormal temperature": (["hello"], Sampling(max_tokens=4, temperature=1e-40)),
        "no tokens": ([" "], Sampling(max_tokens=4)),
        "template refuses": ([[{"role": "user", "content": "hi"}]], Sampling(max_tokens=4)),
        "greedy": (["hello world", "bye"], Sampling(max_tokens=4)),
        "sampled": (["hello"], Sampling(max_tokens=4, temperature=0.7, top_p=0.9)),
    }
    futures = {name: release.submit_generate(*args)[0] for name, args in requests.items()}
    gate.set()

    for name in ("subnormal temperature", "greedy", "sampled"):
        done = futures[name].result(timeout=120)
        assert all(c.completion_tokens >= 1 for c in done), name
    with pytest.raises(PromptRefused, match="the prompt is empty"):
        futures["no tokens"].result(timeout=120)
    with pytest.raises(PromptRefused, match="roles must alternate"):
        futures["template refuses"].result(timeout=120)


@pytest.mark.parametrize("template", ["{{ messages | no_such_filter }}", "{% if %}"])
def test_a_broken_chat_template_is_not_blamed_on_the_client(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, template: str
) -> None:
    # Only the template's own raise_exception refuses the messages (400); a template that
    # cannot render anything is the operator's to fix and must not pass for a bad request.
    base = lm_base(client)
    monkeypatch.setattr(base.tokenizer, "chat_template", template)

    with pytest.raises(Exception) as err:
        base.render_chat([{"role": "user", "content": "hi"}])

    assert not isinstance(err.value, PromptRefused)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("path", "body", "message", "param"),
    [
        ("/v1/completions", {"prompt": ""}, "the prompt is empty", "prompt"),
        ("/v1/completions", {"prompt": ["hello", " "]}, "prompt[1] is empty", "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
         "chat template refused the messages: Conversation roles must alternate", "messages"),
    ],
)  # fmt: skip
def test_a_prompt_the_base_cannot_take_is_a_400_whole_or_streamed(
    client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    body: dict,
    message: str,
    param: str,
    stream: bool,
) -> None:
    base = lm_base(client)
    monkeypatch.setattr(base, "tokenizer", NoSpecialTokens(base.tokenizer))
    monkeypatch.setattr(base.tokenizer.tokenizer, "chat_template", RAISING_TEMPLATE)

    response = client.post(path, json={"model": "lm", "max_tokens": 2, "stream": stream} | body)

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


def test_a_tiny_temperature_is_answered_on_every_endpoint(client: TestClient) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for path, body in (("/v1/completions", {"prompt": "hello"}), ("/v1/chat/completions", chat)):
        for stream in (False, True):
            tiny = {"model": "lm", "max_tokens": 3, "temperature": 1e-40, "stream": stream}
            response = client.post(path, json=tiny | body)
            assert response.status_code == 200, response.text
            assert not stream or response.text.endswith("data: [DONE]\n\n")


def _failing_generate(model: Any, tokenizer: Any, rows: Any, *, device: Any) -> None:
    rows[0].on_text("partial")
    raise RuntimeError("CUDA error: device-side assert triggered")


def test_a_batch_that_fails_answers_json_and_a_stream_still_ends_with_done(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("clients.edge.runtime.run_generate", _failing_generate)
    node = TestClient(client.app, raise_server_exceptions=False)  # as a real node answers
    completion = {"model": "lm", "prompt": "hello", "max_tokens": 2}

    whole = node.post("/v1/completions", json=completion)
    generate = node.post("/v1/generate", json={"model": "lm", "prompt": "hello"})
    streamed = node.post("/v1/completions", json=completion | {"stream": True})

    assert whole.status_code == 500 and whole.json()["error"]["type"] == "server_error"
    assert generate.status_code == 500 and "log" in generate.json()["detail"]
    assert streamed.status_code == 200  # the stream had begun: an error event, then DONE
    events = [line for line in streamed.text.split("\n\n") if line]
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["text"] == "partial"
    assert json.loads(events[1].removeprefix("data: "))["error"]["type"] == "server_error"
    assert events[2:] == ["data: [DONE]"]
    assert "CUDA" not in whole.text + generate.text + streamed.text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ],
)
def test_openai_nullable_options_sent_as_null_take_their_default(
    client: TestClient, path: str, body: dict
) -> None:
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None}

    response = client.post(path, json={"model": "lm", "max_tokens": 2} | nulls | body)

    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1  # n=1, not streamed


@pytest.mark.parametrize(
    ("path", "raw", "message", "param"),
    [
        ("/v1/completions", '{"model": "lm", "prompt": "\\ud800"}',
         "prompt: not valid Unicode at character 0 (a lone surrogate)", "prompt"),
        ("/v1/completions", '{"model": "lm", "prompt": ["a", 1]}',
         "prompt.1: Input should be a valid string", "prompt.1"),
        ("/v1/chat/completions",
         '{"model": "lm", "messages": [{"role": "user", "content": [{"type": "text"}]}]}',
         "messages.0.content.0.text: Field required", "messages.0.content.0.text"),
        ("/v1/completions", '{"model": "lm", "prompt": "a", "a b": 1}',
         "a b: Extra inputs are not permitted", "a b"),
        ("/v1/completions", '{"model": "lm", "prompt":',
         "the body is not valid JSON: Expecting value at byte 25", None),
        ("/v1/chat/completions",
         '{"model": "lm", "messages": [{"role": "user", "content": "hi"}], '
         '"max_completion_tokens": 1000}',
         "max_completion_tokens=1000 must be in 1..64", None),
    ],
)  # fmt: skip
def test_openai_errors_name_the_clients_field_not_pydantics_internals(
    client: TestClient, path: str, raw: str, message: str, param: str | None
) -> None:
    response = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})

    error = response.json()["error"]
    assert response.status_code in (400, 422)
    assert (error["message"], error["param"]) == (message, param)


def test_a_body_past_the_limit_is_refused_in_each_paths_shape_and_counted(
    client: TestClient,
) -> None:
    big = b"x" * 80_000  # the fixture's node takes 8 x 200 characters: 71,936 bytes

    openai = client.post("/v1/completions", content=big)
    classic = client.post("/v1/predict", content=big)

    assert openai.status_code == classic.status_code == 413
    assert "at most 71936" in openai.json()["error"]["message"]
    assert openai.json()["error"]["type"] == "invalid_request_error"
    assert "at most 71936" in classic.json()["detail"]
    text = client.get("/metrics").text
    assert 'fedlora_edge_requests_total{endpoint="unmatched",model="-",status="413"}' in text


N = 20_000  # wrongly typed items in a body under the fixture node's 71,936 bytes


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/completions", {"model": "lm", "prompt": [0] * N}, "prompt: List should"),
        ("/v1/completions", {"model": "lm", "prompt": "a", "stop": [0] * N}, "stop: List"),
        ("/v1/chat/completions", {"model": "lm", "messages": [{}] * N}, "messages: List"),
        ("/v1/chat/completions", {"model": "lm", "messages": [{"role": "user",
                                                               "content": [{}] * N}]},
         "messages.0.content: List should"),
        ("/v1/predict", {"model": "intents", "texts": [0] * N}, "List should"),
    ],
)  # fmt: skip
def test_a_list_past_the_item_ceiling_is_refused_before_its_items_are_validated(
    client: TestClient, path: str, body: dict, message: str
) -> None:
    model = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest,
             "/v1/predict": PredictRequest}[path]  # fmt: skip
    with pytest.raises(ValidationError) as refused:
        model.model_validate(body)

    response = client.post(path, json=body)

    assert refused.value.error_count() <= 2  # not one error per item
    assert response.status_code == 422
    assert message in response.text and f"at most {MAX_ITEMS} items" in response.text
