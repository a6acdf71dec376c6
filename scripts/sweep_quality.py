"""Fast in-process federated simulator, to compare training methods side by side.

The same maths as a real run, without Flower, Ray or MLflow: one MiniLM in this process
plays every site in turn (load the global adapter, `train_local` with the site's own seeded
generator, read the trainable tensors back), then the run's strategy and server optimiser
(`RunSettings.strategy()`, `RunSettings.server_optimizer`) aggregate, exactly as
server/loop.py does. A configuration is a set of run-config overrides (the keys of
``fedlora train --set``), so what wins here is what a user sets.

Choices are made on the validation split (CLINC150's ``val``, or rows held out of a file);
the test split's accuracy is recorded beside it but must not be used to choose. The
centralized reference trains `train_local` on the union of the sites' training rows for
the same passes, once per data set and centralized setting.

A 2,000-row, 10-site, 5-round configuration takes about a minute on 2 cores (MiniLM, short
texts, ~6 ms per training example); the confirming benchmark is scripts/bench_quality.py.

Usage::

    python scripts/sweep_quality.py --out /tmp/sweep.jsonl \\
        --config fedavg: --config 'slr3:server.learning-rate=3'
    python scripts/sweep_quality.py --data /tmp/supersense.jsonl --per-label 50 ...
    python scripts/sweep_quality.py --summary /tmp/sweep.jsonl      # table of a results file
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_quality as bq


def _generator(seed: int, server_round: int, site: str):
    """The site's generator, derived exactly as clients/site/app.py derives it."""
    import torch

    src = f"{seed}:{server_round}:{site}".encode()
    return torch.Generator().manual_seed(
        int.from_bytes(hashlib.sha256(src).digest()[:8], "big") >> 1
    )


def _examples(rows: Sequence[dict[str, str]]) -> list[Any]:
    from clients.task.data import Example

    return [Example(text=r["text"], label=r["label"]) for r in rows]


def _settings(overrides: dict[str, Any], *, labels: Sequence[str], rounds: int, sites: int):
    from server.settings import RunSettings

    base = {
        "num-server-rounds": rounds,
        "labels": ",".join(labels),
        "min-fit-clients": sites,
        "min-available-clients": sites,
        "out-dir": tempfile.gettempdir(),
    }
    return RunSettings.from_config(base | overrides)


_MODELS: dict[Any, Any] = {}


def _model(spec: Any) -> Any:
    from clients.task.model import build_model, quiet_transformers

    if spec not in _MODELS:
        quiet_transformers()
        _MODELS.clear()  # one model in memory at a time
        _MODELS[spec] = build_model(spec, device="cpu")
    return _MODELS[spec]


def _accuracy(loaded: Any, state: dict, examples: list[Any], max_length: int) -> float:
    from clients.task.model import load_trainable_state
    from clients.task.train import evaluate

    load_trainable_state(loaded.model, state)
    return evaluate(loaded, examples, batch_size=64, max_length=max_length).accuracy


def run_federated(
    overrides: dict[str, Any],
    *,
    sites: list[tuple[str, list[Any]]],
    val: list[Any],
    test: list[Any],
    labels: Sequence[str],
    rounds: int,
) -> dict[str, Any]:
    """One federated run; accuracy on val and test after every round."""
    from clients.task.model import load_trainable_state, trainable_state
    from clients.task.plan import TrainPlan
    from clients.task.train import train_local
    from strategies.strategy import SiteUpdate

    settings = _settings(overrides, labels=labels, rounds=rounds, sites=len(sites))
    loaded = _model(settings.spec)
    from clients.task.model import _seeded_init

    _seeded_init(loaded.model, seed=settings.spec.seed)  # fresh start for every config
    state = trainable_state(loaded.model)
    strategy = settings.bounded(settings.strategy())  # robust.* as the round loop applies it
    optimizer = settings.server_optimizer
    server_state: dict[str, Any] = {}
    history = []
    started = time.perf_counter()
    for server_round in range(1, rounds + 1):
        plan = TrainPlan.from_config(
            settings.plan(server_round).to_config() | strategy.client_config()
        )
        updates = []
        for site, examples in sites:
            load_trainable_state(loaded.model, state)
            result = train_local(
                loaded,
                examples,
                plan=plan,
                generator=_generator(settings.spec.seed, server_round, site),
            )
            updates.append(
                SiteUpdate(
                    site=site,
                    state=trainable_state(loaded.model),
                    num_examples=result.num_examples,
                    metrics={"train-loss": result.loss},
                )
            )
        outcome = strategy.aggregate(server_round, state, updates)
        state, server_state = optimizer.step(
            state,
            outcome.state,
            server_state,
            spread=outcome.spread,
            num_updates=len(outcome.accepted),
        )
        eta = float(server_state["eta"][0]) if "eta" in server_state else None
        history.append(
            {
                "round": server_round,
                "val": _accuracy(loaded, state, val, settings.max_length),
                "test": _accuracy(loaded, state, test, settings.max_length),
                "train_loss": statistics.fmean(u.metrics["train-loss"] for u in updates),
                "eta": eta,
            }
        )
        print(
            f"    round {server_round}: val {history[-1]['val']:.3f} "
            f"test {history[-1]['test']:.3f} loss {history[-1]['train_loss']:.3f} eta {eta}",
            file=sys.stderr,
        )
    return {"history": history, "seconds": time.perf_counter() - started}


def run_centralized(
    overrides: dict[str, Any],
    *,
    union: list[Any],
    val: list[Any],
    test: list[Any],
    labels: Sequence[str],
    passes: int,
) -> dict[str, Any]:
    """`train_local` on the union for `passes` epochs; val and test after every epoch."""
    import torch

    from clients.task.model import _seeded_init, trainable_state
    from clients.task.plan import TrainPlan
    from clients.task.train import train_local

    settings = _settings(overrides, labels=labels, rounds=1, sites=2)
    loaded = _model(settings.spec)
    _seeded_init(loaded.model, seed=settings.spec.seed)
    plan = TrainPlan.from_config(
        settings.plan(1).to_config() | {"local_epochs": passes, "local_steps": 0}
    )
    per_epoch = -(-len(union) // plan.batch_size)
    history: list[dict[str, float]] = []

    def on_step(step: int, total: int) -> None:
        if step % per_epoch and step != total:
            return
        state = trainable_state(loaded.model)
        history.append(
            {
                "round": len(history) + 1,
                "val": _accuracy(loaded, state, val, plan.max_length),
                "test": _accuracy(loaded, state, test, plan.max_length),
            }
        )
        print(f"    epoch {len(history)}: val {history[-1]['val']:.3f}", file=sys.stderr)
        loaded.model.train()

    started = time.perf_counter()
    train_local(
        loaded,
        union,
        plan=plan,
        generator=torch.Generator().manual_seed(settings.spec.seed),
        on_step=on_step,
    )
    return {"history": history, "seconds": time.perf_counter() - started}


def parse_config(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,key=value`` -> (NAME, overrides); values are TOML."""
    from server.run_config import parse_overrides

    name, _, rest = text.partition(":")
    pairs = [p for p in rest.split(",") if p.strip()]
    return name, parse_overrides(pairs)


def summary(path: Path) -> None:
    """Mean (over seeds) best and final val accuracy per data set and config, as ratios."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["data"], row["config"])].append(row)
    for data in sorted({d for d, _ in groups}):
        cen = [
            max(h["val"] for h in r["history"])
            for (d, c), rs in groups.items()
            if d == data and c.startswith("central")
            for r in rs
        ]
        ref = statistics.fmean(cen) if cen else float("nan")
        print(f"\n{data}: centralized best val {ref:.3f}")
        print(f"{'config':34} n  final  best  ratio(final) ratio(best)  min-round-delta")
        for (d, config), rs in sorted(groups.items()):
            if d != data:
                continue
            final = statistics.fmean(r["history"][-1]["val"] for r in rs)
            best = statistics.fmean(max(h["val"] for h in r["history"]) for r in rs)
            drop = min(
                min((b["val"] - a["val"] for a, b in itertools.pairwise(r["history"])), default=0)
                for r in rs
            )
            print(
                f"{config:34} {len(rs)}  {final:.3f}  {best:.3f}  {final / ref:.3f}        "
                f"{best / ref:.3f}        {drop:+.3f}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Compare federated training methods in-process (no Flower/MLflow).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default="clinc150", help="clinc150, or a JSONL/CSV text/label file")
    p.add_argument("--data-dir", type=Path, default=bq.DEFAULT_DATA, help="CLINC150 directory")
    p.add_argument("--max-labels", type=int, default=77, help="random label subset (0: all)")
    p.add_argument("--per-label", type=int, default=0, help="training rows per label cap")
    p.add_argument("--train-rows", type=int, default=2000, help="training rows (random)")
    p.add_argument("--val-rows", type=int, default=1000, help="validation rows")
    p.add_argument("--test-rows", type=int, default=1000, help="test rows")
    p.add_argument("--sites", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--rounds", type=int, default=5, help="rounds (= centralized passes)")
    p.add_argument("--seeds", default="0", help="comma-separated data/model seeds")
    p.add_argument(
        "--config",
        action="append",
        default=[],
        help="NAME:key=value,... federated run config (repeatable; 'NAME:' is defaults)",
    )
    p.add_argument(
        "--central",
        action="append",
        default=[],
        help="NAME:key=value,... centralized run (its lr/batch/max-length), repeatable",
    )
    p.add_argument("--out", type=Path, default=Path("bench-out/sweep_quality.jsonl"))
    p.add_argument("--tag", default="", help="data-set name suffix in the results")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--summary", type=Path, default=None, help="print a results file's table")
    args = p.parse_args(argv)
    if args.summary:
        summary(args.summary)
        return 0

    import torch

    from clients.site.split import SplitSpec, split_rows
    from server.console import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        data = bq.load_data(
            data=args.data,
            data_dir=args.data_dir,
            eval_file=None,
            max_labels=args.max_labels,
            per_label=args.per_label,
            train_rows=args.train_rows,
            test_per_label=0,
            test_rows=args.test_rows,
            val_rows=args.val_rows,
            seed=seed,
        )
        labels = data.labels
        parts = split_rows(
            data.train,
            spec=SplitSpec(sites=args.sites, alpha=args.alpha, seed=seed, min_per_site=10),
        ).parts
        # Each site holds out 10% as the ClientApp does (clients/site/app.py `_data`).
        sites = []
        for i, rows in enumerate(parts):
            site = f"site-{i:02d}"
            order = list(range(len(rows)))
            random.Random(site).shuffle(order)
            keep = order[int(len(rows) * 0.1) :]
            sites.append((site, _examples([rows[j] for j in sorted(keep)])))
        union = [e for _, ex in sites for e in ex]
        val, test = _examples(data.val), _examples(data.test)
        name = data.name + (f"-{args.tag}" if args.tag else "")
        print(
            f"{name} seed {seed}: {len(labels)} labels, {len(union)} training rows over "
            f"{args.sites} sites ({min(len(s) for _, s in sites)}-{max(len(s) for _, s in sites)}"
            f"), val {len(val)}, test {len(test)}",
            file=sys.stderr,
        )
        common = {
            "data": name,
            "seed": seed,
            "sites": args.sites,
            "alpha": args.alpha,
            "rounds": args.rounds,
            "labels": len(labels),
            "train_rows": len(union),
        }
        for text in args.central:
            cname, overrides = parse_config(text)
            print(f"  centralized {cname} {overrides}", file=sys.stderr)
            torch.manual_seed(seed)
            result = run_centralized(
                overrides | {"seed": seed},
                union=union,
                val=val,
                test=test,
                labels=labels,
                passes=args.rounds,
            )
            row = common | {"config": f"central-{cname}", "overrides": overrides} | result
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"    best val {max(h['val'] for h in result['history']):.3f}", file=sys.stderr)
        for text in args.config:
            cname, overrides = parse_config(text)
            print(f"  federated {cname} {overrides}", file=sys.stderr)
            torch.manual_seed(seed)
            result = run_federated(
                overrides | {"seed": seed},
                sites=sites,
                val=val,
                test=test,
                labels=labels,
                rounds=args.rounds,
            )
            row = common | {"config": cname, "overrides": overrides} | result
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
