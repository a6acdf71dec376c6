"""What a text value must be for every layer to accept it, and how to name a bad one.

JSON, and so a JSONL row, a run config written by a program or an HTTP body, can carry a
lone UTF-16 surrogate (``"\\ud800"``): Python keeps it in a ``str``, but it has no UTF-8
encoding, so tokenizers, protobuf (Flower's messages), MLflow and UTF-8 JSON writers all
refuse it, each with its own error. `unencodable` is the one rule for that: site check,
training and evaluation read data through `clients.task.data`, which applies it to every
field; the run's label set is checked with it (`clients.task.labels`), and the edge node
checks request texts with it.

    problem = unencodable(text)    # None, or "holds a lone surrogate U+D800 at character 3"
"""

from __future__ import annotations

import reprlib

_SHORT = reprlib.Repr()
_SHORT.maxstring = 60
_SHORT.maxother = 60
_SHORT.maxlevel = 2


def unencodable(text: str) -> str | None:
    """Why ``text`` has no UTF-8 encoding (the first bad character), or None if it has one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(text[exc.start])
        return (
            f"holds a lone surrogate U+{bad:04X} at character {exc.start}, which is not "
            "valid Unicode text"
        )
    return None


def short(value: object) -> str:
    """A bounded ``repr`` for error messages: long strings cut, deep nesting elided.

    A data row may hold megabytes or thousands of nested lists; an error naming it must
    stay one readable line and must not recurse.
    """
    return _SHORT.repr(value)
