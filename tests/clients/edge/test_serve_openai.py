"""A real ``fedlora edge serve`` on 127.0.0.1 serving a causal LM and a classifier on one
tiny base: the official ``openai`` client against its OpenAI-compatible endpoints, and a
bounded loopback load test (64 concurrent clients, a refresh storm, a 100 MB chunked body).
"""

from __future__ import annotations

import shutil
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from registry.keys import TrustStore, generate_keypair
from registry.lifecycle import SigningKey, promote, publish
from registry.mlflow_store import MlflowStore
from registry.policy import Policy
from server.harness.edge import EdgeNodeProcess
from tests.clients.edge.test_runtime import trained
from tests.conftest import PASSPHRASE

pytestmark = pytest.mark.integration
TOKEN = "openai-test-token"
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
MAX_ITEMS, MAX_CHARS = 16, 2000


@pytest.fixture(scope="module")
def served(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("openai-node")
    # The same weights (so the same base digest) with a chat template in its tokenizer.
    base = root / "base"
    shutil.copytree(tiny_llama, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(base)
    pair = generate_keypair(root / "keys", passphrase=PASSPHRASE)
    (root / "trust").mkdir()
    shutil.copy(pair.public_path, root / "trust" / "k.pub")
    trust = TrustStore.load(root / "trust")
    key = SigningKey(pair.private_path, PASSPHRASE)
    store = MlflowStore(f"sqlite:///{root / 'mlflow.db'}")
    sources = {
        "lm": trained(tiny_llama, root / "lm", seed=3, task="causal-lm"),
        "intents": trained(tiny_llama, root / "intents", seed=4),
    }
    for model, source in sources.items():
        version = publish(store, source, model=model, key=key).version
        promote(store, model=model, version=version, key=key, trust=trust, policy=Policy())
    node = EdgeNodeProcess(
        models=["lm", "intents"],
        trust=root / "trust",
        cache=root / "cache",
        log_path=root / "edge.log",
        registry=store.uri,
        base=base,
        poll_seconds=3600,
        env={"FEDLORA_EDGE_TOKEN": TOKEN},
        options=["--max-items", str(MAX_ITEMS), "--max-text-chars", str(MAX_CHARS)],
    )
    with node:
        deadline = time.monotonic() + 180
        while httpx.get(f"{node.url}/healthz", timeout=10).json()["status"] != "ok":
            assert time.monotonic() < deadline, node.log_path.read_text()[-3000:]
            time.sleep(0.5)
        assert node.process is not None
        yield {"url": node.url, "pid": node.process.popen.pid, "base": base}


@pytest.fixture
def client(served: dict) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0)


def test_models_lists_each_served_name_at_alias(client: openai.OpenAI) -> None:
    ids = {model.id for model in client.models.list()}

    assert ids == {"lm@production", "intents@production"}
    assert client.models.retrieve("lm@production").owned_by == "fedlora"


def test_completions_honour_max_tokens_and_match_the_node_greedy_answer(
    client: openai.OpenAI, served: dict
) -> None:
    done = client.completions.create(
        model="lm@production", prompt="hello world", max_tokens=5, temperature=0
    )
    generate = {"model": "lm", "prompt": "hello world", "max_new_tokens": 5}
    greedy = httpx.post(f"{served['url']}/v1/generate", json=generate, timeout=60)

    choice = done.choices[0]
    assert choice.finish_reason == "length" and done.usage.completion_tokens == 5
    assert choice.text == greedy.json()["text"]
    assert done.model == "lm@production" and done.id.startswith("cmpl-")


def test_streamed_completions_are_the_same_text_in_pieces(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="lm", prompt="the weather", max_tokens=8,
                                      temperature=0).choices[0]  # fmt: skip
    chunks = list(client.completions.create(model="lm", prompt="the weather", max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip

    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text == whole.text
    assert finishes[-1] == "length" and set(finishes[:-1]) <= {None}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_a_stop_string_ends_the_completion_before_it(client: openai.OpenAI) -> None:
    free = client.completions.create(model="lm", prompt="book a", max_tokens=12, temperature=0)
    text = free.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text  # the tiny model's greedy text has a middle to cut at

    for stream in (False, True):
        answer = client.completions.create(model="lm", prompt="book a", max_tokens=12,
                                           temperature=0, stop=[stop], stream=stream)  # fmt: skip
        if stream:
            pieces = list(answer)
            got = "".join(c.choices[0].text for c in pieces if c.choices)
            finish = pieces[-1].choices[0].finish_reason
        else:
            got, finish = answer.choices[0].text, answer.choices[0].finish_reason
        assert got == text[: text.index(stop)] and finish == "stop"


def test_chat_uses_the_base_chat_template_whole_and_streamed(
    client: openai.OpenAI, served: dict
) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ask = {"model": "lm@production", "messages": messages, "max_tokens": 4, "temperature": 0}
    done = client.chat.completions.create(**ask)
    streamed = list(client.chat.completions.create(**ask, stream=True))

    tokenizer = AutoTokenizer.from_pretrained(served["base"])
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|system|>")
    expected = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert done.usage.prompt_tokens == expected
    message = done.choices[0].message
    assert message.role == "assistant" and done.choices[0].finish_reason == "length"
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == message.content


def test_sampling_with_temperature_differs_from_greedy(client: openai.OpenAI) -> None:
    greedy = client.completions.create(model="lm", prompt="hello", max_tokens=8, temperature=0)
    sampled = [
        client.completions.create(model="lm", prompt="hello", max_tokens=8, temperature=1.5)
        .choices[0]
        .text
        for _ in range(3)
    ]
    assert any(text != greedy.choices[0].text for text in sampled)


def test_errors_have_the_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="lm@candidate", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="use /v1/predict"):
        client.completions.create(model="intents", prompt="hi", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens"):
        client.completions.create(model="lm", prompt="hi", max_tokens=10_000)
    with pytest.raises(openai.UnprocessableEntityError, match="n"):
        client.completions.create(model="lm", prompt="hi", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="tokens"):
        client.completions.create(model="lm", prompt="word " * 300, max_tokens=2)


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def test_64_concurrent_clients_get_no_5xx_and_memory_stays_steady(served: dict) -> None:
    url = served["url"]
    body = {"model": "intents", "texts": ["x" * MAX_CHARS] * MAX_ITEMS}  # maximum size
    statuses: list[int] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        with httpx.Client(timeout=300) as http:
            for _ in range(n):
                status = http.post(f"{url}/v1/predict", json=body).status_code
                with lock:
                    statuses.append(status)

    def round_of(n: int) -> None:
        with ThreadPoolExecutor(64) as pool:
            list(pool.map(lambda _: client(n), range(64)))

    round_of(1)  # warm-up: the first batches size torch's buffers
    after_warmup = _rss(served["pid"])
    round_of(3)
    after_first = _rss(served["pid"])
    round_of(3)
    after_second = _rss(served["pid"])

    assert statuses and max(statuses) < 500, sorted(set(statuses))
    assert after_second - after_first < 64 * 2**20, (after_warmup, after_first, after_second)
    assert after_first - after_warmup < 256 * 2**20, (after_warmup, after_first, after_second)


def test_a_refresh_storm_runs_off_the_request_path(served: dict) -> None:
    url = served["url"]
    latencies: list[float] = []
    stop = threading.Event()

    def predict() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                start = time.perf_counter()
                assert http.post(f"{url}/v1/predict", json={"model": "intents",
                                 "texts": ["hello"]}).status_code == 200  # fmt: skip
                latencies.append(time.perf_counter() - start)

    def refresh(_: int) -> int:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        return httpx.post(f"{url}/v1/refresh", headers=headers, timeout=120).status_code

    thread = threading.Thread(target=predict)
    thread.start()
    time.sleep(0.5)
    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(refresh, range(200)))
    stop.set()
    thread.join()

    assert set(codes) == {200}
    assert max(latencies) < 5.0 and statistics.median(latencies) < 0.5, latencies


def test_a_chunked_100_mb_body_is_cut_off_at_the_limit(served: dict) -> None:
    host, port = served["url"].removeprefix("http://").split(":")
    before = _rss(served["pid"])
    sent = 0
    chunk = b"x" * 65536
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nTransfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        try:
            while sent < 100 * 2**20:
                sock.sendall(frame)
                sent += len(chunk)
        except (TimeoutError, ConnectionError):
            pass  # the node stopped reading: what a limit does
        sock.settimeout(10)
        answer = sock.recv(4096)

    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert _rss(served["pid"]) - before < 32 * 2**20
    assert httpx.get(f"{served['url']}/healthz", timeout=10).status_code == 200


def test_a_client_that_leaves_a_stream_stops_its_generation(client: openai.OpenAI) -> None:
    def next_request_after(*, close: bool) -> float:
        stream = client.completions.create(model="lm", prompt="hello world", max_tokens=64,
                                           temperature=0, stream=True)  # fmt: skip
        next(iter(stream))
        if close:  # the connection goes away: the node cancels the row
            stream.close()
        start = time.perf_counter()
        client.completions.create(model="lm", prompt="hi", max_tokens=1)
        waited = time.perf_counter() - start
        stream.close()
        time.sleep(1)
        return waited

    left_open = next_request_after(close=False)  # behind 63 more tokens for nobody
    closed = next_request_after(close=True)

    assert closed < left_open / 3, (closed, left_open)


def test_a_client_that_leaves_a_whole_answer_stops_its_generation(
    client: openai.OpenAI, served: dict
) -> None:
    url = f"{served['url']}/v1/completions"
    body = {"model": "lm", "prompt": "hello world", "max_tokens": 64, "temperature": 0}

    def whole_answer() -> None:
        assert httpx.post(url, json=body, timeout=60).status_code == 200

    def next_request_after(*, leave: bool) -> float:
        if leave:  # the client gives up once its 64 tokens are under way, and disconnects
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url, json=body, timeout=httpx.Timeout(60, read=0.1))
            waiter = None
        else:
            waiter = threading.Thread(target=whole_answer)
            waiter.start()
            time.sleep(0.1)
        start = time.perf_counter()
        client.completions.create(model="lm", prompt="hi", max_tokens=1)
        waited = time.perf_counter() - start
        if waiter is not None:
            waiter.join()
        time.sleep(1)
        return waited

    kept = next_request_after(leave=False)  # behind the rest of 64 tokens someone reads
    left = next_request_after(leave=True)
    metrics = httpx.get(f"{served['url']}/metrics", timeout=10).text

    assert left < kept / 3, (left, kept)
    assert 'fedlora_edge_requests_total{endpoint="/v1/completions",model="lm",status="499"}' in (
        metrics
    )
