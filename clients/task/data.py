"""Site data: JSONL and CSV files of text examples, and their validation.

Two tasks are supported:

- ``sequence-classification``: every row has ``text`` and ``label``; the label must be in
  the run's label set, so every site's classifier head has the same shape.
- ``causal-lm``: every row has ``text``, or ``prompt`` and ``response`` (the loss is then
  taken on the response tokens only).

`scan_file` reads a whole file and reports every problem with its line number; `load_examples`
returns the examples or raises `DataError` naming the first problem and how many there are.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clients.task.errors import DataError
from clients.task.files import write_atomic

TASKS = ("sequence-classification", "causal-lm")
SUFFIXES = (".jsonl", ".csv")
# Longer texts are truncated by the tokenizer anyway; a row this long is almost always a
# broken file (a whole document in one cell), so it is reported rather than silently cut.
MAX_TEXT_CHARS = 100_000


@dataclass(frozen=True)
class Example:
    """One training example; `label` for classification, `prompt`/`response` for LM."""

    text: str
    label: str | None = None
    prompt: str | None = None
    response: str | None = None


@dataclass
class DataReport:
    """What `scan_file` found: the good examples, label counts, lengths and problems."""

    path: Path
    task: str
    examples: list[Example] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def label_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(e.label for e in self.examples if e.label).items()))

    @property
    def length_stats(self) -> dict[str, float]:
        lengths = [len(e.text) for e in self.examples]
        if not lengths:
            return {}
        return {
            "min": float(min(lengths)),
            "median": float(statistics.median(lengths)),
            "mean": float(statistics.fmean(lengths)),
            "max": float(max(lengths)),
        }


def check_task(task: str) -> str:
    if task not in TASKS:
        raise DataError(f"task={task!r} is not supported; expected one of {', '.join(TASKS)}")
    return task


def _rows(path: Path) -> Iterator[tuple[int, object]]:
    """Yield (line number, parsed row) pairs; a row that does not parse is yielded as str."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield lineno, f"invalid JSON ({exc.msg})"
    else:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None:
                return
            for row in reader:
                # DictReader counts physical lines; +0 keeps the header as line 1.
                yield reader.line_num, row


def read_rows(path: Path, *, what: str) -> Iterator[tuple[int, object]]:
    """(line number, row) pairs of a JSONL or CSV file; an unparsable JSON line is a str.

    Raises:
        DataError: Naming `what` and the path if the file is missing, has another suffix,
            is not UTF-8 or is not valid CSV.
    """
    if not path.is_file():
        raise DataError(f"{what} {str(path)!r} does not exist")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{what} {str(path)!r} must end in .jsonl or .csv")
    try:
        yield from _rows(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {str(path)!r} is not UTF-8 text ({exc.reason})") from exc
    except csv.Error as exc:
        raise DataError(f"{what} {str(path)!r} is not valid CSV ({exc})") from exc


def _field(row: dict, name: str) -> str | None:
    value = row.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"field {name!r} must be a string, got {type(value).__name__} {value!r}")
    return value


def _parse_row(row: object, *, task: str, labels: Sequence[str] | None) -> Example:
    """Turn one parsed row into an Example or raise ValueError/TypeError saying why."""
    if isinstance(row, str):
        raise ValueError(row)
    if not isinstance(row, dict):
        raise TypeError(f"row must be an object, got {type(row).__name__}")
    text, prompt, response = _field(row, "text"), _field(row, "prompt"), _field(row, "response")
    if task == "sequence-classification":
        if not text or not text.strip():
            raise ValueError(f"field 'text' is missing or empty ({text!r})")
        label = row.get("label")
        if label is None or label == "":
            raise ValueError("field 'label' is missing or empty")
        label = str(label)
        if labels is not None and label not in labels:
            raise ValueError(f"label {label!r} is not in the run's label set")
        example = Example(text=text, label=label)
    else:
        if prompt is not None or response is not None:
            if not prompt or not response:
                raise ValueError("fields 'prompt' and 'response' must both be non-empty")
            example = Example(text=prompt + response, prompt=prompt, response=response)
        elif text and text.strip():
            example = Example(text=text)
        else:
            raise ValueError("needs a non-empty 'text', or 'prompt' and 'response'")
    if len(example.text) > MAX_TEXT_CHARS:
        raise ValueError(f"text has {len(example.text)} characters (max {MAX_TEXT_CHARS})")
    return example


def scan_file(path: str | Path, *, task: str, labels: Sequence[str] | None = None) -> DataReport:
    """Read a site data file and report every problem in it.

    Args:
        path: A ``.jsonl`` or ``.csv`` file.
        task: ``sequence-classification`` or ``causal-lm``.
        labels: The run's label set; None accepts any label.

    Raises:
        DataError: If the file is missing, has an unsupported suffix or cannot be read.
    """
    path = Path(path)
    check_task(task)
    report = DataReport(path=path, task=task)
    for lineno, row in read_rows(path, what="data file"):
        try:
            report.examples.append(_parse_row(row, task=task, labels=labels))
        except (ValueError, TypeError) as exc:
            report.problems.append(f"{path.name}:{lineno}: {exc}")
    if not report.examples and not report.problems:
        report.problems.append(f"{path.name}: the file has no examples")
    return report


def load_examples(
    path: str | Path, *, task: str, labels: Sequence[str] | None = None
) -> list[Example]:
    """Load a site data file, refusing it whole if any row is bad.

    Raises:
        DataError: Naming the file, the first bad line and the number of problems.
    """
    report = scan_file(path, task=task, labels=labels)
    if report.problems:
        more = len(report.problems) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise DataError(f"{report.problems[0]}{suffix}")
    return report.examples


def labels_in(paths: Sequence[str | Path]) -> list[str]:
    """The sorted union of labels in classification files (used to fix a run's label set)."""
    found: set[str] = set()
    for path in paths:
        found.update(
            e.label for e in load_examples(path, task="sequence-classification") if e.label
        )
    return sorted(found)


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    """Write rows as JSONL with `write_atomic`, so readers never see half a file."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_atomic(path, text.encode("utf-8"))
