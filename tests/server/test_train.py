"""``fedlora train``'s site files: each file's stem is a site id, valid and its own."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from clients.task.errors import ConfigError, DataError
from clients.task.labels import parse_label_set
from server.train import build_train_config, checked_run, site_files

ROW = '{"text": "hello", "label": "a"}\n'


def _sites(tmp_path: Path, *names: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
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


def test_a_directory_of_subdirectories_names_them(tmp_path: Path) -> None:
    _sites(tmp_path / "sites", "a.jsonl")
    (tmp_path / "eval.txt").write_text("not a site file")

    with pytest.raises(ConfigError, match=r"no \.jsonl or \.csv files at its top level.*'sites'"):
        site_files(tmp_path)


def test_subdirectories_beside_site_files_are_named_as_not_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _sites(tmp_path, "a.jsonl")
    _sites(tmp_path / "more", "b.jsonl")
    (tmp_path / ".cache").mkdir()  # hidden: no site puts data there

    assert [p.name for p in site_files(tmp_path)] == ["a.jsonl"]

    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert "'more'" in record.getMessage() and ".cache" not in record.getMessage()


@pytest.mark.parametrize("name", ["S2.JSONL", "s3.Csv"])
def test_a_site_file_suffix_in_other_case_is_refused_not_skipped(tmp_path: Path, name: str) -> None:
    # It was left out of the run without a word: one site fewer than the admin meant.
    _sites(tmp_path, "a.jsonl", name)

    with pytest.raises(ConfigError, match=f"'{name}' is not read as a site file"):
        site_files(tmp_path)


def test_a_json_file_beside_site_files_is_named_as_not_a_site(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _sites(tmp_path, "a.jsonl", "s3.json")

    assert [p.name for p in site_files(tmp_path)] == ["a.jsonl"]

    (record,) = caplog.records
    assert "'s3.json'" in record.getMessage() and record.levelname == "WARNING"


def _config(tmp_path: Path, eval_file: Path | None, **overrides: object) -> dict:
    config, _ = build_train_config(
        sites=site_files(tmp_path),
        rounds=1,
        out=tmp_path / "out",
        eval_file=eval_file,
        task=None,
        overrides=dict(overrides),
        resume=False,
    )
    return config


def test_the_eval_file_must_not_be_a_site_file(tmp_path: Path) -> None:
    sites = _sites(tmp_path / "data", "a.jsonl", "eval.jsonl")

    # The same file by another spelling of its path is still the same file.
    with pytest.raises(ConfigError, match=r"--eval '.*/data/\.\./data/eval\.jsonl' is site file "):
        _config(sites, tmp_path / "data" / ".." / "data" / "eval.jsonl")


def test_an_eval_file_set_in_the_run_config_gets_the_same_check(tmp_path: Path) -> None:
    sites = _sites(tmp_path / "data", "a.jsonl", "eval.jsonl")
    with pytest.raises(ConfigError, match=r"^eval-file '.*/eval\.jsonl' is site file "):
        build_train_config(
            sites=site_files(sites), rounds=1, out=tmp_path / "out", eval_file=None, task=None,
            overrides={"eval-file": str(sites / "eval.jsonl")}, resume=False,
        )  # fmt: skip


@pytest.mark.parametrize("given_as", ["--eval", "eval-file"])
def test_a_label_only_the_eval_file_holds_is_kept_with_a_warning_naming_its_source(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, given_as: str
) -> None:
    sites = _sites(tmp_path / "sites", "a.jsonl")
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(ROW + '{"text": "hi", "label": "only in eval"}\n')

    if given_as == "--eval":
        config = _config(sites, eval_file)
    else:
        config = _config(sites, None, **{"eval-file": str(eval_file)})

    assert parse_label_set(config["labels"]) == ("a", "only in eval")
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert "'only in eval'" in record.getMessage()
    assert f"only in {given_as} {str(eval_file)!r}" in record.getMessage()
    other = "eval-file" if given_as == "--eval" else "--eval"
    assert other not in record.getMessage().replace(str(eval_file), "")


def test_no_warning_when_every_eval_label_is_a_sites(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sites = _sites(tmp_path / "sites", "a.jsonl")
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(ROW)

    assert parse_label_set(_config(sites, eval_file)["labels"]) == ("a",)
    assert not caplog.records


def test_an_eval_directory_is_named_as_one(tmp_path: Path) -> None:
    sites = _sites(tmp_path / "sites", "a.jsonl")

    with pytest.raises(ConfigError, match=r"--eval '.*sites' is a directory; expected a \.jsonl"):
        _config(sites, sites)


BAD_TEXT = '{"text": "", "label": "a"}\n'


@pytest.mark.parametrize("labels", [None, "a,b"])  # labels from the files, or given
def test_each_site_file_is_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, labels: str | None
) -> None:
    # A spy, not a fake: it counts the reads and passes each on to the real reader. Site
    # files can be large, and reading them once to infer the labels and again to check
    # them against those same labels finds nothing new.
    import server.train

    read: list[str] = []

    def scan_file(path: Path, **kwargs: object):
        read.append(Path(path).name)
        return real(path, **kwargs)

    real = server.train.scan_file
    monkeypatch.setattr(server.train, "scan_file", scan_file)
    sites = _sites(tmp_path / "sites", "a.jsonl", "b.jsonl")
    (sites / "b.jsonl").write_text('{"text": "bye", "label": "b"}\n')

    _, _, settings = checked_run(
        sites_dir=sites, rounds=1, out=tmp_path / "out", eval_file=None, task=None,
        overrides={"labels": labels} if labels else {}, resume=False,
    )  # fmt: skip

    assert sorted(read) == ["a.jsonl", "b.jsonl"]
    assert settings.spec.labels == ("a", "b")


@pytest.mark.parametrize("labels", [None, "a,b"])  # labels from the files, or given
def test_every_bad_site_file_is_reported_with_its_first_bad_line(
    tmp_path: Path, labels: str | None
) -> None:
    sites = _sites(tmp_path / "sites", "a.jsonl", "b.jsonl", "c.jsonl", "good.jsonl")
    (sites / "a.jsonl").write_text(ROW + BAD_TEXT + BAD_TEXT)
    (sites / "b.jsonl").write_text("{oops\n")
    (sites / "c.jsonl").write_text(ROW + ROW + '{"text": "x", "label": "c"}\n')

    with pytest.raises(DataError) as raised:
        checked_run(
            sites_dir=sites,
            rounds=1,
            out=tmp_path / "out",
            eval_file=None,
            task=None,
            overrides={"labels": labels} if labels else {},
            resume=False,
        )

    message = str(raised.value)
    assert message.startswith("2 of 4 site files " if labels is None else "3 of 4 site files ")
    assert "a.jsonl:2: field 'text' is missing or empty ('') (and 1 more problem)" in message
    assert "b.jsonl:1: invalid JSON" in message
    assert ("c.jsonl:3: label 'c' is not in the run's label set" in message) == bool(labels)
    assert "good.jsonl" not in message and "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"min-available-clients": 3}, r"^min-available-clients=3 exceeds the 2 site file\(s\)"),
        ({"min-fit-clients": 3}, r"^min-fit-clients=3 exceeds the 2 site file\(s\) in --sites"),
        (
            {"min-available-clients": 5, "min-fit-clients": 2},
            r"^min-available-clients=5 exceeds .*; set min-available-clients <= 2$",
        ),
    ],
)
def test_more_sites_than_site_files_are_refused_before_anything_starts(
    tmp_path: Path, overrides: dict, message: str
) -> None:
    # One site per file: the run would wait round-timeout for sites that never come.
    sites = _sites(tmp_path / "sites", "a.jsonl", "b.jsonl")
    with pytest.raises(ConfigError, match=message):
        _config(sites, None, **overrides)
    assert not (tmp_path / "out").exists()


def test_site_counts_up_to_the_site_files_are_taken(tmp_path: Path) -> None:
    sites = _sites(tmp_path / "sites", "a.jsonl", "b.jsonl")
    config = _config(sites, None, **{"min-available-clients": 2, "min-fit-clients": 2})
    assert (config["min-available-clients"], config["min-fit-clients"]) == (2, 2)
    assert _config(sites, None)["min-fit-clients"] == 2  # the defaults: min(2, n) and n


@pytest.mark.parametrize("where", ["run.log", "run.log/out", "link"])
def test_an_out_that_cannot_be_a_directory_is_refused_before_anything_starts(
    tmp_path: Path, where: str
) -> None:
    # `--out run.log` went on to load the model and start Ray, then ended in
    # "error: FileExistsError: [Errno 17] File exists: 'run.log'".
    sites = _sites(tmp_path / "sites", "a.jsonl", "b.jsonl")
    (tmp_path / "run.log").write_text("an earlier run's log\n")
    (tmp_path / "link").symlink_to(tmp_path / "gone")  # a dangling link: mkdir fails too
    out = tmp_path / where
    with pytest.raises(ConfigError, match=rf"^--out '{re.escape(str(out))}' is "):
        build_train_config(
            sites=site_files(sites), rounds=1, out=out, eval_file=None, task=None,
            overrides={}, resume=False,
        )  # fmt: skip
    assert (tmp_path / "run.log").read_text() == "an earlier run's log\n"


def test_an_out_in_a_directory_this_user_cannot_write_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sites = _sites(tmp_path / "sites", "a.jsonl", "b.jsonl")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    # Faked where the check asks: root (as CI runs) writes past any directory's mode, so
    # the refusal a site admin's account gets cannot be caused for real here.
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode)
    )
    with pytest.raises(ConfigError, match=r"^--out '.*/locked/out': .*/locked' is not writable"):
        build_train_config(
            sites=site_files(sites), rounds=1, out=locked / "out", eval_file=None, task=None,
            overrides={}, resume=False,
        )  # fmt: skip


def test_a_new_out_under_new_directories_is_taken(tmp_path: Path) -> None:
    sites = _sites(tmp_path / "sites", "a.jsonl", "b.jsonl")
    config = _config(sites, None)
    assert config["out-dir"] == str(tmp_path / "sites" / "out")
    assert not (tmp_path / "sites" / "out").exists()  # checked, not made


@pytest.mark.parametrize(
    ("overrides", "flags", "message"),
    [
        (
            {"num-server-rounds": 10},
            {},
            r"^--set num-server-rounds=10 disagrees with --rounds 1, which sets it; drop the "
            r"--set$",
        ),
        ({"out-dir": "elsewhere"}, {}, r"^--set out-dir=elsewhere disagrees with --out '.*/out'"),
        (
            {"resume": True},
            {},
            r"^--set resume=true: a run resumes by fedlora train.s --resume flag",
        ),
        (
            {"resume": False},
            {"resume": True},
            r"^--set resume=false: a run resumes by fedlora train.s --resume flag",
        ),
        ({"task": "causal-lm"}, {"task": "sequence-classification"}, r"^--set task=causal-lm "),
        ({"eval-file": "x.jsonl"}, {"eval": "held-out.jsonl"}, r"^--set eval-file=x.jsonl "),
    ],
)
def test_a_set_key_that_disagrees_with_its_flag_is_refused_not_dropped(
    tmp_path: Path, overrides: dict, flags: dict, message: str
) -> None:
    # `--set num-server-rounds=10 --rounds 1` trained one round without a word: the flag
    # overwrote the --set value in the run config (as it did out-dir, resume, task and
    # eval-file), and a refused resume's hint "set num-server-rounds=3 again" led nowhere.
    sites = _sites(tmp_path / "sites", "a.jsonl", "b.jsonl")
    (tmp_path / "held-out.jsonl").write_text(ROW)
    eval_file = tmp_path / "held-out.jsonl" if "eval" in flags else None
    with pytest.raises(ConfigError, match=message):
        build_train_config(
            sites=site_files(sites), rounds=1, out=tmp_path / "out", eval_file=eval_file,
            task=flags.get("task"), overrides=overrides, resume=flags.get("resume", False),
        )  # fmt: skip


def test_a_set_key_that_agrees_with_its_flag_is_taken(tmp_path: Path) -> None:
    sites = _sites(tmp_path / "sites", "a.jsonl", "b.jsonl")
    config, _ = build_train_config(
        sites=site_files(sites), rounds=3, out=tmp_path / "out", eval_file=None, task=None,
        overrides={"num-server-rounds": 3, "out-dir": f"{tmp_path}/./out/", "resume": False},
        resume=False,
    )  # fmt: skip
    assert (config["num-server-rounds"], config["out-dir"]) == (3, str(tmp_path / "out"))


@pytest.mark.parametrize("name", ["adapter", "adapter-best", "metrics.json"])
def test_an_out_holding_outputs_no_run_of_it_wrote_is_refused(tmp_path: Path, name: str) -> None:
    # `--out ~/models/intents` holding the user's own adapter/ (peft's save_pretrained
    # name) trained for hours, then replaced it with this run's; a metrics.json of theirs
    # was deleted as "not this run's". A fedlora run leaves its checkpoint/ beside them.
    sites = _sites(tmp_path / "sites", "a.jsonl", "b.jsonl")
    out = tmp_path / "models"
    out.mkdir()
    if name == "metrics.json":
        (out / name).write_text("{}")
    else:
        (out / name).mkdir()
    with pytest.raises(ConfigError, match=rf"^--out '.*/models' holds {name} but no checkpoint"):
        build_train_config(
            sites=site_files(sites), rounds=1, out=out, eval_file=None, task=None,
            overrides={}, resume=False,
        )  # fmt: skip

    (out / "checkpoint").mkdir()  # an earlier run's: the run itself refuses or resumes it
    build_train_config(
        sites=site_files(sites), rounds=1, out=out, eval_file=None, task=None,
        overrides={}, resume=True,
    )  # fmt: skip


def test_an_out_starting_with_a_tilde_is_checked_where_the_run_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `--out=~/models` reaches fedlora unexpanded (the shell expands ~ only at a word's
    # start), and the run writes to $HOME/models (out-dir is expanded by the settings); the
    # check looked at ./~/models instead: it missed the user's own adapter in
    # $HOME/models, and refused the run for a file named '~' in the working directory.
    sites = _sites(tmp_path / "sites", "a.jsonl", "b.jsonl")
    home, work = tmp_path / "home", tmp_path / "work"
    (home / "models" / "adapter").mkdir(parents=True)
    work.mkdir()
    (work / "~").write_text("not a directory\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)

    def config(out: str) -> dict:
        return build_train_config(
            sites=site_files(sites), rounds=1, out=Path(out), eval_file=None, task=None,
            overrides={}, resume=False,
        )[0]  # fmt: skip

    with pytest.raises(ConfigError, match=r"^--out '~/models' holds adapter but no checkpoint"):
        config("~/models")
    assert config("~/new")["out-dir"] == "~/new"  # the settings expand it, as before
    assert (work / "~").read_text() == "not a directory\n"
