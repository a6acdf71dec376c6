"""``fedlora train`` as a library call: a directory of site files to a local simulation.

`run_train` checks the sites' files and the run config before anything is written, then
runs the simulation showing its rounds as they end (server/simulation.py does the run itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clients.task.data import SUFFIXES, labels_in, load_examples
from clients.task.errors import ConfigError
from clients.task.labels import format_label_set
from server.console import RoundProgress
from strategies.protocol import SITE_ID_RULE, valid_site_id

if TYPE_CHECKING:
    from server.settings import RunSettings


def site_files(sites_dir: Path) -> list[Path]:
    """One site per *.jsonl / *.csv file in a directory, sorted by name.

    A file's stem is its site's id, so it must be a valid one, and no two files may give
    the same id (``a.jsonl`` and ``a.csv``; nor ``A.csv`` and ``a.csv``, one state folder
    on a case-insensitive file system): refused here, before anything starts, rather
    than by the site at its first round or by the server as two nodes claiming one id.

    Raises:
        ConfigError: If `sites_dir` is not a directory, holds no site file, or two site
            files (or one file's stem) do not make distinct valid site ids.
    """
    if not sites_dir.is_dir():
        raise ConfigError(f"--sites {str(sites_dir)!r} is not a directory")
    files = sorted(p for p in sites_dir.iterdir() if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"--sites {str(sites_dir)!r} holds no .jsonl or .csv files")
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
    labels = config.get("labels")
    if task_name == "sequence-classification" and not labels:
        labels = labels_in([*sites, *([eval_file] if eval_file else [])])
    if isinstance(labels, list | tuple):
        # A run config holds flat values (Flower's too): the label set travels as the TOML
        # array string users type (`fedlora site check` prints it); a label may hold commas.
        config["labels"] = format_label_set(labels)
    config.setdefault("min-available-clients", len(sites))
    config.setdefault("min-fit-clients", min(2, len(sites)))
    return config


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
    config = build_train_config(
        sites=sites,
        rounds=rounds,
        out=out,
        eval_file=eval_file,
        task=task,
        overrides=overrides,
        resume=resume,
    )
    settings = RunSettings.from_config(config)
    for path in sites:
        load_examples(path, task=settings.spec.task, labels=settings.spec.labels or None)
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
