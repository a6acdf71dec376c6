"""The ``fedlora`` command: argparse and dispatch, one subcommand per role.

``train`` and ``demo`` are defined here; other roles register their subcommands through
the ``fedlora.commands`` entry-point group in pyproject.toml (each entry is a function that
adds a subparser), so this package never imports their code. The work itself lives in
library modules (server/train.py, server/demo.py). Errors print one line to stderr and
exit non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape

from clients.task.data import TASKS
from clients.task.errors import FedloraError
from clients.task.interrupt import Terminated, terminate_as_interrupt
from server.console import console, quiet_libraries, round_table

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports `kill PID`
# After Ctrl-C or SIGTERM, how long the process waits for threads libraries left running.
THREAD_GRACE_SECONDS = 3.0


def cmd_train(args: argparse.Namespace) -> int:
    from server.checkpoint import CheckpointStore, outputs_complete
    from server.run_config import parse_overrides
    from server.train import run_train

    overrides = parse_overrides(args.set or [])
    out = Path(args.out).expanduser()  # where the run writes (--out=~/x reaches us as typed)
    try:
        with terminate_as_interrupt():  # SIGTERM stops the run as Ctrl-C does
            result = run_train(
                sites_dir=Path(args.sites),
                rounds=args.rounds,
                out=out,
                eval_file=Path(args.eval) if args.eval else None,
                task=args.task,
                overrides=overrides,
                resume=args.resume,
                verbose=args.verbose,
            )
    except KeyboardInterrupt as exc:
        stopped = type(exc)  # Terminated (SIGTERM) or KeyboardInterrupt (Ctrl-C)
        # Read once the round loop has stopped: no later round is checkpointed.
        store = CheckpointStore(out / "checkpoint")
        try:
            done, run_id = store.newest()
        except FedloraError as error:  # still an interruption, not an error
            raise stopped(str(error)) from None
        if outputs_complete(out, completed_round=done, run_id=run_id):  # a publish?
            command = _publish_command(overrides, out)
            publish = f"; if it was publishing, `{command}` finishes that" if command else ""
            raise stopped(f"the run's outputs in {out} are complete{publish}") from None
        if done >= args.rounds:  # stopped while writing the outputs, after the last round
            raise stopped(
                f"{store.directory} holds all {done} rounds; the run was writing its outputs "
                f"({out / 'adapter'}, metrics.json, the MLflow run); run the same command "
                "with --resume to finish them (no round runs again)"
            ) from None
        if not done:
            raise stopped("before round 1 ended; nothing was checkpointed") from None
        raise stopped(
            f"{store.directory} holds round {done} of {args.rounds}; run the same command "
            "with --resume to continue"
        ) from None
    shown = Console()
    if result.outputs_only:
        shown.print(
            f"no round left to run: {out / 'checkpoint'} holds the last one; wrote the "
            "run's outputs from it"
        )
    shown.print(round_table(result.history))
    shown.print(f"adapter: {result.adapter_dir}")
    shown.print(f"metrics: {result.metrics_path}")
    shown.print(f"MLflow:  {result.tracking_uri} (run {result.run_id})", soft_wrap=True)
    return 0


def _publish_command(overrides: dict[str, Any], out: Path) -> str | None:
    """The publish command of a run with these ``--set`` overrides; None where the run does
    not publish, or its key file is gone."""
    from server.app import publish_command
    from server.run_config import read_config
    from server.settings import PublishSettings
    from server.tracking import resolve_tracking_uri

    try:  # the values the run accepted when it started
        values = read_config(overrides)
        publish = PublishSettings.from_values(values)
    except FedloraError:
        return None
    if publish is None:
        return None
    uri = resolve_tracking_uri(values["tracking-uri"], out)
    return publish_command(out, publish, tracking_uri=uri)


def cmd_demo(args: argparse.Namespace) -> int:
    from server.demo import run_demo

    with terminate_as_interrupt():  # SIGTERM stops the demo as Ctrl-C does
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


def cmd_federation_init(args: argparse.Namespace) -> int:
    from server.federation import init_federation, shell

    fed = init_federation(Path(args.dir), address=args.address, sans=args.san or [])
    out = Console()
    out.print(
        f"federation in {fed.directory} (CA, SuperLink certificate for {', '.join(fed.sans)})"
    )
    out.print(f"keep {fed.ca_key} offline; sites need only {fed.ca_cert}")
    out.print("start the SuperLink (TLS and SuperNode authentication):")
    out.print(f"  {shell(fed.superlink_command())}", soft_wrap=True, highlight=False)
    out.print(f"then enroll each site: fedlora federation enroll SITE --federation {fed.directory}")
    return 0


def cmd_federation_enroll(args: argparse.Namespace) -> int:
    from server.federation import Federation, shell

    fed = Federation.load(Path(args.federation))
    with terminate_as_interrupt():  # SIGTERM mid-register still says what to finish
        entry = fed.enroll(args.site, public_key=Path(args.public_key) if args.public_key else None)
    site_dir = fed.site_dir(args.site)
    out = Console()
    out.print(f"site {args.site} enrolled as node {entry.node_id} (key {entry.public_key})")
    # A node.key here is the enrolled key's (enroll refuses a --public-key that is not its
    # public key), also when a kept key pair is enrolled with --public-key node.pub.
    made_here = (site_dir / "node.key").exists()
    key = "node.key" if made_here else "YOUR-PRIVATE-KEY"
    if made_here:
        out.print(f"give the site {site_dir / 'node.key'} (0600, secret) and {fed.ca_cert}")
    command = fed.supernode_command(args.site, key_path=key, ca_path="ca.pem")
    out.print("on the site:", highlight=False)
    out.print(f"  {shell(command)}", soft_wrap=True, highlight=False)
    return 0


def cmd_federation_sites(args: argparse.Namespace) -> int:
    import json

    from server.federation import Federation

    rows = Federation.load(Path(args.federation)).sites()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="sites")
    for col in ("site", "node id", "key", "status"):
        table.add_column(col)
    for row in rows:
        cells = (row["site"] or "-", str(row["node-id"]), row["public-key"], row["status"])
        table.add_row(*(escape(cell) for cell in cells))
    shown = Console()
    shown.print(table)
    for row in rows:  # whole lines, to copy: a table cell would wrap them
        if row["finish"]:
            shown.print(
                f"node {row['node-id']}: finish its revoke with: {row['finish']}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
    return 0


def cmd_federation_revoke(args: argparse.Namespace) -> int:
    from server.federation import Federation

    with terminate_as_interrupt():  # SIGTERM mid-unregister still names the command left
        node = Federation.load(Path(args.federation)).revoke(args.site)
    Console().print(f"site {args.site} revoked: node {node} unregistered and off the roster")
    return 0


def cmd_federation_local(args: argparse.Namespace) -> int:
    import os

    from server.local import progress_line, run_local
    from server.run_config import parse_overrides

    def show(line: str) -> None:
        shown = progress_line(line)
        if shown is not None:
            console.print(shown, highlight=False, markup=False)

    pool = (os.cpu_count() or 1) if args.worker_pool is None else args.worker_pool or None
    # SIGTERM (a service manager, `kill`) unwinds like Ctrl-C, so every process is
    # stopped; the CLI then says "terminated" and exits 143 (Ctrl-C: 130).
    with terminate_as_interrupt():
        result = run_local(
            sites_dir=Path(args.sites),
            rounds=args.rounds,
            out=Path(args.out),
            insecure=args.insecure,
            overrides=parse_overrides(args.set or []),
            workers=not args.cold,
            worker_pool=pool,
            on_line=show,
        )
    out = Console()
    out.print(round_table(result.history))
    security = "TLS + SuperNode authentication + roster" if result.secure else "INSECURE"
    out.print(f"deployment: {security}; Flower run {result.flower_run_id}")
    out.print(f"adapter: {result.adapter_dir}")
    out.print(f"metrics: {result.metrics_path}")
    out.print(f"MLflow:  {result.tracking_uri} (run {result.run_id})", soft_wrap=True)
    return 0


def _federation_group(sub: argparse._SubParsersAction) -> None:
    fed = sub.add_parser(
        "federation", help="PKI, enrolment and a local rehearsal of a Flower deployment"
    )
    commands = fed.add_subparsers(dest="federation_command", required=True, metavar="COMMAND")
    default_dir = "fedlora-federation"

    init = commands.add_parser(
        "init",
        help="make the federation's CA and SuperLink certificate; print the SuperLink command",
    )
    init.add_argument("dir", metavar="DIR", help="directory to create (mode 0700)")
    init.add_argument(
        "--address",
        required=True,
        metavar="HOST:PORT",
        help="where sites reach the SuperLink (no default); HOST goes into the certificate",
    )
    init.add_argument(
        "--san",
        action="append",
        metavar="NAME",
        help="another host name or IP address of the SuperLink (repeatable; default: none)",
    )
    init.set_defaults(func=cmd_federation_init)

    def federation_dir(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--federation",
            default=default_dir,
            metavar="DIR",
            help="the federation directory (default: %(default)s)",
        )

    enroll = commands.add_parser(
        "enroll", help="register a site's key with the SuperLink and put it on the roster"
    )
    enroll.add_argument("site", metavar="SITE-ID", help="the site's id in the run's records")
    federation_dir(enroll)
    enroll.add_argument(
        "--public-key",
        metavar="FILE",
        help="the site's own OpenSSH EC public key (default: make a key pair here)",
    )
    enroll.set_defaults(func=cmd_federation_enroll)

    sites = commands.add_parser(
        "sites", help="list enrolled sites and every node the SuperLink knows"
    )
    federation_dir(sites)
    sites.add_argument("--json", action="store_true", help="machine-readable (default: a table)")
    sites.set_defaults(func=cmd_federation_sites)

    revoke = commands.add_parser(
        "revoke", help="unregister a site's node and take it off the roster"
    )
    revoke.add_argument("site", metavar="SITE-ID", help="the site to revoke")
    federation_dir(revoke)
    revoke.set_defaults(func=cmd_federation_revoke)

    local = commands.add_parser(
        "local",
        help="run a real SuperLink and one SuperNode per site file on 127.0.0.1",
        description="Rehearse a deployment: a real flower-superlink and one flower-supernode "
        "(plus a warm site worker) per site file, TLS and SuperNode authentication by "
        "default, the app submitted with flwr run. Writes OUT/adapter, OUT/metrics.json and "
        "an MLflow run like `fedlora train`; stops every process it started.",
    )
    local.add_argument("--sites", required=True, metavar="DIR", help="one data file per site")
    local.add_argument("--rounds", type=int, required=True, help="training rounds")
    local.add_argument("--out", required=True, metavar="DIR", help="output directory")
    local.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS, no SuperNode authentication, no roster: a trusted rehearsal only "
        "(default: secure)",
    )
    local.add_argument(
        "--cold",
        action="store_true",
        help="no warm site workers: every message loads the model anew (default: warm)",
    )
    local.add_argument(
        "--worker-pool",
        type=int,
        metavar="N",
        help="N warm workers shared by the sites, so at most N load a model or train at "
        "once on this machine; 0: one per site (default: the number of CPU cores)",
    )
    local.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a run config key (repeatable; keys in README)",
    )
    local.set_defaults(func=cmd_federation_local)


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
        help="output directory: new, empty, or an earlier demo's, whose output a re-run "
        "replaces (default: %(default)s)",
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

    _federation_group(sub)

    for entry in sorted(entry_points(group="fedlora.commands"), key=lambda e: e.name):
        entry.load()(sub)
    return parser


def _interrupted_exit(code: int) -> NoReturn:
    """Leave the process with ``code`` at once, without the interpreter's shutdown.

    After Ctrl-C or SIGTERM, libraries' threads are still running. Flower's simulation
    workers can stay blocked for good in ``ray.get`` on a Ray that has been shut down, and
    the interpreter waits for every non-daemon thread before it exits: a process that said
    "interrupted" would hang. Daemon threads (Ray's, an abandoned round loop importing or
    computing) may be inside C code while the interpreter tears its modules down under
    them, which crashed the process (SIGSEGV) after it had said "terminated". fedlora's own
    work has ended by now (the round loop and its checkpoint, the MLflow run marked), so
    the process gives non-daemon threads `THREAD_GRACE_SECONDS` to end, flushes its
    output and leaves with ``os._exit``.
    """
    deadline = time.monotonic() + THREAD_GRACE_SECONDS
    me = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not me and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries(
        verbose=getattr(args, "verbose", False), timestamps=getattr(args, "log_timestamps", False)
    )
    try:
        return int(args.func(args) or 0)
    except FedloraError as exc:
        if args.debug:
            raise
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        reason = f": {escape(str(exc))}" if str(exc) else ""
        word = "terminated" if terminated else "interrupted"
        console.print(f"[red]{word}[/red]{reason}", highlight=False)
        _interrupted_exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)
    except Exception as exc:
        if args.debug:
            raise
        console.print(
            f"[red]error:[/red] {type(exc).__name__}: {escape(str(exc))}", highlight=False
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
