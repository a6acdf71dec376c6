"""Splitting one labelled file into sites: every row to exactly one site, reproducibly."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.site.split import (
    MAX_ATTEMPTS,
    SplitSpec,
    dirichlet_partition,
    group_partition,
    read_rows,
    site_names,
    split_rows,
    write_sites,
)
from clients.task.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[3]


def _rows(labels: str, *, domain: str = "") -> list[dict]:
    """One row per character of `labels`, with an id so equal rows stay distinguishable."""
    return [
        {"id": i, "text": f"t{i}", "label": label, **({"domain": domain} if domain else {})}
        for i, label in enumerate(labels)
    ]


def _write(path: Path, content: str) -> Path:
    path.write_text(content)
    return path


def _multiset(rows: list[dict]) -> Counter[str]:
    return Counter(json.dumps(row, sort_keys=True) for row in rows)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sites": 1, "alpha": 1.0}, "--sites 1 must be an integer of at least 2"),
        ({"sites": True, "alpha": 1.0}, "--sites True"),
        ({"sites": 2, "alpha": 0.0}, "--alpha 0.0 must be a finite number above 0"),
        ({"sites": 2, "alpha": -1.0}, "--alpha -1.0"),
        ({"sites": 2, "alpha": math.nan}, "--alpha nan"),
        ({"sites": 2, "alpha": math.inf}, "--alpha inf"),
        ({"sites": 2}, "exactly one of --alpha and --by"),
        ({"sites": 2, "alpha": 1.0, "by": "domain"}, "exactly one of --alpha and --by"),
        ({"sites": 2, "by": ""}, "--by needs a column name"),
        ({"sites": 2, "alpha": 1.0, "min_per_site": 0}, "--min-per-site 0"),
        ({"sites": 2, "alpha": 1.0, "seed": -1}, "--seed -1 must be an integer >= 0"),
        ({"sites": 2, "alpha": 1.0, "seed": True}, "--seed True"),
    ],
)
def test_spec_names_the_bad_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        SplitSpec(**kwargs)


def test_site_names_are_zero_padded_to_sort() -> None:
    assert site_names(3) == ["site-01", "site-02", "site-03"]
    assert site_names(100)[0] == "site-001"


# --- reading ----------------------------------------------------------------------------


def test_read_rows_keeps_every_column(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "label": "x", "extra": 1}\n\n{"text": "b", "label": "y"}\n')
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('text,label,domain\n"a, b",x,bank\nc,y,travel\n')

    assert read_rows(jsonl).rows == [
        {"text": "a", "label": "x", "extra": 1},
        {"text": "b", "label": "y"},
    ]
    assert read_rows(jsonl).places == ["d.jsonl:1", "d.jsonl:3"]
    assert read_rows(csv_path).rows == [
        {"text": "a, b", "label": "x", "domain": "bank"},
        {"text": "c", "label": "y", "domain": "travel"},
    ]
    assert read_rows(csv_path).places == ["d.csv:2", "d.csv:3"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "'.*missing.jsonl' does not exist"),
        ("d.txt", "x", "must end in .jsonl or .csv"),
        ("d.jsonl", "", "has no rows"),
        ("d.jsonl", '{"text": "a"}\n{oops\n', r"d\.jsonl:2: invalid JSON"),
        ("d.jsonl", "[1]\n", r"d\.jsonl:1: row must be an object"),
        ("d.jsonl", '{"a": 1, "a": 2}\n', r"d\.jsonl:1: the object names key 'a' more than once"),
        ("d.csv", "text,label\na,b,c\n", r"d\.csv:2: more cells than the header"),
    ],
)
def test_read_rows_refuses(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_rows(path)


# --- Dirichlet --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.sampled_from("abcde"), min_size=0, max_size=60),
    sites=st.integers(2, 6),
    alpha=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_partition_is_a_partition(
    labels: list[str], sites: int, alpha: float, seed: int
) -> None:
    parts = dirichlet_partition(labels, sites=sites, alpha=alpha, rng=np.random.default_rng(seed))

    assert len(parts) == sites
    assert sorted(i for part in parts for i in part) == list(range(len(labels)))


@settings(max_examples=30, deadline=None)
@given(
    labels=st.text(alphabet="abc", min_size=4, max_size=40),
    sites=st.integers(2, 4),
    seed=st.integers(0, 1000),
)
def test_split_rows_loses_and_duplicates_no_row(labels: str, sites: int, seed: int) -> None:
    rows = _rows(labels)
    try:
        split = split_rows(rows, spec=SplitSpec(sites=sites, alpha=5.0, seed=seed))
    except DataError:  # too few rows for every site: allowed to refuse, never to drop
        return
    assert _multiset([row for part in split.parts for row in part]) == _multiset(rows)
    assert all(part for part in split.parts)


def test_dirichlet_split_is_deterministic_per_seed() -> None:
    rows = _rows("abcd" * 25)

    first = split_rows(rows, spec=SplitSpec(sites=3, alpha=0.5, seed=7))
    again = split_rows(rows, spec=SplitSpec(sites=3, alpha=0.5, seed=7))
    other = split_rows(rows, spec=SplitSpec(sites=3, alpha=0.5, seed=8))

    assert first == again
    assert first.parts != other.parts


def test_small_alpha_skews_labels_and_large_alpha_does_not() -> None:
    rows = _rows("abcdefgh" * 50)

    def labels_per_site(alpha: float) -> float:
        split = split_rows(rows, spec=SplitSpec(sites=4, alpha=alpha, seed=0))
        return float(np.mean([len({r["label"] for r in part}) for part in split.parts]))

    assert labels_per_site(0.05) < labels_per_site(1000.0) == 8.0


def test_an_empty_site_is_resampled_with_the_next_seed() -> None:
    rows = _rows("aabbcc")
    labels = [row["label"] for row in rows]

    def parts_at(seed: int) -> list[list[int]]:
        return dirichlet_partition(labels, sites=3, alpha=0.3, rng=np.random.default_rng(seed))

    # The first seed whose own draw leaves a site empty but the next seed's draw does not.
    seed = next(s for s in range(200) if not all(parts_at(s)) and all(parts_at(s + 1)))

    split = split_rows(rows, spec=SplitSpec(sites=3, alpha=0.3, seed=seed))

    assert split.attempts == 2
    assert split.parts == [[rows[i] for i in part] for part in parts_at(seed + 1)]


def test_an_impossible_dirichlet_split_names_the_site_and_the_fix() -> None:
    # One label, tiny alpha: every draw puts (nearly) all rows on one site.
    rows = _rows("aaaa")

    with pytest.raises(DataError, match=r"site-0\d would get \d rows") as info:
        split_rows(rows, spec=SplitSpec(sites=3, alpha=0.001))

    assert "larger --alpha than 0.001 or fewer --sites" in str(info.value)
    assert f"seeds 0..{MAX_ATTEMPTS - 1}" in str(info.value)


def test_too_few_rows_for_the_sites_is_refused_up_front() -> None:
    with pytest.raises(DataError, match="2 rows cannot give --sites 3 sites"):
        split_rows(_rows("ab"), spec=SplitSpec(sites=3, alpha=1.0))


def test_a_missing_label_column_lists_the_columns_there_are() -> None:
    with pytest.raises(ConfigError, match="'intent' is not in the rows; available: id, label"):
        split_rows(_rows("abab"), spec=SplitSpec(sites=2, alpha=1.0, label_column="intent"))


def test_a_row_without_a_label_is_named() -> None:
    rows = _rows("abab")
    del rows[2]["label"]

    with pytest.raises(DataError, match=r"^row 3: no value for column 'label' \(--label-column\)"):
        split_rows(rows, spec=SplitSpec(sites=2, alpha=1.0))


@pytest.mark.parametrize(
    ("name", "content", "spec", "message"),
    [
        (  # a CSV header takes line 1: the third row is on line 4
            "by.csv",
            "text,label,domain\na,x,d1\nb,y,d2\nc,x,\nd,y,d1\n",
            SplitSpec(sites=2, by="domain"),
            "by.csv:4: no value for column 'domain' (--by)",
        ),
        (  # blank lines are skipped, not counted away
            "gaps.jsonl",
            '{"text": "a", "label": "x"}\n\n\n{"text": "b"}\n{"text": "c", "label": "y"}\n',
            SplitSpec(sites=2, alpha=1.0),
            "gaps.jsonl:4: no value for column 'label' (--label-column)",
        ),
        (  # training refuses a bool label, so the split does too
            "bool.jsonl",
            '{"text": "a", "label": "x"}\n{"text": "b", "label": true}\n'
            '{"text": "c", "label": "y"}\n',
            SplitSpec(sites=2, alpha=1.0),
            "bool.jsonl:2: column 'label' (--label-column): the label must be a string, got bool",
        ),
        (
            "float.jsonl",
            '{"text": "a", "label": 1.5}\n{"text": "b", "label": "y"}\n',
            SplitSpec(sites=2, alpha=1.0),
            "float.jsonl:1: column 'label' (--label-column): the label must be a string",
        ),
    ],
)
def test_a_bad_value_names_the_file_and_line(
    tmp_path: Path, name: str, content: str, spec: SplitSpec, message: str
) -> None:
    source = read_rows(_write(tmp_path / name, content))

    with pytest.raises(DataError) as info:
        split_rows(source.rows, spec=spec, places=source.places)

    assert str(info.value).startswith(message)


def test_labels_are_read_as_training_reads_them() -> None:
    # Training reads JSON 3 as the label "3" (check_label): the split deals them as one.
    mixed = [{"id": i, "label": [3, "3", "x"][i % 3]} for i in range(30)]
    as_text = [{**row, "label": str(row["label"])} for row in mixed]
    spec = SplitSpec(sites=3, alpha=0.3, seed=5)

    split = split_rows(mixed, spec=spec)

    ids = [[row["id"] for row in part] for part in split.parts]
    assert ids == [[row["id"] for row in part] for part in split_rows(as_text, spec=spec).parts]


def test_too_many_sites_are_refused_before_naming_them() -> None:
    # Naming 10**9 sites took a minute and then ran out of memory.
    with pytest.raises(DataError, match="4 rows cannot give --sites 1000000000 sites"):
        split_rows(_rows("abab"), spec=SplitSpec(sites=10**9, alpha=1.0))


# --- by a group column ------------------------------------------------------------------


def test_groups_are_dealt_largest_first_to_the_lightest_site() -> None:
    groups = ["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"] * 2
    # a(5) -> 0; b(3) -> 1; c(2) -> 1 (3 < 5); d(2) -> 0 (5 == 5, first wins): loads 7 and 5.
    parts = group_partition(groups, sites=2)

    assert parts == [[0, 1, 2, 3, 4, 10, 11], [5, 6, 7, 8, 9]]


@settings(max_examples=60, deadline=None)
@given(groups=st.lists(st.sampled_from("pqrstu"), min_size=6, max_size=50), sites=st.integers(2, 4))
def test_each_group_lands_on_one_site(groups: list[str], sites: int) -> None:
    if len(set(groups)) < sites:
        with pytest.raises(ConfigError):
            group_partition(groups, sites=sites)
        return
    parts = group_partition(groups, sites=sites)

    assert sorted(i for part in parts for i in part) == list(range(len(groups)))
    site_sets = [{groups[i] for i in part} for part in parts]
    assert all(site_sets)
    assert sum(len(s) for s in site_sets) == len(set(groups))  # no group on two sites


def test_split_by_column_keeps_the_rows_whole() -> None:
    rows = _rows("ab", domain="bank") + _rows("abc", domain="travel") + _rows("a", domain="home")

    split = split_rows(rows, spec=SplitSpec(sites=2, by="domain"))

    assert [{r["domain"] for r in part} for part in split.parts] == [{"travel"}, {"bank", "home"}]


def test_fewer_groups_than_sites_names_the_column_and_the_count() -> None:
    rows = _rows("ab", domain="bank") + _rows("ab", domain="home")

    with pytest.raises(ConfigError, match="--by 'domain': only 2 distinct values for --sites 3"):
        split_rows(rows, spec=SplitSpec(sites=3, by="domain"))


def test_group_values_of_different_json_types_are_different_groups() -> None:
    rows = [
        {"text": "a", "g": True},
        {"text": "b", "g": "true"},
        {"text": "c", "g": 1},
        {"text": "d", "g": "1"},
    ]

    split = split_rows(rows, spec=SplitSpec(sites=4, by="g"))

    assert sorted(len(part) for part in split.parts) == [1, 1, 1, 1]


def test_a_missing_group_column_lists_the_columns_there_are() -> None:
    with pytest.raises(ConfigError, match="--by column 'dom' is not in the rows; available: "):
        split_rows(_rows("abab", domain="x"), spec=SplitSpec(sites=2, by="dom"))


def test_a_group_site_below_the_minimum_is_named() -> None:
    rows = _rows("aaaa", domain="big") + _rows("a", domain="small")

    with pytest.raises(DataError, match="site-02 would get 1 rows"):
        split_rows(rows, spec=SplitSpec(sites=2, by="domain", min_per_site=2))


# --- writing ----------------------------------------------------------------------------


def test_written_sites_hold_exactly_the_input_rows(tmp_path: Path) -> None:
    rows = _rows("abcabcabcabc")
    split = split_rows(rows, spec=SplitSpec(sites=3, alpha=1.0, seed=1))

    paths = write_sites(split.parts, tmp_path / "sites", force=False)

    assert [p.name for p in paths] == ["site-01.jsonl", "site-02.jsonl", "site-03.jsonl"]
    assert _multiset([row for p in paths for row in read_rows(p).rows]) == _multiset(rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sites"]  # no temp dir left


def test_a_non_empty_out_dir_is_refused_without_force(tmp_path: Path) -> None:
    out = tmp_path / "sites"
    out.mkdir()
    (out / "site-01.jsonl").write_text("{}\n")

    with pytest.raises(ConfigError, match=r"--out '.*sites' is not empty; pass --force"):
        write_sites([[{"a": 1}], [{"a": 2}]], out, force=False)
    assert (out / "site-01.jsonl").read_text() == "{}\n"


def test_force_replaces_an_earlier_split_whole(tmp_path: Path) -> None:
    out = tmp_path / "sites"
    write_sites([[{"a": 1}], [{"a": 2}], [{"a": 3}]], out, force=False)

    write_sites([[{"b": 1}], [{"b": 2}]], out, force=True)

    assert sorted(p.name for p in out.iterdir()) == ["site-01.jsonl", "site-02.jsonl"]
    assert read_rows(out / "site-02.jsonl").rows == [{"b": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sites"]


def test_force_does_not_delete_other_files(tmp_path: Path) -> None:
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")

    with pytest.raises(ConfigError, match=r"holds more than site files \(notes.txt\)"):
        write_sites([[{"a": 1}], [{"a": 2}]], out, force=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "sites"
    out.write_text("x")

    with pytest.raises(ConfigError, match="is a file, not a directory"):
        write_sites([[{"a": 1}], [{"a": 2}]], out, force=True)


def test_an_out_that_holds_the_source_is_refused_and_the_source_kept(tmp_path: Path) -> None:
    # An earlier split's site file, split again into its own directory with --force.
    out = tmp_path / "sites"
    write_sites([[{"text": "a", "label": "x"}], [{"text": "b", "label": "y"}]], out, force=False)
    source = out / ".." / "sites" / "site-01.jsonl"  # another spelling of a path inside
    before = source.read_text()

    with pytest.raises(ConfigError) as info:
        write_sites([[{"a": 1}], [{"a": 2}]], out, force=True, source=source)

    assert f"--out {str(out)!r} holds the source file {str(source)!r}" in str(info.value)
    assert source.read_text() == before


def test_a_nan_outside_the_label_passes_through_as_training_reads_it(tmp_path: Path) -> None:
    # Python's json writes NaN, site check and training read it: split must not be the
    # one reader that refuses such a file.
    from clients.task.data import scan_file

    out = tmp_path / "sites"
    write_sites([[{"text": "a", "label": "x", "score": math.nan}], [{"text": "b", "label": "y"}]],
                out, force=False)  # fmt: skip

    report = scan_file(out / "site-01.jsonl", task="sequence-classification")
    assert [e.text for e in report.examples] == ["a"] and not report.problems


@pytest.mark.integration  # a real subprocess, killed: a second
def test_a_killed_writers_temporary_directory_is_removed_by_the_next_split(
    tmp_path: Path,
) -> None:
    # Arrange: a writer killed (SIGKILL: no clean-up of its own) after writing its files
    out = tmp_path / "sites"
    script = (
        "import os, signal, sys\n"
        "from clients.site import split\n"
        "split.swap_directory = lambda new, target: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"split.write_sites([[{{'a': 1}}], [{{'a': 2}}]], {str(out)!r}, force=False)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (left,) = [p for p in tmp_path.iterdir()]
    assert (left / "site-02.jsonl").is_file()  # what the bug left for good
    live = tmp_path / f".sites.{os.getppid()}.abc123.tmp"  # a live writer's, kept
    live.mkdir()

    # Act
    write_sites([[{"b": 1}], [{"b": 2}]], out, force=False)

    # Assert
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["sites", live.name])
