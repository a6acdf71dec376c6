"""``fedlora train`` as a library call: a directory of site files to a local simulation.

`run_train` checks the sites' files and the run config before anything is written, then
runs the simulation showing its rounds as they end (server/simulation.py does the run itself).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clients.task.data import SUFFIXES, DataReport, labels_in, not_a_file, scan_file
from clients.task.errors import ConfigError, DataError
from clients.task.labels import format_label_set
from server.console import RoundProgress
from server.run_config import param_value
from strategies.protocol import SITE_ID_RULE, valid_site_id

if TYPE_CHECKING:
    from server.settings import RunSettings

log = logging.getLogger(__name__)

# What a run writes in OUT and replaces there at its end (server/app.py).
RUN_OUTPUTS = ("adapter", "adapter-best", "adapter-last", "metrics.json")


def site_files(sites_dir: Path) -> list[Path]:
    """One site per *.jsonl / *.csv file in a directory, sorted by name.

    A file's stem is its site's id, so it must be a valid one, and no two files may give
    the same id (``a.jsonl`` and ``a.csv``; nor ``A.csv`` and ``a.csv``, one state folder
    on a case-insensitive file system): refused here, before anything starts, rather
    than by the site at its first round or by the server as two nodes claiming one id.

    Only the directory's top level is read: subdirectories (hidden ones aside) are named
    in the error when there is no site file, else in a warning, as are ``.json`` files. A
    file whose suffix is ``.jsonl`` or ``.csv`` in other case (``S2.JSONL``) is refused.

    Raises:
        ConfigError: If `sites_dir` is not a directory, holds no site file or a file whose
            suffix is a site file's in other case, or two site files (or one file's stem)
            do not make distinct valid site ids.
    """
    if not sites_dir.is_dir():
        raise ConfigError(f"--sites {str(sites_dir)!r} is not a directory")
    files = sorted(p for p in sites_dir.iterdir() if p.suffix in SUFFIXES and p.is_file())
    cased = sorted(p.name for p in sites_dir.iterdir()
                   if p.suffix not in SUFFIXES and p.suffix.lower() in SUFFIXES)  # fmt: skip
    if cased:  # read as which format? a site left out without a word is worse
        raise ConfigError(
            f"--sites {str(sites_dir)!r}: {', '.join(map(repr, cased[:5]))} "
            f"{'is' if len(cased) == 1 else 'are'} not read as a site file (the suffix must be "
            "lower-case .jsonl or .csv); rename it"
        )
    near = sorted(p.name for p in sites_dir.iterdir() if p.suffix.lower() == ".json")
    subdirs = sorted(p.name for p in sites_dir.iterdir() if p.is_dir() and p.name[0] != ".")
    shown = ", ".join(repr(name) for name in subdirs[:5]) + (", …" if len(subdirs) > 5 else "")
    if not files:
        hint = f"; subdirectories are not read: {shown}" if subdirs else ""
        raise ConfigError(
            f"--sites {str(sites_dir)!r} holds no .jsonl or .csv files at its top level{hint}"
        )
    if near:
        log.warning(
            "--sites %r: .json files are not sites (a site file is JSON Lines, .jsonl): %s",
            str(sites_dir),
            ", ".join(map(repr, near[:5])),
        )
    if subdirs:
        log.warning(
            "--sites %r: only its top-level .jsonl/.csv files are sites; subdirectories are "
            "not read: %s",
            str(sites_dir),
            shown,
        )
    seen: dict[str, Path] = {}
    for path in files:
        if not valid_site_id(path.stem):
            raise ConfigError(
                f"site file {str(path)!r}: its name without the suffix is the site id, which "
                f"must be {SITE_ID_RULE}"
            )
        other = seen.setdefault(path.stem.casefold(), path)
        if other is not path:
            raise ConfigError(
                f"site files {other.name!r} and {path.name!r} in {str(sites_dir)!r} would both "
                f"be site {path.stem!r}; rename one"
            )
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
) -> tuple[dict[str, Any], list[DataReport] | None]:
    """Turn CLI arguments into a run config; fills labels and site counts from the files.

    Returns:
        The run config, and the site files' reports when the label set was inferred from
        them (every file was then read and found valid: none holds a label outside the
        set); None when the config gave the labels, or the task has none.

    Raises:
        ConfigError: For an ``out`` that cannot be the run's directory, a bad eval file,
            or ``min-available-clients`` or ``min-fit-clients`` above the number of site
            files.
        DataError: For a bad site file read to infer the labels.
    """
    check_out(out)
    _check_flags(overrides, rounds=rounds, out=out, resume=resume, task=task, eval_file=eval_file)
    config = dict(overrides)
    config["num-server-rounds"] = rounds
    config["out-dir"] = str(out)
    config["resume"] = resume
    flag = "--eval"
    if eval_file is None and isinstance(given := config.get("eval-file"), str) and given:
        eval_file, flag = Path(given), "eval-file"  # `--set eval-file=…`: the same checks
    if eval_file is not None:
        if why := not_a_file(eval_file):
            raise ConfigError(f"{flag} {str(eval_file)!r} {why}")
        if site := next((p for p in sites if p.samefile(eval_file)), None):
            raise ConfigError(
                f"{flag} {str(eval_file)!r} is site file {str(site)!r}: the held-out file "
                "must not be one the sites train on; move it out of the --sites directory"
            )
        config["eval-file"] = str(eval_file)
    if task is not None:
        config["task"] = task
    task_name = config.get("task", "sequence-classification")
    labels = config.get("labels")
    reports = None
    if task_name == "sequence-classification" and not labels:
        reports = read_site_files(sites, task=task_name, labels=None)
        labels = sorted({label for report in reports for label in report.label_counts})
        if eval_file is not None:
            labels = _with_eval_labels(labels, eval_file, flag=flag)
    if isinstance(labels, list | tuple):
        # A run config holds flat values (Flower's too): the label set travels as the TOML
        # array string users type (`fedlora site check` prints it); a label may hold commas.
        config["labels"] = format_label_set(labels)
    config.setdefault("min-available-clients", len(sites))
    config.setdefault("min-fit-clients", min(2, len(sites)))
    _check_site_counts(config, sites)
    return config, reports


def check_out(out: Path) -> None:
    """Refuse an ``--out`` the run could not make or write, before anything starts: a
    file (or a link to nothing) at ``out`` or in place of one of its directories, or a
    directory this user cannot write. Found only as the run opened its MLflow store, after
    the model had loaded, it ended in an ``OSError`` naming no option. Also refused: an
    ``out`` holding `RUN_OUTPUTS` no run of it wrote, which the run would replace.

    ``out`` is checked where the run writes it: with ``~`` expanded, as the settings
    expand ``out-dir`` (``--out=~/runs`` reaches the command unexpanded).

    Raises:
        ConfigError: Naming ``--out`` as given and the path in the way.
    """
    given, out = out, out.expanduser()
    where = out.absolute()
    while not where.exists():  # the nearest existing directory, where the run writes first
        if where.is_symlink():  # a dangling link: exists() follows it, mkdir cannot
            raise ConfigError(f"--out {str(given)!r} is {_inside(where, out)}a link to nothing")
        where = where.parent
    if not where.is_dir():
        raise ConfigError(f"--out {str(given)!r} is {_inside(where, out)}a file, not a directory")
    if not os.access(where, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {str(given)!r}: {str(where)!r} is not writable")
    # A run replaces these at its end; one that wrote them left its checkpoint beside them
    # (server/app.py then refuses a new run there, or resumes it). Without one they are
    # someone else's: a user's own adapter/ would be lost after the run's last round.
    if where == out.absolute() and not os.path.lexists(out / "checkpoint"):
        found = [name for name in RUN_OUTPUTS if os.path.lexists(out / name)]
        if found:
            them = "them" if len(found) > 1 else "it"
            raise ConfigError(
                f"--out {str(given)!r} holds {', '.join(found)} but no checkpoint/, so no "
                f"earlier run there wrote {them}, and this run would replace {them}; choose "
                "another --out"
            )


def _check_flags(
    overrides: Mapping[str, Any],
    *,
    rounds: int,
    out: Path,
    resume: bool,
    task: str | None,
    eval_file: Path | None,
) -> None:
    """Refuse a ``--set`` of a key that one of the command's flags sets to another value:
    the flag's value replaces it in the run config, and the run would ignore the ``--set``
    without a word (``--set num-server-rounds=10 --rounds 1`` trained one round).

    Raises:
        ConfigError: Naming the ``--set`` key and value, and the flag.
    """

    def sets(flag: str) -> str:
        return f" disagrees with {flag}, which sets it"

    # key: (why the --set cannot stand, the flag's value)
    flags: dict[str, tuple[str, Any]] = {
        "num-server-rounds": (sets(f"--rounds {rounds}"), rounds),
        "out-dir": (sets(f"--out {str(out)!r}"), out),
        # `federation local` has no such flag: name the one command that does
        "resume": (": a run resumes by fedlora train's --resume flag only", resume),
    }
    if task is not None:
        flags["task"] = (sets(f"--task {task}"), task)
    if eval_file is not None:
        flags["eval-file"] = (sets(f"--eval {str(eval_file)!r}"), eval_file)
    for key, (why, value) in flags.items():
        if key not in overrides:
            continue
        given = overrides[key]
        if isinstance(value, Path):
            same = isinstance(given, str) and _same_path(Path(given), value)
        else:
            same = (type(given), given) == (type(value), value)
        if not same:
            raise ConfigError(f"--set {key}={param_value(given)}{why}; drop the --set")


def _same_path(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


def _inside(where: Path, out: Path) -> str:
    return "" if where == out.absolute() else f"inside {str(where)!r}, "


def _check_site_counts(config: Mapping[str, Any], sites: Sequence[Path]) -> None:
    """Refuse a count of sites above the number of site files (one site each): the run
    would wait ``round-timeout`` for sites that never connect, or fail every round. A
    value of another type is left to `RunSettings`, which names its type.

    Raises:
        ConfigError: Naming the key, its value and the number of site files.
    """
    for key in ("min-available-clients", "min-fit-clients"):
        value = config[key]
        if isinstance(value, int) and not isinstance(value, bool) and value > len(sites):
            where = f" in --sites {str(sites[0].parent)!r}" if sites else ""
            raise ConfigError(
                f"{key}={value!r} exceeds the {len(sites)} site file(s){where}, one site "
                f"each; set {key} <= {len(sites)}"
            )


def read_site_files(
    sites: Sequence[Path], *, task: str, labels: Sequence[str] | None
) -> list[DataReport]:
    """Every site file read against the task and label set (None: any label).

    Raises:
        DataError: Naming every bad file's first problem (file:line: reason) and how many
            more it has, not only the first bad file's.
    """
    reports = [scan_file(path, task=task, labels=labels) for path in sites]
    bad = [report for report in reports if report.problems]
    if len(bad) == 1:
        raise DataError(bad[0].summary())
    if bad:
        raise DataError(
            f"{len(bad)} of {len(reports)} site files have problems "
            f"(`fedlora site check --data FILE` lists all of a file's): "
            + "; ".join(report.summary() for report in bad)
        )
    return reports


def _with_eval_labels(site_labels: list[str], eval_file: Path, *, flag: str) -> list[str]:
    """The label set with the eval file's labels, warning of those no site holds.

    ``flag`` names where the eval file came from (``--eval``, or ``eval-file`` of ``--set``).

    They are kept (evaluating on them measures something real), but the head gets a row
    no site trains, so every held-out row of such a label counts as an error.
    """
    eval_labels = labels_in([eval_file])
    only = sorted(set(eval_labels) - set(site_labels))
    if only:
        shown = ", ".join(repr(label) for label in only[:5]) + (", …" if len(only) > 5 else "")
        log.warning(
            "label%s %s appear%s only in %s %r, in no site file: no site trains %s, so "
            "the held-out accuracy counts those rows as errors",
            "s" if len(only) > 1 else "",
            shown,
            "" if len(only) > 1 else "s",
            flag,
            str(eval_file),
            "them" if len(only) > 1 else "it",
        )
    return sorted({*site_labels, *eval_labels})


def checked_run(
    *,
    sites_dir: Path,
    rounds: int,
    out: Path,
    eval_file: Path | None,
    task: str | None,
    overrides: dict[str, Any],
    resume: bool,
) -> tuple[list[Path], dict[str, Any], RunSettings]:
    """The site files, the run config and its settings, every site file read against them.

    What `fedlora train` and `fedlora federation local` check before they write or start
    anything.

    Raises:
        FedloraError: For a bad site file or run config.
    """
    from server.settings import RunSettings

    sites = site_files(sites_dir)
    config, reports = build_train_config(
        sites=sites,
        rounds=rounds,
        out=out,
        eval_file=eval_file,
        task=task,
        overrides=overrides,
        resume=resume,
    )
    settings = RunSettings.from_config(config)
    if reports is None:  # else read already, against a label set made from them
        read_site_files(sites, task=settings.spec.task, labels=settings.spec.labels or None)
    return sites, config, settings


def run_train(
    *,
    sites_dir: Path,
    rounds: int,
    out: Path,
    eval_file: Path | None = None,
    task: str | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    verbose: bool = False,
):
    """Validate everything, then run a local simulation that shows its rounds as they end.

    ``verbose`` forwards the simulated sites' output and Flower's debug log.

    Returns:
        The simulation's `TrainingResult` (adapter, metrics, MLflow run, history).

    Raises:
        FedloraError: For a bad site file or run config, before anything is written.
    """
    from server.simulation import SimSite, simulate

    sites, _, settings = checked_run(
        sites_dir=sites_dir,
        rounds=rounds,
        out=out,
        eval_file=eval_file,
        task=task,
        overrides=overrides or {},
        resume=resume,
    )
    with RoundProgress("federated rounds", total=settings.rounds) as progress:

        def on_round(record) -> None:
            acc = "-" if record.accuracy is None else f"{record.accuracy:.3f}"
            progress.update(
                record.round, f"acc {acc}, {record.sites} sites, {record.rejected} rejected"
            )

        result = simulate(
            settings, [SimSite(p.stem, p) for p in sites], on_round=on_round, verbose=verbose
        )
    return result
