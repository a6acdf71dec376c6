"""A run's label set: one rule for a label, one way to read the set and to write it down.

A label is an exact string: whatever a data file holds (commas, quotes, ``=``,
backslashes, leading or trailing spaces, any Unicode) is the label, unchanged, in every
layer (run config, Flower messages, MLflow, provenance, edge answers). `check_label`
is the rule a label must meet; data rows (`clients.task.data`) and the run config both
apply it.

In the run config the set is a TOML array of strings. Flower's run config holds only
scalars, so under ``flwr run`` (and in pyproject.toml) the array travels inside a TOML
literal string; `fedlora train --set` also takes the bare array::

    labels = '["billing, refunds", "cancel"]'          # pyproject.toml, --run-config
    fedlora train --set 'labels=["billing, refunds", "cancel"]'

`format_label_set` writes the array so that it survives both, and a shell's double quotes
(`run_config_line`, `run_config_arg`): every quote, backslash, ``!``, ``$``, backquote
and non-printable character inside a label is a TOML ``\\u`` escape. The old
comma-separated form (``labels = "a,b,c"``) is still read when it is unambiguous: no
empty item and no space around a comma, which a label could hold.
"""

from __future__ import annotations

import tomllib
from collections import Counter
from collections.abc import Sequence

from clients.task.errors import ConfigError
from clients.task.text import short, unencodable

# A longer "label" is almost always a text in the label column (swapped columns); it is
# reported rather than becoming a class of its own.
MAX_LABEL_CHARS = 1000
# Characters written as \u escapes inside a label's TOML string: the quote that closes the
# enclosing literal string, and what a shell interprets inside double quotes.
_ESCAPED = {"'", "!", "$", "`"}


def check_label(value: object) -> str:
    """The label a data row's (or the run config's) value stands for.

    A string is the label as is; an integer (JSON ``3``) is its decimal text, as a CSV
    file would hold it, and meets the same rule.

    Raises:
        ValueError: Saying why the value is no label (type, blank, not valid Unicode,
            too long).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {type(value).__name__} {short(value)}")
    if not value.strip():
        raise ValueError(f"is empty ({short(value)})")
    if problem := unencodable(value):
        raise ValueError(problem)
    if len(value) > MAX_LABEL_CHARS:
        raise ValueError(
            f"has {len(value)} characters (max {MAX_LABEL_CHARS}; a text in the label column?)"
        )
    return value


def parse_label_set(value: str | Sequence[str], *, key: str = "labels") -> tuple[str, ...]:
    """A label set from the run config: a TOML array (as a list or as its text), or the
    unambiguous comma-separated form. Blank means no set (an empty tuple).

    Raises:
        ConfigError: Naming ``key`` and the value, for a malformed array, an ambiguous
            comma list, a bad label or a duplicate.
    """
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return ()
        if text.startswith("["):
            try:
                items = tomllib.loads(f"v = {text}")["v"]
            except (ValueError, RecursionError) as exc:  # TOMLDecodeError, an int of over
                # 4,300 digits, arrays nested past the parser's recursion limit
                raise ConfigError(
                    f"{key}={short(value)} is not a TOML array of strings ({exc})"
                ) from None
        else:
            items = _comma_items(value, key=key)
    else:
        items = value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{key}={short(value)} must be a TOML array of strings")
    labels = []
    for item in items:
        try:
            labels.append(check_label(item))
        except ValueError as exc:
            raise ConfigError(f"{key}: label {short(item)} {exc}") from None
    duplicates = sorted(label for label, n in Counter(labels).items() if n > 1)
    if duplicates:
        raise ConfigError(f"{key} has duplicates: {', '.join(map(_shown, duplicates))}")
    return tuple(labels)


def _shown(label: str) -> str:
    """A label in a list of them: bare when that is unambiguous, else quoted."""
    plain = label.isprintable() and label == label.strip() and not set(label) & set(",'\"")
    return label if plain and len(label) <= 60 else short(label)


def _comma_items(value: str, *, key: str) -> list[str]:
    items = value.split(",")
    if all(not item.strip() for item in items):
        return []
    if any(not item or item != item.strip() for item in items):
        guess = [item.strip() for item in items if item.strip()]
        raise ConfigError(
            f"{key}={short(value)} is ambiguous (a label may hold commas and spaces); write "
            f"the set as a TOML array: {_written(guess, key=key)}, or "
            f"{_written([value.strip()], key=key)} for a single label"
        )
    return items


def _written(labels: Sequence[str], *, key: str) -> str:
    """How to write ``labels`` for ``key``: a run-config line, or for a command-line flag
    (``--labels``) the flag and one single-quoted shell word, ready to paste."""
    if key.startswith("--"):
        return f"{key} '{format_label_set(labels)}'"  # the array holds no ' (format_label_set)
    return run_config_line(labels, key=key)


def toml_string(label: str) -> str:
    """A TOML basic string holding ``label`` exactly; its text has no ``'``, ``!``, ``$``,
    backquote or non-printable character (they are ``\\u`` escapes)."""
    out = []
    for ch in label:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch in _ESCAPED or not ch.isprintable():
            code = ord(ch)
            out.append(f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def format_label_set(labels: Sequence[str]) -> str:
    """The set as a TOML array whose text holds no ``'``, ``!``, ``$`` or backquote."""
    return "[" + ", ".join(toml_string(label) for label in labels) + "]"


def run_config_line(labels: Sequence[str], *, key: str = "labels") -> str:
    """The line for pyproject.toml or a run-config TOML file: ``labels = '[...]'``."""
    return f"{key} = '{format_label_set(labels)}'"


def run_config_arg(labels: Sequence[str], *, key: str = "labels") -> str:
    """One shell word (double-quoted) for ``flwr run --run-config``: ``"labels='[...]'"``.

    Inside a shell's double quotes only ``"`` and ``\\`` of the array need a backslash;
    the array holds no ``$``, backquote or ``!`` (`format_label_set`).
    """
    pair = f"{key}='{format_label_set(labels)}'"
    return '"' + pair.replace("\\", "\\\\").replace('"', '\\"') + '"'
