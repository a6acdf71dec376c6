"""The label set: exact labels, one rule, one way to write the set for every config layer."""

from __future__ import annotations

import shlex
import subprocess
import tomllib

import pytest
from flwr.common.config import parse_config_args
from hypothesis import given
from hypothesis import strategies as st

from clients.task.errors import ConfigError
from clients.task.labels import (
    check_label,
    format_label_set,
    parse_label_set,
    run_config_arg,
    run_config_line,
)

# Labels a data file can hold, and that once broke a layer (the comma split the set).
AWKWARD = [
    "billing, refunds",
    'say "hi"',
    "it's",
    "a=b",
    "back\\slash",
    "trailing\\",
    " leading space",
    "trailing space ",
    "100% sure",
    "$HOME `date` !1",
    "日本語 ✓",
    "emoji 😀",
    "tab\there",
    "two\nlines",
    "x" * 900,
]

# Any non-blank, encodable label of the length a label may have.
labels_strategy = st.lists(
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40).filter(
        lambda s: s.strip()
    ),
    min_size=1,
    max_size=6,
    unique=True,
)


def test_the_awkward_labels_are_all_valid() -> None:
    assert [check_label(label) for label in AWKWARD] == AWKWARD


@given(labels=labels_strategy)
def test_every_written_form_reads_back_to_the_same_labels(labels: list[str]) -> None:
    # The TOML array itself (fedlora train --set labels=[...] and the Python API).
    assert parse_label_set(format_label_set(labels)) == tuple(labels)
    assert parse_label_set(tomllib.loads(f"v = {format_label_set(labels)}")["v"]) == tuple(labels)
    # A pyproject.toml or run-config file line: the array inside a literal string.
    line = tomllib.loads(run_config_line(labels))
    assert parse_label_set(line["labels"]) == tuple(labels)
    # flwr run --run-config "...": split by a POSIX shell, then by Flower's own parser.
    (word,) = shlex.split(run_config_arg(labels))
    assert parse_label_set(parse_config_args([word])["labels"]) == tuple(labels)


def test_the_awkward_labels_survive_a_real_shell_and_flower() -> None:
    # bash, not shlex: $, backquotes and ! mean something to a real shell.
    script = f"printf '%s' {run_config_arg(AWKWARD)}"
    word = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert parse_label_set(parse_config_args([word.stdout])["labels"]) == tuple(AWKWARD)


@pytest.mark.parametrize(
    ("value", "labels"),
    [
        ("a,b,c", ("a", "b", "c")),  # the old comma form, where it is unambiguous
        ('["billing, refunds", "cancel"]', ("billing, refunds", "cancel")),
        (["billing, refunds", "cancel"], ("billing, refunds", "cancel")),
        ("", ()),
        (" , ", ()),
    ],
)
def test_label_set_forms(value: object, labels: tuple[str, ...]) -> None:
    assert parse_label_set(value) == labels  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        # The report: a comma-space is a label's or a separator; refused with the fix.
        (
            "billing, refunds, cancel",
            'ambiguous .* labels = \'\\["billing", "refunds", "cancel"\\]\'',
        ),
        ("a,,b", "ambiguous"),
        ('["a", 3.5]', "label 3.5 must be a string"),
        ('["a", "  "]', "label '  ' is empty"),
        ('["a", "a"]', "has duplicates: a"),
        ("[not toml", "is not a TOML array of strings"),
        ('["a", 1' + "0" * 5000 + "]", "is not a TOML array of strings"),  # 4,300 digits
        ("[" * 100_000, "is not a TOML array of strings"),  # RecursionError
        (["a", "x" * 1001], "has 1001 characters"),
        (["a", int("1" * 1001)], "has 1001 characters"),  # a JSON integer's text too
        (["a", "\ud800"], "lone surrogate U\\+D800"),
    ],
)
def test_bad_label_sets_name_the_key_and_the_cause(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^labels.*{message}"):
        parse_label_set(value)  # type: ignore[arg-type]


def test_an_ambiguous_flag_value_suggests_a_flag_to_paste_not_a_config_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_label_set("a, c", key="--labels")
    assert """--labels '["a", "c"]', or --labels '["a, c"]' for a single label""" in str(
        caught.value
    )


def test_a_json_integer_label_is_its_text_as_in_csv() -> None:
    assert check_label(3) == "3"
    with pytest.raises(ValueError, match="must be a string, got bool"):
        check_label(True)
