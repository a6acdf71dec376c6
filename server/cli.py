"""The ``fedlora`` command: one subcommand per role.

``train`` and ``demo`` live here; other roles register their subcommands through the
``fedlora.commands`` entry-point group in pyproject.toml (each entry is a function that
adds a subparser), so this package never imports their code. Errors print one line to
stderr and exit non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from clients.task.data import SUFFIXES, labels_in, load_examples
from clients.task.errors import ConfigError, FedloraError

# soft_wrap: a one-line error stays one line in logs, whatever the terminal width
console = Console(stderr=True, soft_wrap=True)
EXIT_ERROR = 2


def quiet_libraries() -> None:
    """Keep Ray, Flower, MLflow and deprecation chatter out of the user's terminal."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("flwr", "ray", "mlflow", "alembic", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def site_files(sites_dir: Path) -> list[Path]:
    """One site per *.jsonl / *.csv file in a directory, sorted by name."""
    if not sites_dir.is_dir():
        raise ConfigError(f"--sites {str(sites_dir)!r} is not a directory")
    files = sorted(p for p in sites_dir.iterdir() if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"--sites {str(sites_dir)!r} holds no .jsonl or .csv files")
    return files


def build_train_config(
    *,
    sites: Sequence[Path],
    rounds: int,
    out: Path,
    eval_file: Path | None,
    task: str | None,
    overrides: dict[str, Any],
    resume: bool,
) -> dict[str, Any]:
    """Turn CLI arguments into a run config; fills labels and site counts from the files."""
    config = dict(overrides)
    config["num-server-rounds"] = rounds
    config["out-dir"] = str(out)
    config["resume"] = resume
    if eval_file is not None:
        if not eval_file.is_file():
            raise ConfigError(f"--eval {str(eval_file)!r} does not exist")
        config["eval-file"] = str(eval_file)
    if task is not None:
        config["task"] = task
    task_name = config.get("task", "sequence-classification")
    if task_name == "sequence-classification" and not config.get("labels"):
        files = [*sites, *([eval_file] if eval_file else [])]
        config["labels"] = ",".join(labels_in(files))
    config.setdefault("min-available-clients", len(sites))
    config.setdefault("min-fit-clients", min(2, len(sites)))
    return config


def progress_bars() -> Progress:
    """The progress display of fedlora's long work (rounds, epochs): bar, count, status."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    )


def _round_table(history: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="rounds")
    for col in ("round", "accuracy", "loss", "sites", "rejected", "failed", "seconds"):
        table.add_column(col, justify="right")
    for row in history:
        acc = row.get("accuracy")
        loss = row.get("loss")
        table.add_row(
            str(row["round"]),
            "-" if acc is None else f"{acc:.3f}",
            "-" if loss is None else f"{loss:.4f}",
            str(row["sites"]),
            str(row["rejected"]),
            str(row["failed"]),
            f"{row['seconds']:.1f}",
        )
    return table


def run_train(
    *,
    sites_dir: Path,
    rounds: int,
    out: Path,
    eval_file: Path | None = None,
    task: str | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
):
    """Validate everything, then run a local simulation with a progress bar."""
    from server.settings import RunSettings
    from server.simulation import SimSite, simulate

    sites = site_files(sites_dir)
    config = build_train_config(
        sites=sites,
        rounds=rounds,
        out=out,
        eval_file=eval_file,
        task=task,
        overrides=overrides or {},
        resume=resume,
    )
    settings = RunSettings.from_config(config)
    for path in sites:  # a bad site file is refused before anything is written
        load_examples(path, task=settings.spec.task, labels=settings.spec.labels or None)
    with progress_bars() as progress:
        bar = progress.add_task("federated rounds", total=settings.rounds, status="starting")

        def on_round(record) -> None:
            acc = "-" if record.accuracy is None else f"{record.accuracy:.3f}"
            progress.update(
                bar,
                completed=record.round,
                status=f"acc {acc}, {record.sites} sites, {record.rejected} rejected",
            )

        result = simulate(settings, [SimSite(p.stem, p) for p in sites], on_round=on_round)
    return result


def cmd_train(args: argparse.Namespace) -> int:
    from server.settings import parse_overrides

    result = run_train(
        sites_dir=Path(args.sites),
        rounds=args.rounds,
        out=Path(args.out),
        eval_file=Path(args.eval) if args.eval else None,
        task=args.task,
        overrides=parse_overrides(args.set or []),
        resume=args.resume,
    )
    out = Console()
    out.print(_round_table(result.history))
    out.print(f"adapter: {result.adapter_dir}")
    out.print(f"metrics: {result.metrics_path}")
    out.print(f"MLflow:  {result.tracking_uri} (run {result.run_id})", soft_wrap=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from server.demo import run_demo

    return run_demo(out=Path(args.out), sites=args.sites, rounds=args.rounds, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlora", description="Federated LoRA fine-tuning with signed, versioned adapters."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train an adapter in a local simulation")
    train.add_argument("--sites", required=True, help="directory with one data file per site")
    train.add_argument("--rounds", type=int, required=True, help="training rounds")
    train.add_argument("--out", required=True, help="output directory")
    train.add_argument("--eval", help="held-out file for central evaluation")
    train.add_argument("--task", choices=("sequence-classification", "causal-lm"))
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a run config key (repeatable); see README",
    )
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help="synthetic multi-site demo on the packaged MiniLM")
    demo.add_argument("--out", default="fedlora-demo", help="output directory")
    demo.add_argument("--sites", type=int, default=4)
    demo.add_argument("--rounds", type=int, default=5)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    for entry in sorted(entry_points(group="fedlora.commands"), key=lambda e: e.name):
        entry.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except FedloraError as exc:
        if args.debug:
            raise
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return EXIT_ERROR
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130
    except Exception as exc:
        if args.debug:
            raise
        console.print(f"[red]error:[/red] {type(exc).__name__}: {exc}", highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
