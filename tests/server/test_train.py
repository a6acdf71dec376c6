"""``fedlora train``'s site files: each file's stem is a site id, valid and its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.task.errors import ConfigError
from server.train import site_files

ROW = '{"text": "hello", "label": "a"}\n'


def _sites(tmp_path: Path, *names: str) -> Path:
    for name in names:
        (tmp_path / name).write_text(ROW if name.endswith(".jsonl") else "text,label\nhello,a\n")
    return tmp_path


def test_files_with_awkward_but_valid_names_are_sites(tmp_path: Path) -> None:
    sites = _sites(tmp_path, "Ward 7, Oslo.jsonl", "Zürich (east).csv", "b.jsonl")
    assert [p.stem for p in site_files(sites)] == ["Ward 7, Oslo", "Zürich (east)", "b"]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (("a.jsonl", "a.csv"), r"'a\.csv' and 'a\.jsonl' .* would both be site 'a'"),
        (("Site.csv", "site.jsonl"), r"would both be site 'site'"),
        (("_hidden.jsonl",), r"_hidden\.jsonl'.*site id, which must be 1-64 printable"),
        ((f"{'x' * 65}.jsonl",), r"site id, which must be 1-64 printable"),
    ],
)
def test_files_that_do_not_make_distinct_valid_site_ids_are_refused(
    tmp_path: Path, names: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        site_files(_sites(tmp_path, *names))
