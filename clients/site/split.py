"""Split one labelled file into per-site files, for simulations and benchmarks.

Two ways to split, both keeping every column of every row and sending each row to exactly
one site:

- ``alpha``: label skew. For every label the sites' shares are drawn from
  Dirichlet(alpha · 1) and that label's rows are dealt out by those shares (Hsu et al.,
  "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
  Classification", 2019). Small alpha gives each site few labels; large alpha gives IID sites.
- ``by``: feature skew. Each distinct value of a column (a domain, a hospital, a user) goes
  wholly to one site; groups are dealt largest first to the site with the fewest rows.

Labels follow training's rule (`clients.task.labels.check_label`): a string, or an integer
that stands for its decimal text, so every site file trains. Group values may be any JSON
value; values of different types (``true`` and ``"true"``) are different groups.

Usage::

    source = read_rows("clinc.jsonl")
    spec = SplitSpec(sites=4, alpha=0.5, seed=0)
    split = split_rows(source.rows, spec=spec, places=source.places)
    write_sites(split.parts, Path("sites"), force=False, source=source.path)
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clients.task import data
from clients.task.errors import ConfigError, DataError
from clients.task.files import swap_directory, temp_directory
from clients.task.labels import check_label
from clients.task.numbers import is_integer

# A Dirichlet draw can leave a site empty; the next seeds are tried before giving up, so a
# near-feasible split succeeds while an impossible one (tiny alpha, few rows) still fails fast.
MAX_ATTEMPTS = 20
SITE_FILE_GLOB = "site-*.jsonl"


@dataclass(frozen=True)
class SplitSpec:
    """How to split: into `sites` sites, by Dirichlet `alpha` over labels or `by` a column."""

    sites: int
    alpha: float | None = None
    by: str | None = None
    seed: int = 0
    label_column: str = "label"
    min_per_site: int = 1

    def __post_init__(self) -> None:
        if not is_integer(self.sites) or self.sites < 2:
            raise ConfigError(f"--sites {self.sites!r} must be an integer of at least 2")
        if (self.alpha is None) == (self.by is None):
            raise ConfigError("give exactly one of --alpha and --by")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"--alpha {self.alpha!r} must be a finite number above 0")
        if self.by is not None and not self.by:
            raise ConfigError("--by needs a column name")
        if not self.label_column:
            raise ConfigError("--label-column needs a column name")
        if not is_integer(self.seed) or self.seed < 0:
            # numpy's generators take no negative seed
            raise ConfigError(f"--seed {self.seed!r} must be an integer >= 0")
        if (
            isinstance(self.min_per_site, bool)
            or not isinstance(self.min_per_site, int)
            or self.min_per_site < 1
        ):
            raise ConfigError(f"--min-per-site {self.min_per_site!r} must be an integer >= 1")


@dataclass(frozen=True)
class Split:
    """The rows of each site, in input order, and how many seeds were tried to get them."""

    parts: list[list[dict]]
    attempts: int = 1


def site_names(sites: int) -> list[str]:
    """``site-01`` … ``site-NN``, zero-padded so the files sort in site order."""
    width = max(2, len(str(sites)))
    return [f"site-{i:0{width}d}" for i in range(1, sites + 1)]


@dataclass(frozen=True)
class Source:
    """The rows of a source file and where each one is (``name:line``, for errors)."""

    path: Path
    rows: list[dict]
    places: list[str]


def read_rows(path: str | Path) -> Source:
    """Read every row of a JSONL or CSV file as a dict, keeping all columns.

    Raises:
        DataError: Naming the file and line, if the file is missing, has another suffix,
            or a row is not an object. NaN and infinities pass through as Python's json
            writes them (``NaN``), which site check and training read too; a label that is
            one is refused where labels are read.
    """
    path = Path(path)
    rows, places = [], []
    for lineno, row in data.read_rows(path, what="source file"):
        if isinstance(row, data.Header):
            continue
        if isinstance(row, data.BadRow):  # a line that could not be read, with the reason
            raise DataError(f"{path.name}:{lineno}: {row.reason}")
        if not isinstance(row, dict):
            raise DataError(f"{path.name}:{lineno}: row must be an object")
        rows.append(row)
        places.append(f"{path.name}:{lineno}")
    if not rows:
        raise DataError(f"source file {str(path)!r} has no rows")
    return Source(path=path, rows=rows, places=places)


def _group_key(value: object) -> str:
    """A group value as a sortable key that keeps JSON types apart: a string is itself
    behind one tag, any other value its JSON text behind another (``true`` ≠ ``"true"``)."""
    if isinstance(value, str):
        return f"s:{value}"
    return f"j:{json.dumps(value, sort_keys=True)}"


def _label_key(value: object) -> str:
    """A label as training reads it (JSON 3 and "3" are one label), or ValueError."""
    try:
        return check_label(value)
    except ValueError as exc:
        raise ValueError(f"the label {exc}") from None


def column_values(
    rows: Sequence[dict],
    column: str,
    *,
    flag: str,
    key: Callable[[object], str],
    places: Sequence[str] | None = None,
) -> list[str]:
    """The value of `column` in every row, as keys for grouping.

    Args:
        rows: The rows.
        column: The column to read.
        flag: The option that names the column, for errors.
        key: A value's key; raises ValueError saying why a value cannot be one.
        places: Each row's place for errors (`Source.places`); default ``row N``.

    Raises:
        ConfigError: If no row has the column, listing the columns there are.
        DataError: If some row lacks a value for it, or `key` refuses it, naming the row.
    """
    if not any(column in row for row in rows):
        available = sorted({name for row in rows for name in row})
        raise ConfigError(
            f"{flag} column {column!r} is not in the rows; available: {', '.join(available)}"
        )
    values = []
    for number, row in enumerate(rows, start=1):
        place = places[number - 1] if places is not None else f"row {number}"
        value = row.get(column)
        if value is None or value == "":
            raise DataError(f"{place}: no value for column {column!r} ({flag})")
        try:
            values.append(key(value))
        except ValueError as exc:
            raise DataError(f"{place}: column {column!r} ({flag}): {exc}") from None
    return values


def dirichlet_partition(
    labels: Sequence[str], *, sites: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    """Deal row indices to sites with Dirichlet(alpha) shares per label.

    Returns:
        For each site, the sorted indices of its rows; together they are exactly
        ``range(len(labels))``. Sites may be empty.
    """
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    parts: list[list[int]] = [[] for _ in range(sites)]
    for label in sorted(by_label):  # sorted: the draws must not depend on row order
        indices = rng.permutation(np.asarray(by_label[label]))
        shares = rng.dirichlet(np.full(sites, alpha))  # (sites,)
        # Rounded cumulative cuts: flooring them would hand the last site a row of nearly
        # every label however small its share.
        cuts = np.clip(np.rint(np.cumsum(shares)[:-1] * len(indices)), 0, len(indices))
        for part, chunk in zip(parts, np.split(indices, cuts.astype(int)), strict=True):
            part.extend(int(i) for i in chunk)
    return [sorted(part) for part in parts]


def group_partition(groups: Sequence[str], *, sites: int) -> list[list[int]]:
    """Deal whole groups to sites, largest first, each to the site with the fewest rows.

    Raises:
        ConfigError: If there are fewer groups than sites.
    """
    sizes = Counter(groups)
    if len(sizes) < sites:
        raise ConfigError(f"only {len(sizes)} distinct values for --sites {sites}")
    loads = [0] * sites
    site_of: dict[str, int] = {}
    # Ties broken by name, so the deal does not depend on row order.
    for group, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        site = loads.index(min(loads))
        site_of[group] = site
        loads[site] += size
    parts: list[list[int]] = [[] for _ in range(sites)]
    for index, group in enumerate(groups):
        parts[site_of[group]].append(index)
    return parts


def split_rows(
    rows: Sequence[dict], *, spec: SplitSpec, places: Sequence[str] | None = None
) -> Split:
    """Split rows into ``spec.sites`` parts; deterministic for ``spec.seed``.

    `places` names each row in errors (`Source.places`: file and line); without it, rows
    are named by their number.

    Raises:
        ConfigError: For a column that is not in the rows, or too few groups.
        DataError: For a row without a label/group value or with a label training refuses,
            or if some site would get fewer than ``spec.min_per_site`` rows (after
            `MAX_ATTEMPTS` seeds for Dirichlet).
    """
    if len(rows) < spec.sites * spec.min_per_site:
        raise DataError(
            f"{len(rows)} rows cannot give --sites {spec.sites} sites "
            f"--min-per-site {spec.min_per_site} rows each"
        )
    names = site_names(spec.sites)  # after the check above: as many as rows at most
    if spec.by is not None:
        groups = column_values(rows, spec.by, flag="--by", key=_group_key, places=places)
        try:
            indices = group_partition(groups, sites=spec.sites)
        except ConfigError as exc:
            raise ConfigError(f"--by {spec.by!r}: {exc}; use fewer --sites") from exc
        small = _first_small(indices, spec.min_per_site)
        if small is not None:
            raise DataError(
                f"{names[small]} would get {len(indices[small])} rows "
                f"(--min-per-site {spec.min_per_site}); use fewer --sites"
            )
        return Split(parts=[[rows[i] for i in part] for part in indices])

    assert spec.alpha is not None  # SplitSpec guarantees exactly one of alpha and by
    labels = column_values(
        rows, spec.label_column, flag="--label-column", key=_label_key, places=places
    )
    for attempt in range(MAX_ATTEMPTS):
        rng = np.random.default_rng(spec.seed + attempt)
        indices = dirichlet_partition(labels, sites=spec.sites, alpha=spec.alpha, rng=rng)
        small = _first_small(indices, spec.min_per_site)
        if small is None:
            return Split(parts=[[rows[i] for i in part] for part in indices], attempts=attempt + 1)
    assert small is not None
    raise DataError(
        f"{names[small]} would get {len(indices[small])} rows (--min-per-site "
        f"{spec.min_per_site}) for seeds {spec.seed}..{spec.seed + MAX_ATTEMPTS - 1}; "
        f"use a larger --alpha than {spec.alpha} or fewer --sites"
    )


def _first_small(parts: Sequence[Sequence[int]], minimum: int) -> int | None:
    return next((site for site, part in enumerate(parts) if len(part) < minimum), None)


def write_sites(
    parts: Sequence[Sequence[dict]],
    out: str | Path,
    *,
    force: bool,
    source: str | Path | None = None,
) -> list[Path]:
    """Write ``out/site-01.jsonl`` … as one step: into a temporary directory, then swapped in.

    With `force`, an existing `out` holding only an earlier split's ``site-*.jsonl`` files is
    replaced whole, so no stale site from a split into more sites is left behind. The
    temporary directory (`temp_directory`) is removed on any failure, Ctrl-C or SIGTERM
    included; one a killed process left is removed by the next call on `out`.

    Raises:
        ConfigError: If `out` is a file, or a non-empty directory without `force`, or with
            `force` holds anything but site files, or holds the `source` file.
    """
    out = Path(out)
    _check_out(out, force=force, source=None if source is None else Path(source))
    tmp = temp_directory(out)
    try:
        paths = []
        for name, part in zip(site_names(len(parts)), parts, strict=True):
            path = tmp / f"{name}.jsonl"
            with path.open("w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in part)
            paths.append(out / path.name)
        swap_directory(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return paths


def _check_out(out: Path, *, force: bool, source: Path | None) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file, not a directory")
    if source is not None and source.resolve().is_relative_to(out.resolve()):
        raise ConfigError(
            f"--out {str(out)!r} holds the source file {str(source)!r}, which writing the "
            "sites there would delete; choose another --out"
        )
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise ConfigError(f"--out {str(out)!r} is not empty; pass --force to replace it")
    others = sorted(p.name for p in out.iterdir() if not (p.is_file() and p.match(SITE_FILE_GLOB)))
    if others:
        raise ConfigError(
            f"--out {str(out)!r} holds more than site files ({', '.join(others[:3])}"
            f"{', …' if len(others) > 3 else ''}); --force only replaces an earlier split"
        )
