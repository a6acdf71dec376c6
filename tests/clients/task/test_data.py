"""Site data validation: each bad row is reported with its line and the bad value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.task.data import labels_in, load_examples, scan_file
from clients.task.errors import DataError

CLS = "sequence-classification"


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("row", "labels", "problem"),
    [
        ({"label": "a"}, None, "field 'text' is missing or empty"),
        ({"text": "  ", "label": "a"}, None, "field 'text' is missing or empty"),
        ({"text": "hi"}, None, "field 'label' is missing"),
        ({"text": "hi", "label": "z"}, ("a", "b"), "label 'z' is not in the run's label set"),
        ({"text": 5, "label": "a"}, None, "field 'text' must be a string, got int 5"),
        ("{not json", None, "invalid JSON"),
        ([1, 2], None, "row must be an object, got list"),
    ],
)
def test_bad_classification_row(
    tmp_path: Path, row: object, labels: tuple | None, problem: str
) -> None:
    path = _jsonl(tmp_path / "s.jsonl", [{"text": "fine", "label": "a"}, row])
    report = scan_file(path, task=CLS, labels=labels)
    assert len(report.examples) == 1
    assert report.problems == [f"s.jsonl:2: {problem}"] or problem in report.problems[0]
    assert report.problems[0].startswith("s.jsonl:2:")
    with pytest.raises(DataError, match=r"s\.jsonl:2"):
        load_examples(path, task=CLS, labels=labels)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": "q"}, "'prompt' and 'response' must both be non-empty"),
        ({"text": ""}, "needs a non-empty 'text'"),
    ],
)
def test_bad_causal_lm_row(tmp_path: Path, row: dict, problem: str) -> None:
    report = scan_file(_jsonl(tmp_path / "s.jsonl", [row]), task="causal-lm")
    assert problem in report.problems[0]


def test_every_problem_is_reported_and_load_counts_them(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "s.jsonl", [{"text": "a"}, {"label": "x"}, {"text": "ok", "label": "x"}]
    )
    assert len(scan_file(path, task=CLS).problems) == 2
    with pytest.raises(DataError, match=r"and 1 more problem\)"):
        load_examples(path, task=CLS)


def test_csv_and_prompt_response(tmp_path: Path) -> None:
    csv_path = tmp_path / "s.csv"
    csv_path.write_text('text,label\n"hello, world",greet\nbye,leave\n')
    examples = load_examples(csv_path, task=CLS)
    assert [(e.text, e.label) for e in examples] == [("hello, world", "greet"), ("bye", "leave")]
    lm = _jsonl(tmp_path / "lm.jsonl", [{"prompt": "Q: 2+2? ", "response": "4"}])
    (example,) = load_examples(lm, task="causal-lm")
    assert example.text == "Q: 2+2? 4" and example.response == "4"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "does not exist"),
        ("data.txt", "x", "must end in .jsonl or .csv"),
        ("empty.jsonl", "", None),
    ],
)
def test_unusable_files(
    tmp_path: Path, name: str, content: str | None, message: str | None
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    if message is None:  # an empty file is readable but has no examples
        with pytest.raises(DataError, match="has no examples"):
            load_examples(path, task=CLS)
        return
    with pytest.raises(DataError, match=message):
        load_examples(path, task=CLS)


def test_unknown_task(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="task='translation' is not supported"):
        scan_file(tmp_path / "x.jsonl", task="translation")


def test_labels_in_is_the_sorted_union(tmp_path: Path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": "b"}, {"text": "y", "label": "a"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": "z", "label": "c"}])
    assert labels_in([a, b]) == ["a", "b", "c"]
