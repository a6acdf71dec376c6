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

import codecs
import csv
import io
import json
import statistics
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clients.task.errors import DataError
from clients.task.files import write_atomic
from clients.task.labels import check_label
from clients.task.text import short, unencodable

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
    lines: list[int] = field(default_factory=list)  # the line of each example

    def summary(self) -> str:
        """The first problem (file:line: reason) and how many more there are."""
        more = len(self.problems) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        return f"{self.problems[0]}{suffix}"

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


@dataclass(frozen=True)
class BadRow:
    """A row (or line) that could not be read, and why; `read_rows` yields it in place."""

    reason: str


@dataclass(frozen=True)
class Header:
    """The columns a CSV file's first line names (as `read_rows` keys its rows)."""

    columns: tuple[str, ...]


# Fields fedlora reads; a CSV header may spell them in another case (``Text``, ``LABEL``).
FIELDS = ("text", "label", "prompt", "response")
# Spreadsheet programs write CSV with the list separator of the user's locale.
DELIMITERS = (",", ";", "\t", "|")
_BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_SAVE_UTF8 = 'save the file as UTF-8 (in Excel: "CSV UTF-8")'


def _physical_lines(raw: bytes) -> tuple[list[tuple[str, str | None]], str | None]:
    """The file's lines (with their endings), each decoded, with why it could not be.

    A UTF-8 or UTF-16 byte-order mark is honoured and dropped. Lines split on \\n, \\r\\n
    and \\r (old Mac spreadsheets), never on Unicode separators a JSON string may hold.
    Returns (lines, None), or ([], why) when a UTF-16 file does not decode.
    """
    encoding = "utf-8"
    for bom, name in _BOMS:
        if raw.startswith(bom):
            raw, encoding = raw[len(bom) :], name
            break
    head = raw[:1024]
    if encoding == "utf-8" and head.count(0) * 4 >= len(head) > 0:
        # ASCII text saved as UTF-16 without its byte-order mark: every other byte is NUL.
        return [], f"looks like UTF-16 text without a byte-order mark (NUL bytes); {_SAVE_UTF8}"
    if encoding != "utf-8":
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as exc:
            return [], f"is not valid UTF-16 text ({exc.reason} at byte {exc.start})"
        return [(line, None) for line in io.StringIO(text, newline="")], None
    lines: list[tuple[str, str | None]] = []
    for chunk in raw.splitlines(keepends=True):
        try:
            lines.append((chunk.decode("utf-8"), None))
        except UnicodeDecodeError as exc:
            byte = chunk[exc.start]
            why = f"is not UTF-8 text (byte 0x{byte:02X} at column {exc.start + 1}); "
            lines.append((chunk.decode("utf-8", errors="replace"), why + _SAVE_UTF8))
    return lines, None


def _json_rows(lines: list[tuple[str, str | None]]) -> Iterator[tuple[int, object]]:
    for lineno, (line, undecodable) in enumerate(lines, start=1):
        if undecodable:
            yield lineno, BadRow(f"the line {undecodable}")
            continue
        if not line.strip():
            continue
        yield lineno, _json_row(line)


class _Object(dict[str, object]):
    """A JSON object, with the first key it names twice (json.loads alone keeps the last
    value without a word)."""

    repeated: str | None = None


def _object(pairs: list[tuple[str, object]]) -> _Object:
    obj = _Object(pairs)
    seen: set[str] = set()
    for key, _ in pairs if len(obj) < len(pairs) else ():
        if key in seen:
            obj.repeated = key
            break
        seen.add(key)
    return obj


def _json_row(line: str) -> object:
    line = line.rstrip("\r\n")  # with its line break, an error at the end says "column 1"
    try:
        row = json.loads(line, object_pairs_hook=_object)
        # The row's own keys only, as a CSV header's columns: nested objects are the
        # data's own business (training reads none of them).
        if isinstance(row, _Object) and row.repeated is not None:
            return BadRow(f"the object names key {short(row.repeated)} more than once")
        return row
    except json.JSONDecodeError as exc:
        hint = " (NUL bytes: a UTF-16 file without its byte-order mark?)" if "\x00" in line else ""
        return BadRow(f"invalid JSON ({exc.msg} at column {exc.colno}){hint}")
    except RecursionError:
        return BadRow("invalid JSON (nested too deeply)")
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        return BadRow(f"invalid JSON ({exc})")


def _delimiter(header: str) -> str:
    """The separator that splits the header line into the most columns (ties: comma)."""
    counts = {d: len(next(csv.reader([header], delimiter=d), [])) for d in DELIMITERS}
    return max(DELIMITERS, key=lambda d: (counts[d], d == ","))


def _columns(cells: list[str]) -> tuple[str, ...]:
    """Header cells as keys: trimmed, and fedlora's fields in lower case."""
    out = []
    for cell in cells:
        name = cell.strip()
        out.append(name.lower() if name.lower() in FIELDS else name)
    return tuple(out)


def _csv_rows(lines: list[tuple[str, str | None]]) -> Iterator[tuple[int, object]]:
    """Header first, then (first line of the record, row dict or BadRow)."""
    first = next((i for i, (line, _) in enumerate(lines) if line.strip()), None)
    if first is None:
        return
    line, undecodable = lines[first]
    if undecodable:
        yield first + 1, BadRow(f"the header line {undecodable}")
        return
    delimiter = _delimiter(line)
    reader = csv.reader((text for text, _ in lines[first:]), delimiter=delimiter)
    columns = _columns(next(reader))
    # Unnamed columns (trailing separators, as spreadsheets write them) are left out.
    repeated = sorted({c for c in columns if c and columns.count(c) > 1})
    if repeated:
        yield first + 1, BadRow(f"the header names column(s) {repeated} more than once")
        return
    yield first + 1, Header(columns)
    done = 1  # physical lines the reader has consumed
    while True:
        start = first + done + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            done = reader.line_num
            yield start, BadRow(f"unreadable CSV ({exc})")
            continue
        done = reader.line_num
        why = next((w for _, w in lines[start - 1 : first + done] if w), None)
        if why:
            yield start, BadRow(f"the line {why}")
        elif not any(cell.strip() for cell in cells):
            continue  # a blank line, or a row of empty cells as spreadsheets write them
        elif len(cells) != len(columns):
            more = len(cells) > len(columns)
            hint = " (a separator inside an unquoted text? quote the cell)" if more else ""
            why = f"{'more' if more else 'fewer'} cells than the header"
            yield start, BadRow(f"{why} ({len(cells)}, not {len(columns)}){hint}")
        else:
            yield start, {c: v for c, v in zip(columns, cells, strict=True) if c}


def not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as a data file (nothing there, or a directory), or None."""
    if path.is_file():
        return None
    if path.is_dir():
        return f"is a directory; expected a {' or '.join(SUFFIXES)} file"
    return "does not exist"


def read_rows(path: Path, *, what: str) -> Iterator[tuple[int, object]]:
    """(line number, row) pairs of a JSONL or CSV file.

    A row is whatever the JSON line holds (`scan_file` checks that it is an object), or a
    dict keyed by the CSV header's columns; a line that cannot be read is a `BadRow`
    naming the cause. A CSV file yields its `Header` first. Spreadsheet exports are read
    as they come: a UTF-8 or UTF-16 byte-order mark, ``;``, tab or ``|`` separators,
    CRLF or CR line ends, rows of empty cells, and field names in another case.

    Raises:
        DataError: Naming `what` and the path if the file is missing, is a directory or has
            another suffix.
    """
    if why := not_a_file(path):
        raise DataError(f"{what} {str(path)!r} {why}")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{what} {str(path)!r} must end in .jsonl or .csv")
    lines, why = _physical_lines(path.read_bytes())
    if why:
        yield 1, BadRow(f"the file {why}")
        return
    yield from (_json_rows(lines) if path.suffix == ".jsonl" else _csv_rows(lines))


def text_lines(path: Path) -> Iterator[tuple[int, str | BadRow]]:
    """(line number, line without its line end) of a text file, decoded as data files are
    (`read_rows`); a line that does not decode is a `BadRow` naming the cause, and a file
    that does not decode at all is one `BadRow` for line 1. Blank lines are kept.
    """
    lines, why = _physical_lines(path.read_bytes())
    if why:
        yield 1, BadRow(f"the file {why}")
        return
    for lineno, (line, undecodable) in enumerate(lines, start=1):
        yield lineno, BadRow(f"the line {undecodable}") if undecodable else line.rstrip("\r\n")


def _field(row: dict, name: str) -> str | None:
    value = row.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        kind = type(value).__name__
        raise TypeError(f"field {name!r} must be a string, got {kind} {short(value)}")
    if problem := unencodable(value):
        raise ValueError(f"field {name!r} {problem}")
    return value


def _label(row: dict, labels: Sequence[str] | None) -> str:
    value = row.get("label")
    if value is None or value == "":
        raise ValueError("field 'label' is missing or empty")
    try:
        label = check_label(value)
    except ValueError as exc:
        raise ValueError(f"field 'label' {exc}") from None
    if labels is not None and label not in labels:
        hint = ""
        if "," in label or label != label.strip():
            hint = (
                "; a label with commas or edge spaces needs the run's labels as a TOML "
                "array (`fedlora site check` prints the line)"
            )
        raise ValueError(f"label {short(label)} is not in the run's label set{hint}")
    return label


def _parse_row(row: object, *, task: str, labels: Sequence[str] | None) -> Example:
    """Turn one parsed row into an Example or raise ValueError/TypeError saying why."""
    if isinstance(row, BadRow):
        raise ValueError(row.reason)
    if not isinstance(row, dict):
        raise TypeError(f"row must be an object, got {type(row).__name__}")
    text, prompt, response = _field(row, "text"), _field(row, "prompt"), _field(row, "response")
    if task == "sequence-classification":
        if not text or not text.strip():
            raise ValueError(f"field 'text' is missing or empty ({short(text)})")
        example = Example(text=text, label=_label(row, labels))
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


def _header_problem(columns: tuple[str, ...], task: str) -> str | None:
    """Why a CSV header cannot serve ``task`` (named once, not as a problem per row)."""
    if task == "sequence-classification":
        missing = [c for c in ("text", "label") if c not in columns]
        example = "text,label"
    elif "text" in columns or {"prompt", "response"} <= set(columns):
        missing = []
    else:
        missing = ["text"] if "prompt" not in columns else ["response"]
        example = "text  (or prompt,response)"
    if not missing:
        return None
    names = ", ".join(repr(c) for c in missing)
    return (
        f"the header has no {names} column (it names {list(columns)}); the first line of a "
        f"CSV file names the columns, e.g. {example}"
    )


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
        if isinstance(row, Header):
            if problem := _header_problem(row.columns, task):
                report.problems.append(f"{path.name}:{lineno}: {problem}")
                return report
            continue
        try:
            report.examples.append(_parse_row(row, task=task, labels=labels))
        except (ValueError, TypeError) as exc:
            report.problems.append(f"{path.name}:{lineno}: {exc}")
        else:
            report.lines.append(lineno)
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
        raise DataError(report.summary())
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
