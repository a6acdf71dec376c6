"""The ``fedlora`` command: argparse and dispatch, one subcommand per role.

``train`` and ``demo`` are defined here; other roles register their subcommands through
the ``fedlora.commands`` entry-point group in pyproject.toml (each entry is a function that
adds a subparser), so this package never imports their code. The work itself lives in
library modules (server/train.py, server/demo.py). Errors print one line to stderr and
exit non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from rich.console import Console

from clients.task.data import TASKS
from clients.task.errors import FedloraError
from server.console import console, quiet_libraries, round_table

EXIT_ERROR = 2


def cmd_train(args: argparse.Namespace) -> int:
    from server.run_config import parse_overrides
    from server.train import run_train

    result = run_train(
        sites_dir=Path(args.sites),
        rounds=args.rounds,
        out=Path(args.out),
        eval_file=Path(args.eval) if args.eval else None,
        task=args.task,
        overrides=parse_overrides(args.set or []),
        resume=args.resume,
        verbose=args.verbose,
    )
    out = Console()
    out.print(round_table(result.history))
    out.print(f"adapter: {result.adapter_dir}")
    out.print(f"metrics: {result.metrics_path}")
    out.print(f"MLflow:  {result.tracking_uri} (run {result.run_id})", soft_wrap=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from server.demo import run_demo

    return run_demo(
        out=Path(args.out),
        sites=args.sites,
        rounds=args.rounds,
        seed=args.seed,
        verbose=args.verbose,
    )


def _verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show the libraries' logs and warnings (Flower, Ray, MLflow; default: off)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlora", description="Federated LoRA fine-tuning with signed, versioned adapters."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train an adapter in a local simulation")
    train.add_argument(
        "--sites", required=True, metavar="DIR", help="directory with one data file per site"
    )
    train.add_argument("--rounds", type=int, required=True, help="training rounds")
    train.add_argument("--out", required=True, metavar="DIR", help="output directory")
    train.add_argument(
        "--eval", metavar="FILE", help="held-out file for central evaluation (default: none)"
    )
    train.add_argument(
        "--task",
        choices=TASKS,
        help="the run's task (default: the run config's task, sequence-classification)",
    )
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a run config key (repeatable; keys in README)",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoint (default: off)"
    )
    _verbose_arg(train)
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help="synthetic multi-site demo on the packaged MiniLM")
    demo.add_argument(
        "--out",
        default="fedlora-demo",
        metavar="DIR",
        help="output directory (default: %(default)s)",
    )
    demo.add_argument("--sites", type=int, default=4, help="synthetic sites (default: %(default)s)")
    demo.add_argument(
        "--rounds", type=int, default=5, help="training rounds (default: %(default)s)"
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the data and the run (default: %(default)s)"
    )
    _verbose_arg(demo)
    demo.set_defaults(func=cmd_demo)

    for entry in sorted(entry_points(group="fedlora.commands"), key=lambda e: e.name):
        entry.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries(verbose=getattr(args, "verbose", False))
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
