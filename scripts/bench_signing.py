"""Benchmark: signing and verifying releases, against sha256sum and the stock CLI; publish.

For each size (1 MB, 100 MB, 1 GB by default) a release directory holds one random
``adapter_model.safetensors`` of that size plus small JSON files. Measured, each the median
of ``--repeats``:

* ``sha256sum`` over the same bytes (the floor: every byte must be hashed once),
* fedlora's `sign_release` and `verify_release` (in process; model-signing underneath),
* the stock ``model_signing sign key`` / ``verify key`` commands (including their start-up).

Target: sign and verify throughput ≥ 0.8 × sha256sum. Then a real local ``mlflow server``
(SQLite, artifact proxy) is started on 127.0.0.1 and a 10 MB adapter is published with
`registry.lifecycle.publish` (sign, upload, version, alias, index); target ≤ 2 s.

    python scripts/bench_signing.py                 # full run, writes bench-out/signing.*
    python scripts/bench_signing.py --sizes-mb 1 --publish-mb 1 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clients.task.choices import TASK_FILE  # noqa: E402
from registry.artifact import build_release  # noqa: E402
from registry.keys import TrustStore, generate_keypair  # noqa: E402
from registry.signing import sign_release, verify_release  # noqa: E402

console = Console(stderr=True)
BIN = Path(sys.executable).parent
CHUNK = 16 << 20


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _source(directory: Path, size: int) -> Path:
    """A PEFT-shaped adapter directory whose weights file has ``size`` random bytes."""
    directory.mkdir(parents=True)
    with (directory / "adapter_model.safetensors").open("wb") as fh:
        left = size
        while left > 0:
            n = min(CHUNK, left)
            fh.write(os.urandom(n))
            left -= n
    (directory / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}\n')
    task = {"task": "sequence-classification", "labels": ["a", "b"], "base_model": "bench",
            "base_digest": "sha256:" + "0" * 64}  # fmt: skip
    (directory / TASK_FILE).write_text(json.dumps(task))
    return directory


def _run(cmd: Sequence[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {done.stderr.strip()[-500:]}")


def bench_size(size_mb: int, *, work: Path, repeats: int) -> dict[str, Any]:
    size = size_mb << 20
    keys = generate_keypair(work / "keys")
    (work / "trust").mkdir()
    shutil.copy(keys.public_path, work / "trust" / "k.pub")
    trust = TrustStore.load(work / "trust")
    release = work / "release"
    build_release(_source(work / "source", size), release, model_name="bench", release=1)
    shutil.rmtree(work / "source")
    sig = release / "model.sig"
    stock_sig = work / "stock.sig"
    weights = release / "adapter_model.safetensors"

    sha = _median_seconds(lambda: _run(["sha256sum", str(weights)]), repeats)
    sign = _median_seconds(lambda: sign_release(release, private_key=keys.private_path), repeats)
    # verify_release raises on any mismatch, so a fast wrong answer cannot pass as a number
    verify = _median_seconds(lambda: verify_release(release, trust), repeats)
    sig.unlink()
    stock_sign = _median_seconds(
        lambda: _run([str(BIN / "model_signing"), "sign", "key", str(release),
                      "--private_key", str(keys.private_path), "--signature", str(stock_sig)]),
        repeats,
    )  # fmt: skip
    stock_verify = _median_seconds(
        lambda: _run([str(BIN / "model_signing"), "verify", "key", str(release),
                      "--signature", str(stock_sig), "--public_key", str(keys.public_path)]),
        repeats,
    )  # fmt: skip
    total = sum(p.stat().st_size for p in release.iterdir() if p.is_file())

    def mbps(seconds: float, nbytes: int = total) -> float:
        return nbytes / seconds / 1e6

    row = {
        "size_mb": size_mb,
        "bytes": total,
        "sha256sum_s": sha,
        "sign_s": sign,
        "verify_s": verify,
        "stock_sign_s": stock_sign,
        "stock_verify_s": stock_verify,
        "sha256sum_MBps": mbps(sha, size),
        "sign_MBps": mbps(sign),
        "verify_MBps": mbps(verify),
        "stock_sign_MBps": mbps(stock_sign),
        "stock_verify_MBps": mbps(stock_verify),
    }
    row["sign_vs_sha256sum"] = row["sign_MBps"] / row["sha256sum_MBps"]
    row["verify_vs_sha256sum"] = row["verify_MBps"] / row["sha256sum_MBps"]
    return row


def bench_publish(size_mb: int, *, work: Path, repeats: int) -> dict[str, Any]:
    """Publish distinct adapters of ``size_mb`` to a real local mlflow server."""
    from registry.lifecycle import SigningKey, publish
    from registry.mlflow_store import MlflowStore
    from server.harness.mlflow_server import MlflowServer

    keys = generate_keypair(work / "pkeys")
    times: list[float] = []
    with MlflowServer(work / "mlflow") as server:
        store = MlflowStore(server.uri)
        for i in range(repeats + 1):  # the first publish also creates the experiment + index
            source = _source(work / f"adapter-{i}", size_mb << 20)
            start = time.perf_counter()
            publish(store, source, model="bench", key=SigningKey(keys.private_path))
            times.append(time.perf_counter() - start)
    return {
        "size_mb": size_mb,
        "first_publish_s": times[0],
        "publish_s_median": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "publish_s_all": times,
        "target_s": 2.0,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['size_mb']} MB" for r in rows]
    series = ["sha256sum_MBps", "sign_MBps", "verify_MBps", "stock_sign_MBps", "stock_verify_MBps"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.16
    for i, key in enumerate(series):
        ax.bar([x + i * width for x in range(len(rows))], [r[key] for r in rows], width,
               label=key.removesuffix("_MBps"))  # fmt: skip
    ax.set_xticks([x + 2 * width for x in range(len(rows))], labels)
    ax.set_ylabel("MB/s (higher is better)")
    ax.set_title("Signing and verification throughput vs sha256sum")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 100, 1024])
    p.add_argument("--publish-mb", type=int, default=10, help="0 skips the publish benchmark")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "bench-out")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-signing-") as tmp:
        for size in args.sizes_mb:
            console.print(f"signing {size} MB …")
            rows.append(bench_size(size, work=Path(tmp) / f"s{size}", repeats=args.repeats))
        publish_row = None
        if args.publish_mb > 0:
            console.print(f"publishing {args.publish_mb} MB adapters to a local mlflow server …")
            publish_row = bench_publish(
                args.publish_mb, work=Path(tmp) / "publish", repeats=args.repeats
            )
    result = {
        "benchmark": "signing",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "target": {"sign_and_verify_vs_sha256sum": 0.8, "publish_10mb_s": 2.0},
        "sizes": rows,
        "publish": publish_row,
    }
    (args.out / "signing.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out / "signing.png")
    columns = ("size", "sha256sum MB/s", "sign MB/s", "verify MB/s", "stock sign MB/s",
               "stock verify MB/s", "sign/sha", "verify/sha")  # fmt: skip
    table = Table(*columns)
    for r in rows:
        table.add_row(
            f"{r['size_mb']} MB", f"{r['sha256sum_MBps']:.0f}", f"{r['sign_MBps']:.0f}",
            f"{r['verify_MBps']:.0f}", f"{r['stock_sign_MBps']:.0f}",
            f"{r['stock_verify_MBps']:.0f}", f"{r['sign_vs_sha256sum']:.2f}",
            f"{r['verify_vs_sha256sum']:.2f}",
        )  # fmt: skip
    Console().print(table)
    if publish_row:
        Console().print(
            f"publish {publish_row['size_mb']} MB: median {publish_row['publish_s_median']:.2f} s "
            f"(first {publish_row['first_publish_s']:.2f} s; target ≤ 2 s)"
        )
    console.print(f"wrote {args.out / 'signing.json'} and {args.out / 'signing.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
