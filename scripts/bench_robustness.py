"""Benchmark: how far one hostile site among ten moves the global update, and what the
defence costs honest runs.

Ten sites train the demo's intent classifier (all-MiniLM-L6-v2 + LoRA, server/demo_data.py:
non-IID, Dirichlet α per site) in Flower simulations of fedlora's real ClientApp. In the
attacked runs one site is hostile (tests/hostile_sites.py, ``dominate``): it claims the
largest example count a site may report (10^7) and sends its update flipped and scaled to
just under ``update.max-norm``, the attack of issue 13. Four runs:

=================  ============================  ==================================
run                aggregation                   sites
=================  ============================  ==================================
fedavg-honest      FedAvg (``robust.mode=off``)  ten honest
bounded-honest     bounded influence (default)   ten honest
fedavg-attacked    FedAvg                        nine honest, one hostile
bounded-attacked   bounded influence             nine honest, one hostile
=================  ============================  ==================================

The hostile site's *share* of a round is what the server records
(`strategies.aggregate.contribution_shares`): its ``p_i·‖Δ_i‖`` over the sum of all
accepted sites', with ``p`` the normalised weights the aggregation used, so an average
site holds ``1/n``. Targets (issue 13): in ``bounded-attacked`` the share stays within 2×
the fair share ``1/n`` every round, and ``bounded-honest`` ends within 1 accuracy point of
``fedavg-honest`` (central accuracy on the held-out phrasings of the demo's eval file).

Site files and run outputs live in a temporary directory; only the results JSON and the
PNG are written to ``--out``.

Usage::

    python scripts/bench_robustness.py                      # ~20 min on 2 shared cores
    python scripts/bench_robustness.py --rounds 1 --sites 3 --per-site 16 --tag smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
# The hostile ClientApp lives in tests/hostile_sites.py; Ray's workers inherit PYTHONPATH.
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
)

SHARE_TARGET = 2.0  # times the fair share 1/n
ACCURACY_TOLERANCE = 0.01  # one accuracy point
HOSTILE_EXAMPLES = 10_000_000  # the largest count strategies.validation accepts
RUNS = ("fedavg-honest", "bounded-honest", "fedavg-attacked", "bounded-attacked")
console = Console(stderr=True)


def run(
    name: str,
    *,
    site_paths: Sequence[Path],
    eval_path: Path,
    labels: Sequence[str],
    args: argparse.Namespace,
    work: Path,
) -> dict[str, Any]:
    """One simulation; the hostile site (the last) attacks in the ``-attacked`` runs."""
    from server.settings import RunSettings
    from server.simulation import SimSite, simulate
    from tests.hostile_sites import HOSTILE_APP, HOSTILE_ENV

    hostile = site_paths[-1].stem
    attacked = name.endswith("attacked")
    os.environ[HOSTILE_ENV] = json.dumps(
        {hostile: {"attack": "dominate", "examples": HOSTILE_EXAMPLES, "norm": args.norm}}
        if attacked
        else {}
    )
    settings = RunSettings.from_config(
        {
            "num-server-rounds": args.rounds,
            "labels": ",".join(labels),
            "seed": args.seed,
            "local-steps": args.local_steps,
            "batch-size": args.batch_size,
            "learning-rate": args.learning_rate,
            "max-length": args.max_length,
            "min-fit-clients": len(site_paths),
            "min-available-clients": len(site_paths),
            "fraction-evaluate": 0.0,  # the headline is the central eval file
            "eval-file": str(eval_path),
            "update.max-norm": args.max_norm,
            "robust.mode": "off" if name.startswith("fedavg") else "bounded",
            # The configuration its README numbers were measured with: the model's pooler and
            # sum-head, uniform weights (the 2/(n+1) share bound holds among alike weights),
            # FedAvg's server step.
            "head.pooling": "model",
            "server.learning-rate": 1.0,
            "out-dir": str(work / name),
        }
    )
    started = time.perf_counter()
    result = simulate(
        settings,
        [SimSite(p.stem, p) for p in site_paths],
        client_app=HOSTILE_APP,
        on_round=lambda r: console.print(
            f"  {name} round {r.round}: accuracy {r.accuracy:.3f}, "
            f"{hostile} share {r.shares.get(hostile, 0.0):.3f}, {r.seconds:.0f}s"
        ),
    )
    rounds = [
        {
            "round": row["round"],
            "accuracy": row["accuracy"],
            "sites": row["sites"],
            "hostile_share": row["shares"].get(hostile),
            "hostile_share_x_fair": row["shares"].get(hostile, 0.0) * row["sites"],
            "largest_share": max(row["shares"].values(), default=None),
            "rejected": row["rejected"],
        }
        for row in result.history
    ]
    return {
        "rounds": rounds,
        "final_accuracy": rounds[-1]["accuracy"],
        "max_hostile_share_x_fair": max(r["hostile_share_x_fair"] for r in rounds),
        "wall_seconds": time.perf_counter() - started,
    }


def verdict(results: dict[str, Any]) -> dict[str, Any]:
    """The two targets, checked (None where a run they need was not run)."""
    runs = results["runs"]

    def of(name: str, key: str) -> Any:
        return runs[name][key] if name in runs else None

    share = of("bounded-attacked", "max_hostile_share_x_fair")
    honest = (of("fedavg-honest", "final_accuracy"), of("bounded-honest", "final_accuracy"))
    change = honest[1] - honest[0] if None not in honest else None
    return {
        "bounded_attacked_max_share_x_fair": share,
        "fedavg_attacked_max_share_x_fair": of("fedavg-attacked", "max_hostile_share_x_fair"),
        "share_target_x_fair": SHARE_TARGET,
        "share_on_target": share is not None and share <= SHARE_TARGET,
        "honest_accuracy_fedavg": honest[0],
        "honest_accuracy_bounded": honest[1],
        "honest_accuracy_change": change,
        "accuracy_tolerance": ACCURACY_TOLERANCE,
        # The target guards against the defence costing honest runs accuracy: a loss of
        # more than a point misses it; a gain is reported (``honest_accuracy_change``).
        "accuracy_on_target": change is not None and change >= -ACCURACY_TOLERANCE,
        "attacked_accuracy_fedavg": of("fedavg-attacked", "final_accuracy"),
        "attacked_accuracy_bounded": of("bounded-attacked", "final_accuracy"),
    }


def plot(results: dict[str, Any], path: Path) -> None:
    """Hostile share (× fair) per round, and central accuracy per round, for each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    styles = {
        "fedavg-honest": ("tab:gray", "o", ":"),
        "bounded-honest": ("tab:blue", "o", ":"),
        "fedavg-attacked": ("tab:red", "s", "-"),
        "bounded-attacked": ("tab:green", "s", "-"),
    }
    fig, (share_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("fedavg-attacked", "bounded-attacked"):
        if name not in runs:
            continue
        color, marker, line = styles[name]
        rows = runs[name]["rounds"]
        share_ax.plot(
            [r["round"] for r in rows],
            [r["hostile_share_x_fair"] for r in rows],
            color=color,
            marker=marker,
            linestyle=line,
            label=name,
        )
    share_ax.axhline(SHARE_TARGET, color="black", linestyle="--", label="target: 2× fair share")
    share_ax.axhline(1.0, color="tab:gray", alpha=0.4, label="fair share 1/n")
    share_ax.set(
        xlabel="round",
        ylabel="hostile share of the round's movement, × 1/n",
        yscale="log",
        title="one hostile site among ten",
    )
    share_ax.legend(fontsize=8)
    for name, (color, marker, line) in styles.items():
        if name not in runs:
            continue
        rows = runs[name]["rounds"]
        acc_ax.plot(
            [r["round"] for r in rows],
            [r["accuracy"] for r in rows],
            color=color,
            marker=marker,
            linestyle=line,
            label=f"{name} ({runs[name]['final_accuracy']:.3f})",
        )
    acc_ax.set(xlabel="round", ylabel="central accuracy", ylim=(0, 1), title="accuracy")
    acc_ax.legend(fontsize=8)
    for ax in (share_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.set_xticks([r["round"] for r in next(iter(runs.values()))["rounds"]])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict[str, Any]:
    import torch

    return {
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "note": "shared machine: other jobs ran concurrently, timings are noisy",
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Hostile-site share of the global update and accuracy, with and "
        "without the attacker, FedAvg vs bounded influence.",
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
    p.add_argument("--sites", type=int, default=10, help="sites, the last one hostile")
    p.add_argument("--per-site", type=int, default=48, help="rows per site file")
    p.add_argument("--eval-size", type=int, default=400, help="rows of the central eval file")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew per site")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=0.01)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--max-norm", type=float, default=1000.0, help="update.max-norm")
    p.add_argument(
        "--norm", type=float, default=999.0, help="the hostile update's L2 norm (< max-norm)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--runs",
        default=",".join(RUNS),
        help="comma-separated subset of the four runs (the targets need all four)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the four simulations, write ``bench_robustness[-TAG].json`` and ``.png``; 0 if
    both targets hold."""
    args = build_parser().parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        console.print(f"error: --runs {unknown} not among {', '.join(RUNS)}")
        return 2
    from server.console import quiet_libraries
    from server.demo_data import generate

    quiet_libraries()
    started = time.perf_counter()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedlora-bench-robustness-"))
    site_paths, eval_path, labels = generate(
        work / "data",
        sites=args.sites,
        per_site=args.per_site,
        eval_size=args.eval_size,
        alpha=args.alpha,
        seed=args.seed,
    )
    results: dict[str, Any] = {
        "benchmark": "robustness",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "hostile": {
            "site": site_paths[-1].stem,
            "attack": "dominate: claims 10^7 examples, sends its update flipped and scaled "
            "to --norm",
            "examples": HOSTILE_EXAMPLES,
        },
        "share": "p_i·‖Δ_i‖ / Σ_j p_j·‖Δ_j‖ over the round's accepted sites, as aggregated",
        "runs": {},
    }
    try:
        for name in names:
            console.print(f"[bold]{name}[/bold]")
            results["runs"][name] = run(
                name,
                site_paths=site_paths,
                eval_path=eval_path,
                labels=labels,
                args=args,
                work=work,
            )
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    results["verdict"] = verdict(results)
    results["total_wall_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_robustness" + (f"-{args.tag}" if args.tag else "")
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, json_path.with_suffix(".png"))
    v = results["verdict"]
    console.print(
        f"hostile share × fair: bounded {v['bounded_attacked_max_share_x_fair']}, FedAvg "
        f"{v['fedavg_attacked_max_share_x_fair']} (target ≤ {SHARE_TARGET}); honest "
        f"accuracy: FedAvg {v['honest_accuracy_fedavg']}, bounded "
        f"{v['honest_accuracy_bounded']} (target: at most {ACCURACY_TOLERANCE} lower); attacked "
        f"accuracy: FedAvg {v['attacked_accuracy_fedavg']}, bounded "
        f"{v['attacked_accuracy_bounded']}; {results['total_wall_seconds']:.0f}s; {json_path}"
    )
    return 0 if v["share_on_target"] and v["accuracy_on_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
