"""``fedlora site check`` and ``fedlora data split``, run in-process through server.cli."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import main
from tests.conftest import fedlora_killed_at

CLS = "sequence-classification"
ROOT = Path(__file__).resolve().parents[3]


def _squeezed(text: str) -> str:
    """Text without whitespace: the error console wraps long lines, even inside a path."""
    return "".join(text.split())


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return _jsonl(
        tmp_path / "good.jsonl",
        [
            {"text": "hello", "label": "greet"},
            {"text": "good morning", "label": "greet"},
            {"text": "bye", "label": "leave"},
        ],
    )


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    return _jsonl(
        tmp_path / "bad.jsonl",
        [
            {"text": "hello", "label": "greet"},
            {"label": "greet"},
            "{not json",
            {"text": "hi", "label": "shout"},
        ],
    )


# --- site check -------------------------------------------------------------------------


def test_check_a_good_file_exits_0_with_counts_and_lengths(
    good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["site", "check", "--data", str(good), "--task", CLS, "--labels", "greet,leave,x"])

    out = capsys.readouterr().out
    assert code == 0
    assert "good rows" in out and "valid" in out
    assert "greet" in out and "│    2 │" in out
    assert "│ x     │    0 │" in out  # in the run's set, absent from this site
    assert "median length (chars)" in out and "5" in out and "12" in out


def test_check_lists_every_problem_with_its_line_and_exits_1(
    bad: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["site", "check", "--data", str(bad), "--task", CLS, "--labels", "greet"])

    out = capsys.readouterr().out
    assert code == 1
    assert "3 problems:" in out
    assert "bad.jsonl:2: field 'text' is missing or empty (None)" in out
    assert "bad.jsonl:3: invalid JSON" in out
    assert "bad.jsonl:4: label 'shout' is not in the run's label set" in out


def test_check_json_is_machine_readable(bad: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["site", "check", "--data", str(bad), "--task", CLS, "--json"])

    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["valid"] is False
    assert report["good_rows"] == 2
    assert report["label_counts"] == {"greet": 1, "shout": 1}
    assert report["length_chars"] == {"min": 2.0, "median": 3.5, "mean": 3.5, "max": 5.0}
    assert [p.split(":")[1] for p in report["problems"]] == ["2", "3"]


def test_check_reads_the_label_set_from_a_file(
    tmp_path: Path, good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("greet\n\n")

    code = main(["site", "check", "--data", str(good), "--task", CLS, "--labels-file", str(labels)])

    assert code == 1
    assert "good.jsonl:3: label 'leave' is not in the run's label set" in capsys.readouterr().out


def test_check_a_causal_lm_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _jsonl(tmp_path / "lm.jsonl", [{"text": "once upon"}, {"prompt": "Q ", "response": "A"}])

    code = main(["site", "check", "--data", str(path), "--task", "causal-lm"])

    out = capsys.readouterr().out
    assert code == 0
    assert "labels" not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{tmp}/missing.jsonl", "--task", CLS], "missing.jsonl' does not exist"),
        (["--data", "{tmp}/good.txt", "--task", CLS], "must end in .jsonl or .csv"),
        (["--data", "{tmp}", "--task", CLS], "is a directory; expected a .jsonl or .csv file"),
        (["--data", "{good}", "--task", "translation"], "task='translation' is not supported"),
        (["--data", "{good}", "--task", CLS, "--labels", "a,a"], "--labels has duplicates: a"),
        (["--data", "{good}", "--task", CLS, "--labels", " , "], "--labels gives no labels"),
        (["--data", "{good}", "--task", CLS, "--labels-file", "{tmp}/no.txt"], "does not exist"),
        (["--data", "{good}", "--task", "causal-lm", "--labels", "a"], "apply to sequence-"),
    ],
)
def test_check_usage_errors_exit_2_with_one_line(
    tmp_path: Path,
    good: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    (tmp_path / "good.txt").write_text("x")
    argv = [a.format(tmp=tmp_path, good=good) for a in args]

    code = main(["site", "check", *argv])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and _squeezed(message) in _squeezed(err)


@pytest.mark.parametrize("max_length", ["-1", "0", "7"])
def test_check_refuses_a_max_length_training_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], max_length: str
) -> None:
    path = _jsonl(tmp_path / "lm.jsonl", [{"prompt": "Q ", "response": "A"}])

    code = main(["site", "check", "--data", str(path), "--task", "causal-lm",
                 "--max-length", max_length])  # fmt: skip

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: --max-length={max_length} must be >= 8")


def test_check_refuses_a_max_length_past_the_base_position_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _jsonl(tmp_path / "lm.jsonl", [{"prompt": "Q ", "response": "A"}])

    code = main(["site", "check", "--data", str(path), "--task", "causal-lm",
                 "--max-length", "513"])  # fmt: skip

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: max-length=513 exceeds the 512 tokens"), err


def test_check_accepts_the_smallest_max_length_training_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _jsonl(tmp_path / "lm.jsonl", [{"prompt": "Q ", "response": "A"}])

    code = main(["site", "check", "--data", str(path), "--task", "causal-lm", "--max-length", "8"])

    assert code == 0
    assert "valid" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (  # Latin-1, as an editor on Windows may save it
            b"x\n\xe9\n",
            "labels.txt:2: the line is not UTF-8 text (byte 0xE9 at column 1)",
        ),
        (b"x\n" + b"y" * 1001 + b"\n", "labels.txt:2: label 'yyyy"),
        (b"x\n\n\xed\xa0\x80\n", "labels.txt:3: the line is not UTF-8 text (byte 0xED"),
        ("x\n".encode("utf-16-le"), "labels.txt:1: the file looks like UTF-16 text without"),
    ],
)
def test_a_bad_labels_file_line_is_named_with_file_and_line(
    tmp_path: Path,
    good: Path,
    capsys: pytest.CaptureFixture[str],
    content: bytes,
    message: str,
) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_bytes(content)

    code = main(["site", "check", "--data", str(good), "--task", CLS, "--labels-file", str(labels)])

    err = _squeezed(capsys.readouterr().err)
    assert code == 2
    assert err.startswith(_squeezed(f"error: --labels-file {labels}:"))
    assert _squeezed(message) in err


def test_a_labels_file_is_read_as_data_files_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """UTF-16 with its byte-order mark and CRLF are read; a Unicode line separator inside a
    label (as a JSON string may hold one) does not split it."""
    labels = ["greet", "leave\u2028now"]
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "hi", "label": lab} for lab in labels])
    labels_file = tmp_path / "labels.txt"
    labels_file.write_bytes(("\ufeff" + "\r\n".join(labels) + "\r\n").encode("utf-16-le"))

    code = main(["site", "check", "--data", str(path), "--task", CLS, "--labels-file",
                 str(labels_file), "--json"])  # fmt: skip

    assert code == 0
    assert json.loads(capsys.readouterr().out)["label_counts"] == dict.fromkeys(labels, 1)


@pytest.mark.integration  # a real subprocess or model: seconds, kept out of the unit run
def test_check_and_split_import_no_torch(tmp_path: Path, good: Path) -> None:
    script = (
        "import sys; from server.cli import main; "
        f"assert main(['site', 'check', '--data', {str(good)!r}, '--task', {CLS!r}]) == 0; "
        f"assert main(['data', 'split', {str(good)!r}, '--sites', '2', '--alpha', '9', "
        f"'--out', {str(tmp_path / 'sites')!r}]) == 0; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


# --- data split -------------------------------------------------------------------------


@pytest.fixture
def src(tmp_path: Path) -> Path:
    rows = [
        {"text": f"t{i}", "label": "abc"[i % 3], "domain": ["bank", "travel", "home"][i % 3]}
        for i in range(30)
    ]
    return _jsonl(tmp_path / "all.jsonl", rows)


def test_split_writes_one_file_per_site_and_a_summary(
    tmp_path: Path, src: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sites"

    code = main(["data", "split", str(src), "--sites", "3", "--alpha", "1", "--out", str(out)])

    stdout = capsys.readouterr().out
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["site-01.jsonl", "site-02.jsonl", "site-03.jsonl"]
    written = sorted(line for name in names for line in (out / name).read_text().splitlines())
    assert written == sorted(src.read_text().splitlines())
    assert "distinct labels" in stdout and "site-03" in stdout and "wrote 3 files" in stdout


def test_split_by_column_from_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "all.csv"
    src.write_text("text,intent,domain\na,x,bank\nb,y,bank\nc,x,home\n")
    out = tmp_path / "sites"

    code = main(
        [
            *("data", "split", str(src), "--sites", "2", "--by", "domain"),
            *("--label-column", "intent", "--out", str(out)),
        ]
    )

    assert code == 0
    assert [json.loads(x)["text"] for x in (out / "site-01.jsonl").read_text().splitlines()] == [
        "a",
        "b",
    ]
    assert "by 'domain'" in capsys.readouterr().out


def test_split_refuses_a_non_empty_out_dir_then_force_replaces_it(
    tmp_path: Path, src: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sites"
    args = ["data", "split", str(src), "--alpha", "5", "--out", str(out)]
    assert main([*args, "--sites", "3"]) == 0
    capsys.readouterr()

    refused = main([*args, "--sites", "2"])
    err = capsys.readouterr().err
    forced = main([*args, "--sites", "2", "--force"])

    assert refused == 2
    assert _squeezed("sites' is not empty; pass --force") in _squeezed(err)
    assert forced == 0
    assert sorted(p.name for p in out.iterdir()) == ["site-01.jsonl", "site-02.jsonl"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sites", "1", "--alpha", "1"], "--sites 1 must be an integer of at least 2"),
        (["--sites", "2", "--alpha", "0"], "--alpha 0.0 must be a finite number above 0"),
        (["--sites", "4", "--by", "domain"], "--by 'domain': only 3 distinct values"),
        (["--sites", "2", "--by", "site"], "available: domain, label, text"),
        (["--sites", "2", "--alpha", "1", "--label-column", "y"], "column 'y' is not in"),
        (["--sites", "2", "--alpha", "1", "--seed", "-1"], "--seed -1 must be an integer >= 0"),
    ],
)
def test_split_usage_errors_exit_2_and_write_nothing(
    tmp_path: Path,
    src: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    out = tmp_path / "sites"

    code = main(["data", "split", str(src), *args, "--out", str(out)])

    assert code == 2
    assert _squeezed(message) in _squeezed(capsys.readouterr().err)
    assert not out.exists()


def test_split_a_missing_source_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = str(tmp_path / "no.jsonl")

    code = main(["data", "split", src, "--sites", "2", "--alpha", "1", "--out", str(tmp_path)])

    assert code == 2
    assert "no.jsonl'doesnotexist" in _squeezed(capsys.readouterr().err)


def test_split_names_the_file_and_line_of_a_missing_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "by.csv"
    src.write_text("text,label,domain\na,x,d1\nb,y,d2\nc,x,\nd,y,d1\n")

    code = main(
        ["data", "split", str(src), "--sites", "2", "--by", "domain", "--out", str(tmp_path / "o")]
    )

    assert code == 2
    assert _squeezed("error: by.csv:4: no value for column 'domain' (--by)") in _squeezed(
        capsys.readouterr().err
    )


def test_split_refuses_a_nan_label_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _jsonl(
        tmp_path / "nan.jsonl",
        ['{"text": "a", "label": "x"}', '{"text": "b", "label": NaN}'] * 2,
    )
    out = tmp_path / "sites"

    code = main(["data", "split", str(src), "--sites", "2", "--alpha", "1", "--out", str(out)])

    assert code == 2
    assert _squeezed("nan.jsonl:2:") in _squeezed(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.jsonl"]


def test_split_refuses_an_out_that_holds_the_source(
    tmp_path: Path, src: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sites"
    assert main(["data", "split", str(src), "--sites", "2", "--alpha", "5", "--out", str(out)]) == 0
    capsys.readouterr()
    again = out / "site-01.jsonl"
    before = again.read_text()

    code = main(
        ["data", "split", str(again), "--sites", "2", "--alpha", "5", "--out", str(out), "--force"]
    )

    assert code == 2
    err = _squeezed(capsys.readouterr().err)
    assert _squeezed(f"--out {str(out)!r} holds the source file {str(again)!r}") in err
    assert again.read_text() == before


@pytest.mark.integration  # a real subprocess that gets SIGTERM: a second
def test_split_stopped_by_sigterm_mid_write_exits_143_and_leaves_nothing(
    tmp_path: Path, src: Path
) -> None:
    # Arrange: `kill PID` arrives once the site files are written, before they are swapped in
    out = tmp_path / "sites"
    argv = ["data", "split", str(src), "--sites", "2", "--alpha", "1", "--out", str(out)]

    # Act
    done = fedlora_killed_at("clients.site.split:swap_directory", argv, timeout=60)

    # Assert: stopped as `fedlora train` is, and no partial temporary directory is left
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip() == "terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


def test_site_budget_reset_initialises_and_records_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    assert main(["site", "budget", "--state", str(state), "--reset"]) == 2
    assert "needs --reason" in capsys.readouterr().err
    args = ["site", "budget", "--state", str(state), "--reset", "--reason", "disk replaced"]
    assert main([*args, "--spent", "2.5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["spent_epsilon"] == 2.5 and report["runs"] == {}
    assert [(r["reason"], r["previous"]["state"]) for r in report["resets"]] == [
        ("disk replaced", "missing")
    ]
    assert main(["site", "budget", "--state", str(state)]) == 0
    assert "disk replaced" in capsys.readouterr().out


@pytest.mark.parametrize("budget", ["0", "nan", "-3"])
def test_a_site_budget_reset_with_a_bad_argument_leaves_the_ledger_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], budget: str
) -> None:
    # The reset ran before --max-epsilon was checked: the command failed, and the spent ε
    # was gone.
    state = ["site", "budget", "--state", str(tmp_path)]
    assert main([*state, "--reset", "--reason", "new", "--spent", "5"]) == 0
    before = (tmp_path / "privacy-ledger.json").read_bytes()
    capsys.readouterr()

    assert main([*state, "--reset", "--reason", "oops", "--max-epsilon", budget]) == 2

    assert f"--max-epsilon={float(budget)!r}" in capsys.readouterr().err
    assert (tmp_path / "privacy-ledger.json").read_bytes() == before


def test_check_prints_the_label_set_as_the_run_config_line_to_paste(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under flwr run the server sees no file: site check is where the label set comes from."""
    import shlex
    import tomllib

    from flwr.common.config import parse_config_args

    labels = ["billing, refunds", "it's", 'say "hi"']
    path = _jsonl(tmp_path / "s.jsonl", [{"text": f"row {i}", "label": lab}
                                         for i, lab in enumerate(labels)])  # fmt: skip

    assert main(["site", "check", "--data", str(path), "--task", CLS]) == 0

    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    pyproject = next(line for line in lines if line.startswith("labels = "))
    expected = '["billing, refunds", "it\\u0027s", "say \\"hi\\""]'
    assert tomllib.loads(pyproject)["labels"] == expected
    flwr = next(line for line in lines if line.startswith("flwr run"))
    (word,) = shlex.split(flwr.split("--run-config ", 1)[1])
    assert parse_config_args([word])["labels"] == tomllib.loads(pyproject)["labels"]
    assert main(["site", "check", "--data", str(path), "--task", CLS, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run_config"]["line"] == pyproject


def _strict_json(text: str) -> dict:
    def refuse(constant: str) -> float:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("stated", ["", ', "total_epsilon": NaN', ', "total_epsilon": "2"'])
def test_site_budget_json_is_valid_json_without_a_valid_stated_total(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stated: str
) -> None:
    # A ledger with no (or a NaN) total_epsilon printed "stored_total_epsilon": NaN, which
    # jq and every strict JSON parser reject.
    (tmp_path / "privacy-ledger.json").write_text('{"runs": {}' + stated + "}")
    assert main(["site", "budget", "--state", str(tmp_path), "--json"]) == 0
    report = _strict_json(capsys.readouterr().out)
    assert report["stored_total_epsilon"] is None
    assert "states no valid total ε" in report["warning"]


@pytest.mark.parametrize(
    "resets", [["a string"], [{"previous": "x"}], [{"opening_epsilon": "a"}], "abc"]
)
def test_site_budget_shows_reset_records_of_any_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], resets: object
) -> None:
    # The site trains on such a ledger (it never reads its resets); showing it must not
    # end in "error: AttributeError: 'str' object has no attribute 'get'".
    ledger = {"runs": {}, "total_epsilon": 0.0, "resets": resets}
    (tmp_path / "privacy-ledger.json").write_text(json.dumps(ledger))
    assert main(["site", "budget", "--state", str(tmp_path)]) == 0
    assert "spent ε 0" in capsys.readouterr().out
