"""Site data validation: each bad row is reported with its line and the bad value."""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.task.data import SUFFIXES, TASKS, labels_in, load_examples, scan_file
from clients.task.errors import DataError
from clients.task.model import LoadedModel, ModelSpec, build_model, quiet_transformers
from clients.task.plan import TrainPlan
from clients.task.text import unencodable
from clients.task.train import encode, evaluate, train_local

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


def test_a_directory_is_named_as_one(tmp_path: Path) -> None:
    folder = tmp_path / "sites.jsonl"
    folder.mkdir()
    with pytest.raises(DataError, match=r"sites\.jsonl' is a directory; expected a \.jsonl or"):
        scan_file(folder, task=CLS)


def test_unknown_task(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="task='translation' is not supported"):
        scan_file(tmp_path / "x.jsonl", task="translation")


def test_labels_in_is_the_sorted_union(tmp_path: Path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": "b"}, {"text": "y", "label": "a"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": "z", "label": "c"}])
    assert labels_in([a, b]) == ["a", "b", "c"]


# --- one rule for every reader: site check, training, evaluation ------------------------


@pytest.fixture(scope="module")
def classifier(tiny_bert: Path) -> LoadedModel:
    quiet_transformers()
    return build_model(ModelSpec(base=str(tiny_bert), labels=("a", "b"), lora_r=2))


@pytest.fixture(scope="module")
def language_model(tiny_llama: Path) -> LoadedModel:
    quiet_transformers()
    return build_model(ModelSpec(base=str(tiny_llama), task="causal-lm", lora_r=2))


# Arbitrary Unicode, lone surrogates included (JSON can carry them: "\ud800"), and the
# characters tokenizers and str.strip treat specially.
any_text = st.one_of(
    st.text(st.characters(exclude_categories=[]), max_size=30),
    st.sampled_from(["\ud800", "ok \udfff", "\x00", "\u200b", "\ufeff", "\u2028", "\x1c", " "]),
)


def _trains_and_evaluates(loaded: LoadedModel, path: Path, *, labels: tuple | None) -> bool:
    """What a site does with the file: load it, train a step, evaluate; False if refused."""
    task = loaded.spec.task
    try:
        examples = load_examples(path, task=task, labels=labels)
    except DataError as exc:
        assert str(exc).startswith(f"{path.name}:1: ")  # refused with file and line
        return False
    plan = TrainPlan(spec=loaded.spec, base_digest="d", local_steps=1, batch_size=2, max_length=16)
    train_local(loaded, examples, plan=plan, generator=torch.Generator().manual_seed(0))
    evaluate(loaded, examples, max_length=16)
    return True


@pytest.fixture(scope="module")
def tokenizers(tiny_bert: Path, tiny_llama: Path) -> list[LoadedModel]:
    """The models' tokenizers alone: `encode` is where a text meets the tokenizer."""
    from transformers import AutoTokenizer

    quiet_transformers()
    specs = [
        ModelSpec(base=str(tiny_bert), labels=("a", "b")),
        ModelSpec(base=str(tiny_llama), task="causal-lm"),
    ]
    return [
        LoadedModel(spec, None, AutoTokenizer.from_pretrained(spec.base), torch.device("cpu"))
        for spec in specs
    ]


@settings(max_examples=300, deadline=None)
@given(text=any_text)
def test_what_site_check_accepts_the_tokenizers_encode(
    tokenizers: list[LoadedModel], tmp_path_factory, text: str
) -> None:
    """The fast half of the equivalence below, over many more texts: every row site check
    accepts goes through the tokenizer as training and evaluation call it."""
    path = tmp_path_factory.mktemp("encode") / "site.jsonl"
    for loaded in tokenizers:
        rows = (
            [{"text": text, "label": "a"}]
            if loaded.spec.task == "sequence-classification"
            else [{"prompt": text, "response": " ok"}, {"text": text}]
        )
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        report = scan_file(path, task=loaded.spec.task, labels=loaded.spec.labels or None)
        if report.examples:
            encode(loaded, report.examples, max_length=16)
        for problem in report.problems:
            assert problem.startswith("site.jsonl:"), problem
            assert not text.strip() or unencodable(text), problem


@pytest.mark.integration  # trains a step per example: about half a minute
@settings(max_examples=60, deadline=None)
@given(text=any_text)
def test_site_check_accepts_a_text_iff_training_and_evaluation_do(
    classifier: LoadedModel, language_model: LoadedModel, tmp_path_factory, text: str
) -> None:
    directory = tmp_path_factory.mktemp("unicode")
    cases = [
        (classifier, ("a", "b"), [{"text": text, "label": "a"}, {"text": "fine", "label": "b"}]),
        (language_model, None, [{"prompt": text, "response": " ok"}, {"text": "fine"}]),
        (language_model, None, [{"text": text}, {"text": "fine"}]),
    ]
    for loaded, labels, rows in cases:
        path = directory / "site.jsonl"
        # ensure_ascii: a lone surrogate is written as the legal JSON escape \ud800.
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

        report = scan_file(path, task=loaded.spec.task, labels=labels)

        assert _trains_and_evaluates(loaded, path, labels=labels) == (not report.problems)
        if report.problems:  # and refused only for what would break or mean nothing
            (problem,) = report.problems
            assert problem.startswith("site.jsonl:1: ")
            assert not text.strip() or unencodable(text), problem


def test_a_lone_surrogate_is_refused_with_file_line_and_cause(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "s.jsonl", ['{"text": "caf\\ud800e", "label": "a"}'])
    (problem,) = scan_file(path, task=CLS).problems
    assert problem == (
        "s.jsonl:1: field 'text' holds a lone surrogate U+D800 at character 3, which is "
        "not valid Unicode text"
    )


# --- files as spreadsheets and editors write them ---------------------------------------

BOM = codecs.BOM_UTF8
ROWS_JSONL = '{"text": "hello", "label": "greet"}\r\n{"text": "bye, now", "label": "leave"}\r\n'


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("excel-utf8.csv", BOM + b'text,label\r\nhello,greet\r\n"bye, now",leave\r\n'),
        ("excel-de.csv", BOM + b'text;label\r\nhello;greet\r\n"bye, now";leave\r\n'),
        ("tabs.csv", b"text\tlabel\nhello\tgreet\nbye, now\tleave\n"),
        ("upper.csv", b'Text , LABEL\nhello,greet\n"bye, now",leave\n'),
        ("old-mac.csv", b'text,label\rhello,greet\r"bye, now",leave\r'),
        ("trailing-columns.csv", b'text,label,,\nhello,greet,,\n"bye, now",leave,,\n'),
        ("empty-rows.csv", b'text,label\r\nhello,greet\r\n,\r\n"bye, now",leave\r\n,\r\n'),
        (
            "unicode-text.csv",
            codecs.BOM_UTF16_LE
            + "text\tlabel\r\nhello\tgreet\r\nbye, now\tleave\r\n".encode("utf-16-le"),
        ),
        (
            "bom.jsonl",
            BOM + b'{"text": "hello", "label": "greet"}\r\n\r\n'
            b'{"text": "bye, now", "label": "leave"}\r\n',
        ),
        ("powershell.jsonl", codecs.BOM_UTF16_LE + ROWS_JSONL.encode("utf-16-le")),
    ],
)
def test_spreadsheet_and_editor_variants_are_read(
    tmp_path: Path, name: str, content: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(content)

    examples = load_examples(path, task=CLS)

    assert [(e.text, e.label) for e in examples] == [("hello", "greet"), ("bye, now", "leave")]


@pytest.mark.parametrize(
    ("name", "content", "problems"),
    [
        (  # Excel's plain "CSV" on Windows is Windows-1252: the line and the cause, not 'missing'
            "cp1252.csv",
            "text,label\ncafé au lait,order\nhello,greet\n".encode("cp1252"),
            [
                "cp1252.csv:2: the line is not UTF-8 text (byte 0xE9 at column 4); save the file "
                'as UTF-8 (in Excel: "CSV UTF-8")'
            ],
        ),
        (  # no header: one problem for the file, not "field missing" for every row
            "no-header.csv",
            b"hello,greet\nbye,leave\nhi,greet\n",
            [
                "no-header.csv:1: the header has no 'text', 'label' column (it names ['hello', "
                "'greet']); the first line of a CSV file names the columns, e.g. text,label"
            ],
        ),
        (
            "unquoted.csv",
            b"text,label\nhello, world,greet\nbye,leave\n",
            [
                "unquoted.csv:2: more cells than the header (3, not 2) (a separator inside an "
                "unquoted text? quote the cell)"
            ],
        ),
        (
            "huge-cell.csv",
            b'text,label\n"' + b"x" * 140_000 + b'",greet\nbye,leave\n',
            ["huge-cell.csv:2: unreadable CSV (field larger than field limit (131072))"],
        ),
        (  # pathological nesting used to end in a RecursionError naming no line
            "nested.jsonl",
            b'{"text": "ok", "label": "a"}\n{"text": '
            + b"[" * 100_000
            + b"]" * 100_000
            + b', "label": "a"}\n',
            ["nested.jsonl:2: invalid JSON (nested too deeply)"],
        ),
        (
            "big-int.jsonl",
            b'{"text": "ok", "label": "a"}\n{"text": "x", "label": 1' + b"0" * 5000 + b"}\n",
            [
                "big-int.jsonl:2: invalid JSON (Exceeds the limit (4300 digits) for integer "
                "string conversion: value has 5001 digits; use sys.set_int_max_str_digits() to "
                "increase the limit)"
            ],
        ),
        (  # the column of a missing closing brace is the line's end, not "column 1"
            "no-brace.jsonl",
            b'{"text": "ok", "label": "a"}\n{"text": "world", "label": "b"\n',
            ["no-brace.jsonl:2: invalid JSON (Expecting ',' delimiter at column 31)"],
        ),
        (  # a JSON string is a row of the wrong kind, not an error message
            "string.jsonl",
            b'{"text": "ok", "label": "a"}\n"hello"\n',
            ["string.jsonl:2: row must be an object, got str"],
        ),
        (
            "utf16-no-bom.jsonl",
            '{"text": "ok", "label": "a"}\n'.encode("utf-16-le"),
            [
                "utf16-no-bom.jsonl:1: the file looks like UTF-16 text without a byte-order "
                'mark (NUL bytes); save the file as UTF-8 (in Excel: "CSV UTF-8")'
            ],
        ),
        (
            "float-label.jsonl",
            b'{"text": "ok", "label": "a"}\n{"text": "x", "label": NaN}\n',
            ["float-label.jsonl:2: field 'label' must be a string, got float nan"],
        ),
        (
            "infinite-text.jsonl",
            b'{"text": "ok", "label": "a"}\n{"text": -Infinity, "label": "a"}\n',
            ["infinite-text.jsonl:2: field 'text' must be a string, got float -inf"],
        ),
        (  # an integer label is its decimal text, held to the same length as a string label
            "long-int-label.jsonl",
            b'{"text": "ok", "label": "a"}\n{"text": "x", "label": ' + b"1" * 1500 + b"}\n",
            [
                "long-int-label.jsonl:2: field 'label' has 1500 characters (max 1000; a text "
                "in the label column?)"
            ],
        ),
        (  # json.loads would keep the last "label"; a CSV header naming a column twice is refused
            "repeated-key.jsonl",
            b'{"text": "ok", "label": "a"}\n{"text": "x", "label": "a", "label": "b"}\n',
            ["repeated-key.jsonl:2: the object names key 'label' more than once"],
        ),
    ],
)
def test_broken_files_name_the_actual_cause_with_file_and_line(
    tmp_path: Path, name: str, content: bytes, problems: list[str]
) -> None:
    path = tmp_path / name
    path.write_bytes(content)

    assert scan_file(path, task=CLS).problems == problems


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.binary(max_size=40), max_size=8), suffix=st.sampled_from(SUFFIXES))
def test_any_bytes_give_examples_or_one_line_problems_with_file_and_line(
    tmp_path_factory, lines: list[bytes], suffix: str
) -> None:
    path = tmp_path_factory.mktemp("bytes") / f"site{suffix}"
    path.write_bytes(b"\n".join(lines))

    for task in TASKS:
        report = scan_file(path, task=task)
        for problem in report.problems:
            assert re.match(rf"site{re.escape(suffix)}(:\d+)?: \S", problem), problem
            assert "\n" not in problem and len(problem) < 400, problem


def test_a_key_repeated_inside_a_nested_object_is_the_datas_own_business(
    tmp_path: Path,
) -> None:
    # Only the row's own keys are checked, as a CSV header's columns: training reads no
    # nested object, and a file that trained before must still train.
    path = tmp_path / "meta.jsonl"
    path.write_bytes(b'{"text": "ok", "label": "a", "meta": {"id": 1, "id": 2}}\n')

    report = scan_file(path, task="sequence-classification")

    assert [e.text for e in report.examples] == ["ok"] and not report.problems
