"""Site-side subcommands: ``fedlora site check``, ``fedlora site budget``, ``fedlora data split``.

``server.cli`` finds `site_group` and `data_group` through the ``fedlora.commands`` entry
points; each adds its parser and sets ``func``, which returns the exit code. Both commands
stay CPU-cheap: nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from clients.site.ledger import budget_report
from clients.task.choices import DEFAULT_BASE, MIN_MAX_LENGTH
from clients.task.data import TASKS, BadRow, DataReport, scan_file, text_lines
from clients.task.errors import ConfigError
from clients.task.labels import (
    check_label,
    format_label_set,
    parse_label_set,
    run_config_arg,
    run_config_line,
)
from clients.task.text import short

EXIT_OK = 0
EXIT_INVALID = 1  # the data has problems; usage errors exit 2 through server.cli

CLINC150_HOWTO = """\
CLINC150 (data_full.json: {"train": [[text, intent], ...], "oos_train": ..., ...};
domains.json: {domain: [intent, ...]}) is not flat; this writes its train split as JSONL
with text, label (the intent) and domain columns (out-of-scope rows get domain "oos"):

  python -c "import json; d = json.load(open('data_full.json'));
  dom = {i: k for k, v in json.load(open('domains.json')).items() for i in v};
  [print(json.dumps({'text': t, 'label': l, 'domain': dom.get(l, 'oos')}))
   for t, l in d['train']]" > clinc150-train.jsonl

then: fedlora data split clinc150-train.jsonl --sites 5 --by domain --out sites
"""


def site_group(sub: argparse._SubParsersAction) -> None:
    site = sub.add_parser("site", help="site admin tools")
    commands = site.add_subparsers(dest="site_command", required=True, metavar="SITE_COMMAND")

    check = commands.add_parser(
        "check",
        help="validate a site data file and summarise it",
        description="Validate a site data file: every problem with its line number, label "
        "counts and text lengths. Exit 0 if the file is valid, 1 if it has problems, 2 for "
        "a usage error (missing file, unsupported suffix or task).",
    )
    check.add_argument("--data", required=True, metavar="FILE", help="the .jsonl or .csv file")
    check.add_argument(
        "--task", required=True, metavar="{" + ",".join(TASKS) + "}", help="the run's task"
    )
    label_set = check.add_mutually_exclusive_group()
    label_set.add_argument(
        "--labels",
        help='the run\'s label set, as in the run config: a TOML array (\'["a", "b, c"]\') '
        "or comma-separated (default: any label)",
    )
    label_set.add_argument(
        "--labels-file",
        metavar="FILE",
        help="the label set, one label per line, exactly as written (default: any label)",
    )
    check.add_argument(
        "--base-model",
        default=DEFAULT_BASE,
        metavar="MODEL",
        help="causal-lm: the run's base model, whose tokenizer counts the rows whose prompt "
        "fills --max-length (default: %(default)s)",
    )
    check.add_argument(
        "--max-length",
        type=int,
        default=64,
        metavar="TOKENS",
        help=f"causal-lm: the run's max-length, >= {MIN_MAX_LENGTH} and at most the tokens "
        "--base-model takes (default: %(default)s)",
    )
    check.add_argument("--json", action="store_true", help="print a machine-readable report")
    check.set_defaults(func=cmd_site_check)

    budget = commands.add_parser(
        "budget",
        help="show the site's spent and remaining privacy budget, or re-initialise it",
        description="Read the site's privacy ledger (STATE/privacy-ledger.json) and show the "
        "sample-level ε spent per run and in total, and what remains of max-epsilon. "
        "With --reset, write a new ledger instead: a site with max-epsilon refuses to "
        "train until its ledger exists, so this is how a new site starts and how a lost "
        "ledger is replaced; the reset, its reason and what the old ledger held are "
        "recorded in the new one.",
    )
    budget.add_argument("--state", required=True, metavar="DIR", help="the site's state-dir")
    budget.add_argument(
        "--max-epsilon",
        type=float,
        metavar="EPS",
        help="the budget to compare with (default: the one the site last trained under)",
    )
    budget.add_argument("--json", action="store_true", help="print a machine-readable report")
    budget.add_argument(
        "--reset",
        action="store_true",
        help="re-initialise the ledger (needs --reason; default: only show it)",
    )
    budget.add_argument("--reason", help="why the ledger is reset (recorded; needed by --reset)")
    budget.add_argument(
        "--spent",
        type=float,
        default=0.0,
        metavar="EPS",
        help="ε already spent that the new ledger starts from (default %(default)s)",
    )
    budget.set_defaults(func=cmd_site_budget)

    worker = commands.add_parser(
        "worker",
        help="run the site's warm worker (keeps model and data loaded between rounds)",
        description="Serve the site's training and evaluation on a Unix socket that only this "
        "user can open (its directory is made 0700, the socket 0600, and each peer's uid is "
        "checked). Name the socket in the SuperNode's node config as worker-socket=PATH; "
        "ClientApps then hand their work to this process instead of loading torch and the "
        "model for every message. Runs until interrupted.",
    )
    worker.add_argument(
        "--socket", required=True, metavar="PATH", help="the socket to create (no default)"
    )
    worker.set_defaults(func=cmd_site_worker)


def cmd_site_worker(args: argparse.Namespace) -> int:
    import contextlib
    import logging
    import signal

    from clients.site.worker import serve

    # A service's log: fedlora's own INFO lines (per round: examples, steps, loss, ε charged)
    # with their time. The CLI has already set up the root handler (server/console.py), so
    # basicConfig would do nothing; library chatter stays filtered unless --verbose.
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    # SIGTERM (a service manager's stop) ends the loop like Ctrl-C, so the socket is removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        serve(Path(args.socket).expanduser())
    return EXIT_OK


def data_group(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data preparation tools")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    split = commands.add_parser(
        "split",
        help="split one labelled file into per-site files",
        description="Split a labelled JSONL or CSV file into OUT/site-01.jsonl … "
        "site-NN.jsonl, every row to exactly one site and all columns kept: by Dirichlet "
        "label skew (--alpha; small is skewed, large is near IID) or by a group column "
        "(--by; each value wholly to one site). Deterministic for a --seed.",
        epilog=CLINC150_HOWTO,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    split.add_argument("src", metavar="SRC", help="the labelled .jsonl or .csv file")
    split.add_argument("--sites", type=int, required=True, metavar="N", help="number of sites")
    how = split.add_mutually_exclusive_group(required=True)
    how.add_argument("--alpha", type=float, metavar="A", help="Dirichlet concentration, > 0")
    how.add_argument("--by", metavar="COLUMN", help="column whose values stay together")
    split.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    split.add_argument(
        "--seed", type=int, default=0, help="seed of the Dirichlet draws (default: %(default)s)"
    )
    split.add_argument(
        "--label-column", default="label", help="label column (default: %(default)s)"
    )
    split.add_argument(
        "--force", action="store_true", help="replace OUT if it holds an earlier split"
    )
    split.add_argument(
        "--min-per-site",
        type=int,
        default=1,
        metavar="K",
        help="fewest rows a site may get (default: %(default)s)",
    )
    split.set_defaults(func=cmd_data_split)


# --- site check -------------------------------------------------------------------------


def read_labels(labels: str | None, labels_file: str | None) -> list[str] | None:
    """The label set from ``--labels`` (the run config's forms) or ``--labels-file`` (one
    label a line, exactly as written; blank lines skipped); None if neither.

    Raises:
        ConfigError: If the file is missing or a line of it does not decode (naming the
            line), or the set is empty, malformed or has duplicates.
    """
    if labels is None and labels_file is None:
        return None
    if labels_file is not None:
        found = parse_label_set(_read_labels_file(labels_file), key="--labels-file")
        flag = "--labels-file"
    else:
        assert labels is not None
        found = parse_label_set(labels, key="--labels")
        flag = "--labels"
    if not found:
        raise ConfigError(f"{flag} gives no labels")
    return list(found)


def _read_labels_file(labels_file: str) -> list[str]:
    """The labels a ``--labels-file`` holds, one a line; the file is decoded as data files
    are (`text_lines`: a UTF-8 or UTF-16 byte-order mark, CRLF or CR line ends).

    Raises:
        ConfigError: If the file is missing, or naming its line if a line does not decode
            or is no label.
    """
    path = Path(labels_file)
    if not path.is_file():
        raise ConfigError(f"--labels-file {labels_file!r} does not exist")
    labels = []
    for lineno, line in text_lines(path):
        where = f"--labels-file {labels_file}:{lineno}"
        if isinstance(line, BadRow):
            raise ConfigError(f"{where}: {line.reason}")
        if not line.strip():
            continue
        try:
            labels.append(check_label(line))
        except ValueError as exc:
            raise ConfigError(f"{where}: label {short(line)} {exc}") from None
    return labels


def report_json(
    report: DataReport, labels: list[str] | None, truncated: list[int] | None = None
) -> dict[str, Any]:
    """The report as plain data, for ``--json``."""
    out = {
        "path": str(report.path),
        "task": report.task,
        "valid": not report.problems,
        "good_rows": len(report.examples),
        "label_counts": _label_counts(report, labels),
        "length_chars": report.length_stats,
        "problems": list(report.problems),
    }
    if truncated is not None:
        out["truncated_rows"] = truncated
    if report.task == "sequence-classification" and (run_labels := _run_labels(report, labels)):
        out["run_config"] = {
            "labels": format_label_set(run_labels),
            "line": run_config_line(run_labels),
            "flwr_run_config": run_config_arg(run_labels),
        }
    return out


def _run_labels(report: DataReport, labels: list[str] | None) -> list[str]:
    """The label set to put in the run config: the one given, else this file's labels."""
    return list(labels) if labels is not None else list(report.label_counts)


def _label_counts(report: DataReport, labels: list[str] | None) -> dict[str, int]:
    """Counts per label; labels of the run's set missing from the file show as 0."""
    if report.task != "sequence-classification":
        return {}
    counts = dict.fromkeys(labels or [], 0)
    counts.update(report.label_counts)
    return counts


def cmd_site_check(args: argparse.Namespace) -> int:
    if args.max_length < MIN_MAX_LENGTH:  # what training refuses (clients/task/plan.py)
        raise ConfigError(f"--max-length={args.max_length} must be >= {MIN_MAX_LENGTH}")
    labels = read_labels(args.labels, args.labels_file)
    if labels is not None and args.task != "sequence-classification":
        raise ConfigError("--labels and --labels-file apply to sequence-classification only")
    report = scan_file(Path(args.data), task=args.task, labels=labels)
    truncated = None
    if args.task == "causal-lm" and report.examples:
        from clients.task.model import check_max_length  # transformers: not for other checks

        check_max_length(args.max_length, base=args.base_model)  # as training refuses it
        truncated = truncated_lines(report, base=args.base_model, max_length=args.max_length)
        if len(truncated) == len(report.examples):
            report.problems.append(
                f"{report.path.name}: every row's prompt fills max-length={args.max_length} "
                "tokens; training would have nothing to learn"
            )
    if args.json:
        # ASCII JSON: a label may hold characters (lone surrogates aside) a terminal mangles.
        print(json.dumps(report_json(report, labels, truncated), indent=2))
    else:
        _print_report(Console(), report, labels)
        if truncated:
            _print_truncated(Console(), truncated, args.max_length)
    return EXIT_INVALID if report.problems else EXIT_OK


def truncated_lines(report: DataReport, *, base: str, max_length: int) -> list[int]:
    """Lines of prompt/response rows whose prompt fills ``max_length`` tokens of the base
    model's tokenizer: training skips them (clients/task/train.py, `response_tokens`)."""
    from transformers import AutoTokenizer

    from clients.task.model import quiet_transformers, resolve_base
    from clients.task.train import response_tokens

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(resolve_base(base))
    return [
        line
        for line, example in zip(report.lines, report.examples, strict=True)
        if response_tokens(tokenizer, example, max_length=max_length) == 0
    ]


def _print_truncated(out: Console, lines: list[int], max_length: int) -> None:
    n = len(lines)
    shown = ", ".join(map(str, lines[:20])) + (" …" if n > 20 else "")
    out.print(
        Text(
            f"{n} row{'s' if n != 1 else ''} whose prompt fills max-length={max_length} "
            f"tokens (lines {shown}): training skips them; shorten the prompts or raise "
            "max-length",
            style="yellow",
        ),
        soft_wrap=True,
    )


def _print_report(out: Console, report: DataReport, labels: list[str] | None) -> None:
    summary = Table(title=Text(f"site check: {report.path}"), show_header=False)
    summary.add_column("field")
    summary.add_column("value", justify="right")
    summary.add_row("task", report.task)
    summary.add_row("good rows", str(len(report.examples)))
    summary.add_row("problems", str(len(report.problems)))
    for name, value in report.length_stats.items():
        summary.add_row(f"{name} length (chars)", f"{value:g}")
    out.print(summary)

    counts = _label_counts(report, labels)
    if counts:
        table = Table(title="labels")
        table.add_column("label")
        table.add_column("rows", justify="right")
        for label, n in counts.items():
            table.add_row(Text(label), str(n))
        out.print(table)

    if report.task == "sequence-classification" and (run_labels := _run_labels(report, labels)):
        # Printed whole (soft_wrap), so the lines can be pasted as they are.
        whose = "the run's" if labels is not None else "this file's"
        out.print(
            Text(f"label set for the run config ({whose} labels; the run needs every site's):")
        )
        out.print(Text(f"  {run_config_line(run_labels)}"), soft_wrap=True)
        out.print(Text(f"  flwr run … --run-config {run_config_arg(run_labels)}"), soft_wrap=True)

    if report.problems:
        n = len(report.problems)
        out.print(Text(f"{n} problem{'s' if n != 1 else ''}:", style="bold red"))
        for problem in report.problems:  # every one, so a site admin can fix them in a pass
            out.print(Text(problem), soft_wrap=True)
    else:
        out.print(Text("valid", style="bold green"))


# --- site budget ------------------------------------------------------------------------


def cmd_site_budget(args: argparse.Namespace) -> int:
    if args.reset:
        from clients.site.ledger import SiteLedger, check_max_epsilon

        check_max_epsilon(args.max_epsilon)  # every argument checked before the ledger changes
        SiteLedger.reset(Path(args.state), reason=args.reason or "", spent=args.spent)
    elif args.reason is not None or args.spent:
        raise ConfigError("--reason and --spent go with --reset")
    report = budget_report(Path(args.state), args.max_epsilon)
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    table = Table(title=Text(f"privacy budget: {report['ledger']}"))
    table.add_column("run")
    table.add_column("rounds", justify="right")
    table.add_column("ε", justify="right")
    table.add_column("δ", justify="right")
    for run, entry in report["runs"].items():
        table.add_row(
            run, str(len(entry["rounds"])), f"{entry['epsilon']:.4g}", f"{entry['delta']:g}"
        )
    out = Console()
    out.print(table)
    for reset in report["resets"]:  # the site never reads them: any shape is shown, not fatal
        if not isinstance(reset, dict):
            out.print(Text(f"reset (not a record): {reset!r}"))
            continue
        before = reset.get("previous", {})
        was = before.get("state") if isinstance(before, dict) else before
        opening = reset.get("opening_epsilon", 0.0)
        opening = f"{opening:g}" if isinstance(opening, int | float) else repr(opening)
        out.print(
            Text(
                f"reset {reset.get('at')}: {reset.get('reason')!r} (ledger was "
                f"{was}; opening ε {opening})"
            )
        )
    out.print(Text(f"spent ε {report['spent_epsilon']:.4g} (δ {report['spent_delta']:g})"))
    if "warning" in report:
        out.print(Text(f"warning: {report['warning']}", style="bold red"))
    if report["max_epsilon"] is None:
        out.print(Text("no max-epsilon known; pass --max-epsilon to see what remains"))
    else:
        out.print(
            Text(
                f"max-epsilon {report['max_epsilon']:g}, remaining ε "
                f"{report['remaining_epsilon']:.4g}"
            )
        )
    return EXIT_OK


# --- data split -------------------------------------------------------------------------


def cmd_data_split(args: argparse.Namespace) -> int:
    from clients.site.split import SplitSpec, read_rows, site_names, split_rows, write_sites
    from clients.task.interrupt import terminate_as_interrupt

    spec = SplitSpec(
        sites=args.sites,
        alpha=args.alpha,
        by=args.by,
        seed=args.seed,
        label_column=args.label_column,
        min_per_site=args.min_per_site,
    )
    source = read_rows(args.src)
    rows = source.rows
    split = split_rows(rows, spec=spec, places=source.places)
    with terminate_as_interrupt():  # SIGTERM mid-write removes the partial files as Ctrl-C
        paths = write_sites(split.parts, Path(args.out), force=args.force, source=source.path)

    how = f"Dirichlet alpha={spec.alpha}" if spec.by is None else f"by {spec.by!r}"
    table = Table(title=Text(f"{len(rows)} rows split {how} into {args.out}"))
    table.add_column("site")
    table.add_column("rows", justify="right")
    table.add_column("distinct labels", justify="right")
    for name, part in zip(site_names(spec.sites), split.parts, strict=True):
        present = [row[spec.label_column] for row in part if spec.label_column in row]
        distinct = str(len({json.dumps(v, sort_keys=True) for v in present})) if present else "-"
        table.add_row(name, str(len(part)), distinct)
    out = Console()
    out.print(table)
    if split.attempts > 1:
        out.print(
            f"seed {spec.seed} left a site short; used seed {spec.seed + split.attempts - 1}",
            highlight=False,
        )
    out.print(Text(f"wrote {len(paths)} files to {args.out}"))
    return EXIT_OK
