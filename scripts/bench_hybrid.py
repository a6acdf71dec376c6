"""Benchmark: hybrid routing at the edge (issue 17's goal), JSON + PNG.

A local adapter trained on few CLINC150 rows per intent and an upstream adapter trained on
more rows of the same intents (both LoRA on the default MiniLM base, trained here with
`clients.task.train.train_local`), signed, published to a SQLite MLflow registry and served
by two real ``fedlora edge serve`` processes on 127.0.0.1: the hybrid node serves the
local adapter with ``--upstream`` pointing at the upstream node.

1. The hybrid node runs with ``--escalate-below`` P (default: the node's default). The
   P that CLINC150's validation split would choose (in-process scores of both adapters:
   the smallest escalation share whose accuracy reaches 0.99 × the upstream's) is
   reported beside it.
2. On the test split, one text per request from one sequential client: *local-only*
   (``"residency": "local-only"`` to the hybrid node), *upstream-only* (straight to the
   upstream node) and *hybrid* (the hybrid node as deployed).
3. The sweep of P on the test split: accuracy and share escalated from the local and
   upstream answers of step 2; latency composed per text as the local request's latency
   plus, when escalated, the upstream request's (both on loopback: a real cloud adds its
   round trip). The measured hybrid run checks the composition at the chosen P.

Goal (exit 1 when missed): at the node's P, hybrid accuracy ≥ 0.99 × upstream-only while
escalating ≤ 30 % of requests (test split, measured on the real hybrid node).

    python scripts/bench_hybrid.py            # writes bench-out/hybrid.json and hybrid.png
    python scripts/bench_hybrid.py --quick    # smoke: 8 intents, few rows, 1 epoch
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clients.edge.settings import DEFAULT_ESCALATE_BELOW  # noqa: E402
from clients.task.choices import DEFAULT_BASE  # noqa: E402
from clients.task.data import Example  # noqa: E402
from clients.task.model import (  # noqa: E402
    ModelSpec,
    base_digest,
    build_model,
    quiet_transformers,
    save_adapter,
)
from registry.keys import TrustStore, generate_keypair  # noqa: E402
from registry.lifecycle import SigningKey, promote, publish  # noqa: E402
from registry.mlflow_store import MlflowStore  # noqa: E402
from registry.policy import Policy  # noqa: E402
from server.harness.edge import EdgeNodeProcess  # noqa: E402

console = Console(stderr=True)


def default_data() -> Path:
    """``../shared/data/clinc150`` beside the checkout, or beside the main checkout when
    this is a git worktree (the data set is never copied into the repository)."""
    import subprocess

    here = REPO.parent / "shared" / "data" / "clinc150"
    if here.is_dir():
        return here
    common = subprocess.run(
        ["git", "rev-parse", "--git-common-dir"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    main = (REPO / common).resolve().parent if common else REPO
    return main.parent / "shared" / "data" / "clinc150"


PASSPHRASE = "bench-hybrid"
GOAL_RATIO, GOAL_SHARE = 0.99, 0.30
SWEEP = [round(p / 100, 2) for p in range(5, 100, 5)] + [0.97, 0.99]


def clinc150(data_dir: Path, split: str) -> list[tuple[str, str]]:
    """In-scope ``(text, intent)`` pairs of one CLINC150 split (``data_full.json``)."""
    with (data_dir / "data_full.json").open(encoding="utf-8") as fh:
        return [(text, intent) for text, intent in json.load(fh)[split]]


def per_label(
    rows: Sequence[tuple[str, str]], labels: set[str], n: int, rng: random.Random
) -> list[tuple[str, str]]:
    by_label: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in rows:
        if row[1] in labels:
            by_label[row[1]].append(row)
    return [r for label in sorted(by_label) for r in rng.sample(by_label[label], n)]


def train(
    rows: Sequence[tuple[str, str]], labels: tuple[str, ...], *, epochs: int, seed: int
) -> Any:
    import torch

    from clients.task.plan import TrainPlan
    from clients.task.train import train_local

    spec = ModelSpec(labels=labels, seed=seed)
    loaded = build_model(spec, device="cpu")
    plan = TrainPlan(
        spec=spec,
        base_digest=base_digest(spec.base),
        local_epochs=epochs,
        batch_size=16,
        learning_rate=5e-3,
        max_length=64,
    )
    examples = [Example(text=t, label=label) for t, label in rows]
    train_local(loaded, examples, plan=plan, generator=torch.Generator().manual_seed(seed))
    return loaded


def scores(loaded: Any, texts: Sequence[str]) -> list[dict[str, float]]:
    """Softmax scores of an in-memory adapter, as a node would answer them."""
    import torch

    model, tok, labels = loaded.model.eval(), loaded.tokenizer, loaded.spec.labels
    out: list[dict[str, float]] = []
    with torch.inference_mode():
        for i in range(0, len(texts), 64):
            batch = tok(
                list(texts[i : i + 64]),
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            probs = torch.softmax(model(**batch).logits, dim=-1)  # (batch, labels)
            out += [dict(zip(labels, row.tolist(), strict=True)) for row in probs]
    return out


def training_output(loaded: Any, out: Path, rows: int) -> Path:
    save_adapter(loaded, out / "adapter")
    summary = {
        "rounds": [{"round": 1, "site_ids": ["central"]}],
        "final": {"rows": rows},
        "mlflow_run_id": out.name,
        "privacy": {},
    }
    (out / "metrics.json").write_text(json.dumps(summary))
    return out


def top(prediction: dict[str, float]) -> tuple[str, float]:
    label = max(prediction, key=prediction.__getitem__)
    return label, prediction[label]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def sweep_point(
    p: float, local: list[dict[str, Any]], upstream: list[dict[str, Any]], gold: list[str]
) -> dict[str, Any]:
    """Accuracy, share escalated and composed latency at threshold ``p``."""
    escalate = [row["score"] < p for row in local]
    labels = [
        u["label"] if e else loc["label"]
        for loc, u, e in zip(local, upstream, escalate, strict=True)
    ]
    latency = [
        loc["latency_s"] + (u["latency_s"] if e else 0.0)
        for loc, u, e in zip(local, upstream, escalate, strict=True)
    ]
    return {
        "p": p,
        "accuracy": sum(a == g for a, g in zip(labels, gold, strict=True)) / len(gold),
        "escalated": sum(escalate) / len(escalate),
        "p50_ms": percentile(latency, 0.5) * 1000,
        "p99_ms": percentile(latency, 0.99) * 1000,
    }


def choose_p(
    val_local: list[dict[str, float]], val_up: list[dict[str, float]], gold: list[str]
) -> tuple[float, dict[str, Any]]:
    """The P of the sweep with the least escalation whose validation accuracy reaches
    ``GOAL_RATIO`` × the upstream's (the largest-accuracy P if none does)."""
    local = [{"label": top(s)[0], "score": top(s)[1], "latency_s": 0.0} for s in val_local]
    upstream = [{"label": top(s)[0], "latency_s": 0.0} for s in val_up]
    up_acc = sum(u["label"] == g for u, g in zip(upstream, gold, strict=True)) / len(gold)
    points = [sweep_point(p, local, upstream, gold) for p in SWEEP]
    meeting = [pt for pt in points if pt["accuracy"] >= GOAL_RATIO * up_acc]
    best = (
        min(meeting, key=lambda pt: (pt["escalated"], pt["p"]))
        if meeting
        else max(points, key=lambda pt: pt["accuracy"])
    )
    return best["p"], {"upstream_accuracy": up_acc, "sweep": points}


def ask(client: httpx.Client, url: str, text: str, **extra: Any) -> dict[str, Any]:
    started = time.perf_counter()
    response = client.post(f"{url}/v1/predict", json={"texts": [text]} | extra)
    latency = time.perf_counter() - started
    response.raise_for_status()
    body = response.json()
    label, score = top(body["predictions"][0]["scores"])
    return {
        "label": label,
        "score": score,
        "latency_s": latency,
        "served_by": body.get("served_by"),
        "reason": body.get("reason"),
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(max(1, args.threads))
    quiet_transformers()
    rng = random.Random(args.seed)
    train_rows = clinc150(args.data, "train")
    labels = tuple(sorted(rng.sample(sorted({label for _, label in train_rows}), args.intents)))
    keep = set(labels)
    upstream_rows = per_label(train_rows, keep, args.upstream_per_label, rng)
    local_rows = per_label(upstream_rows, keep, args.local_per_label, rng)  # a subset
    val = per_label(clinc150(args.data, "val"), keep, args.val_per_label, rng)
    test = per_label(clinc150(args.data, "test"), keep, args.test_per_label, rng)
    console.print(
        f"{len(labels)} intents; local {len(local_rows)} rows, upstream "
        f"{len(upstream_rows)} rows; val {len(val)}, test {len(test)}"
    )

    t0 = time.perf_counter()
    local_model = train(local_rows, labels, epochs=args.local_epochs, seed=args.seed)
    upstream_model = train(upstream_rows, labels, epochs=args.upstream_epochs, seed=args.seed)
    train_s = time.perf_counter() - t0
    val_texts, val_gold = [t for t, _ in val], [g for _, g in val]
    val_p, chosen = choose_p(
        scores(local_model, val_texts), scores(upstream_model, val_texts), val_gold
    )
    p = args.escalate_below
    console.print(
        f"trained in {train_s:.0f} s; P the validation split would choose: {val_p}; "
        f"the hybrid node runs with P = {p}"
    )

    pair = generate_keypair(work / "keys", passphrase=PASSPHRASE)
    (work / "trust").mkdir()
    (work / "trust" / "k.pub").write_bytes(pair.public_path.read_bytes())
    key, trust = SigningKey(pair.private_path, PASSPHRASE), TrustStore.load(work / "trust")
    store = MlflowStore(f"sqlite:///{work / 'mlflow.db'}")
    for name, loaded, rows in (
        ("intents", local_model, local_rows),
        ("cloud", upstream_model, upstream_rows),
    ):
        source = training_output(loaded, work / f"train-{name}", len(rows))
        version = publish(store, source, model=name, key=key).version
        promote(store, model=name, version=version, key=key, trust=trust, policy=Policy())
    policy = work / "policy.toml"
    policy.write_text(
        "[models.intents]\nmay_leave = true\n[budget]\nper_key_per_minute = "
        "100000\nper_key_per_day = 1000000\nglobal_per_minute = 100000\n"
        "global_per_day = 1000000\n"
    )

    def node(name: str, model: str, options: Sequence[str] = ()) -> EdgeNodeProcess:
        return EdgeNodeProcess(
            models=[model],
            trust=work / "trust",
            cache=work / name,
            log_path=work / f"{name}.log",
            registry=store.uri,
            poll_seconds=3600,
            options=["--threads", "1", *options],
        )

    upstream = node("upstream", "cloud")
    hybrid = node(
        "hybrid",
        "intents",
        [
            "--upstream",
            upstream.url,
            "--upstream-model",
            "cloud",
            "--escalate-below",
            str(p),
            "--policy",
            str(policy),
        ],
    )
    try:
        # Both start at once (each start waits for its own node): the hybrid node calls
        # its upstream only when a request escalates, and none is sent before both answer.
        with ThreadPoolExecutor(2) as pool:
            for started in [pool.submit(n.start) for n in (upstream, hybrid)]:
                started.result()
        texts, gold = [t for t, _ in test], [g for _, g in test]
        with httpx.Client(timeout=30) as client:
            for _ in range(5):  # warm both nodes up
                ask(client, hybrid.url, texts[0])
            local = [ask(client, hybrid.url, t, residency="local-only") for t in texts]
            remote = [ask(client, upstream.url, t) for t in texts]
            hybrid_run = [ask(client, hybrid.url, t) for t in texts]
    finally:
        hybrid.stop()
        upstream.stop()

    def accuracy(rows: list[dict[str, Any]]) -> float:
        return sum(r["label"] == g for r, g in zip(rows, gold, strict=True)) / len(gold)

    def lat(rows: list[dict[str, Any]]) -> dict[str, float]:
        ms = [r["latency_s"] * 1000 for r in rows]
        return {
            "p50_ms": percentile(ms, 0.5),
            "p99_ms": percentile(ms, 0.99),
            "mean_ms": statistics.fmean(ms),
        }

    measured = {
        "local_only": {"accuracy": accuracy(local), **lat(local)},
        "upstream_only": {"accuracy": accuracy(remote), **lat(remote)},
        "hybrid": {
            "accuracy": accuracy(hybrid_run),
            **lat(hybrid_run),
            "escalated": sum(r["served_by"] == "upstream" for r in hybrid_run) / len(gold),
            "reasons": dict(sorted(_count(r["reason"] for r in hybrid_run).items())),
        },
    }
    sweep = [sweep_point(q, local, remote, gold) for q in sorted({*SWEEP, p})]
    ratio = measured["hybrid"]["accuracy"] / measured["upstream_only"]["accuracy"]
    share = measured["hybrid"]["escalated"]
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "scripts/bench_hybrid.py", *sys.argv[1:]]),
        "machine": {"cpus": _cpus(), "python": platform.python_version()},
        "setup": {
            "intents": len(labels),
            "local_rows": len(local_rows),
            "upstream_rows": len(upstream_rows),
            "val_rows": len(val),
            "test_rows": len(test),
            "local_epochs": args.local_epochs,
            "upstream_epochs": args.upstream_epochs,
            "train_seconds": train_s,
            "base": DEFAULT_BASE,
            "seed": args.seed,
        },
        "chosen_p": p,
        "validation": chosen | {"p": val_p},
        "measured": measured,
        "sweep": sweep,
        "goal": {
            "hybrid_vs_upstream": ratio,
            "escalated": share,
            "target": f"≥ {GOAL_RATIO} × upstream-only accuracy, ≤ {GOAL_SHARE:.0%} escalated",
            "met": ratio >= GOAL_RATIO and share <= GOAL_SHARE,
        },
    }


def _count(items: Any) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for item in items:
        counts[str(item)] += 1
    return counts


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep, measured, p = result["sweep"], result["measured"], result["chosen_p"]
    ps = [pt["p"] for pt in sweep]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(ps, [pt["accuracy"] for pt in sweep], "o-", label="hybrid accuracy")
    left.plot(ps, [pt["escalated"] for pt in sweep], "s-", label="share escalated")
    up, loc = measured["upstream_only"]["accuracy"], measured["local_only"]["accuracy"]
    left.axhline(up, color="tab:green", ls="--", label=f"upstream-only {up:.3f}")
    left.axhline(GOAL_RATIO * up, color="tab:green", ls=":", label="0.99 × upstream-only")
    left.axhline(loc, color="tab:gray", ls="--", label=f"local-only {loc:.3f}")
    left.axhline(GOAL_SHARE, color="tab:red", ls=":", label="30 % escalated")
    left.axvline(p, color="black", lw=0.8)
    left.plot([p], [measured["hybrid"]["accuracy"]], "k*", ms=12, label=f"measured at P={p}")
    left.set(
        xlabel="escalate below P (top score)",
        ylabel="test accuracy / share",
        title="accuracy and escalation vs P",
    )
    left.legend(fontsize=7)
    for key, style in (("p50_ms", "o-"), ("p99_ms", "s-")):
        right.plot(ps, [pt[key] for pt in sweep], style, label=f"hybrid {key[:3]} (composed)")
        for name, color in (("local_only", "tab:gray"), ("upstream_only", "tab:green")):
            right.axhline(
                measured[name][key],
                color=color,
                ls="--" if key == "p50_ms" else ":",
                label=f"{name.replace('_', '-')} {key[:3]}",
            )
        right.plot([p], [measured["hybrid"][key]], "k*", ms=10)
    right.set(
        xlabel="escalate below P",
        ylabel="latency per request (ms)",
        title="latency, one sequential client (★ measured hybrid)",
    )
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(result: dict[str, Any]) -> None:
    table = Table(title=f"hybrid routing, node run at P = {result['chosen_p']}")
    for column in ("P", "accuracy", "escalated", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    for pt in result["sweep"]:
        mark = " *" if pt["p"] == result["chosen_p"] else ""
        table.add_row(
            f"{pt['p']}{mark}",
            f"{pt['accuracy']:.3f}",
            f"{pt['escalated']:.1%}",
            f"{pt['p50_ms']:.1f}",
            f"{pt['p99_ms']:.1f}",
        )
    for name, m in result["measured"].items():
        table.add_row(
            name,
            f"{m['accuracy']:.3f}",
            f"{m['escalated']:.1%}" if "escalated" in m else "",
            f"{m['p50_ms']:.1f}",
            f"{m['p99_ms']:.1f}",
        )
    console.print(table)
    goal = result["goal"]
    console.print(
        f"hybrid / upstream-only accuracy {goal['hybrid_vs_upstream']:.3f}, escalated "
        f"{goal['escalated']:.1%}: goal {'met' if goal['met'] else 'MISSED'}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=default_data(),
        help="CLINC150 folder with data_full.json (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench-out",
        help="where hybrid.json and hybrid.png go (default: %(default)s)",
    )
    for flag, default, what in (
        ("--intents", 20, "CLINC150 intents (a seeded random subset)"),
        ("--local-per-label", 12, "training rows per intent of the local adapter"),
        ("--upstream-per-label", 30, "training rows per intent of the upstream adapter"),
        ("--local-epochs", 6, "epochs of the local adapter"),
        ("--upstream-epochs", 3, "epochs of the upstream adapter"),
        ("--val-per-label", 10, "validation rows per intent (P is chosen on them)"),
        ("--test-per-label", 15, "test rows per intent (reported)"),
        ("--threads", 2, "torch threads for training"),
        ("--seed", 0, "data sample and training seed"),
    ):
        parser.add_argument(flag, type=int, default=default, help=f"{what} (default: %(default)s)")
    parser.add_argument(
        "--escalate-below",
        type=float,
        default=DEFAULT_ESCALATE_BELOW,
        metavar="P",
        help="P of the measured hybrid node (default: the node's default, %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 8 intents, 4/12 rows each, 1-2 epochs, 4 test rows",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.intents, args.local_per_label, args.upstream_per_label = 8, 4, 12
        args.local_epochs, args.upstream_epochs = 2, 1
        args.val_per_label, args.test_per_label = 4, 4
    if not (args.data / "data_full.json").is_file():
        console.print(f"[red]no CLINC150 at {args.data}[/red] (--data DIR)")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-hybrid-") as tmp:
        result = run(args, Path(tmp))
    json_path = args.out / "hybrid.json"
    json_path.write_text(json.dumps(result, indent=2))
    plot(result, args.out / "hybrid.png")
    report(result)
    console.print(f"wrote {json_path} and {args.out / 'hybrid.png'}")
    return 0 if result["goal"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
