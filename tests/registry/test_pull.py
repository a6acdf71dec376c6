"""`pull` replaces only what a pull wrote: the guard on ``--out`` (registry/pull.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.task.errors import ConfigError
from registry.artifact import RELEASE_FILES
from registry.keys import TrustStore
from registry.pull import check_out, pull
from server.cli import EXIT_ERROR, main
from server.harness.process import free_port


class UntouchableStore:
    """A registry the pull must not reach: every attribute is a failure."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the registry was asked for {name!r}")


def _earlier_pull(directory: Path) -> Path:
    directory.mkdir(parents=True)
    for name in RELEASE_FILES:
        (directory / name).write_bytes(b"from an earlier pull")
    return directory


def _snapshot(root: Path) -> dict[str, bytes | str]:
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


def test_an_absent_or_empty_out_or_an_earlier_pull_may_be_replaced(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "absent")
    check_out(tmp_path / "empty")
    check_out(_earlier_pull(tmp_path / "earlier"))


def _users_notes(out: Path) -> None:
    out.mkdir()
    (out / "notes.txt").write_text("mine")


def _a_regular_file(out: Path) -> None:
    out.write_text("mine")


def _a_pull_plus_notes(out: Path) -> None:
    _earlier_pull(out)
    (out / "notes.txt").write_text("mine")


def _release_names_but_no_signature(out: Path) -> None:
    out.mkdir()
    (out / "README.md").write_text("my project")


def _a_folder_named_like_a_release_file(out: Path) -> None:
    _earlier_pull(out)
    (out / "README.md").unlink()
    (out / "README.md").mkdir()
    (out / "README.md" / "draft.txt").write_text("mine")


def _a_link_to_a_directory(out: Path) -> None:
    _earlier_pull(out.parent / "real")
    out.symlink_to(out.parent / "real", target_is_directory=True)


def _users_folder_named_like_the_aside(out: Path) -> None:
    # A swap's recovery would rename it to --out, then remove it as the old output.
    _users_notes(out.parent / f".{out.name}.old")


def _users_folder_named_like_the_partial_copy(out: Path) -> None:
    _earlier_pull(out)
    _users_notes(out.parent / f".{out.name}.incoming")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_users_notes, "holds files a pull did not write (notes.txt)"),
        (_users_folder_named_like_the_aside, "is not what an interrupted pull leaves there"),
        (_users_folder_named_like_the_partial_copy, "is not what an interrupted pull leaves"),
        (_a_regular_file, "is a file, not a directory"),
        (_a_pull_plus_notes, "holds files a pull did not write (notes.txt)"),
        (_release_names_but_no_signature, "not an earlier pull's output (no model.sig)"),
        (_a_folder_named_like_a_release_file, "holds files a pull did not write (README.md)"),
        (_a_link_to_a_directory, "is a symbolic link"),
    ],
)
def test_pull_refuses_an_out_it_did_not_write_and_changes_nothing(
    tmp_path: Path, make, message: str
) -> None:
    out = tmp_path / "work" / "mydir"
    out.parent.mkdir()
    make(out)
    before = _snapshot(out.parent)

    with pytest.raises(ConfigError, match="--out") as refused:
        pull(UntouchableStore(), model="intents", alias="production",  # type: ignore[arg-type]
             trust=TrustStore(tmp_path, {}, {}), out=out, state=tmp_path / "state")  # fmt: skip

    assert message in str(refused.value) and str(out) in str(refused.value)
    assert _snapshot(out.parent) == before
    assert not (tmp_path / "state").exists()


def test_edge_pull_refuses_before_asking_the_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mydir"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    trust = tmp_path / "trust"
    trust.mkdir()
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens: a contact would fail

    rc = main(["edge", "pull", "intents@production", "--trust", str(trust), "--out", str(out),
               "--registry", nobody, "--state", str(tmp_path / "state")])  # fmt: skip

    assert rc == EXIT_ERROR
    assert "holds files a pull did not write (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_a_pull_from_a_sqlite_file_that_is_not_there_makes_no_registry(
    tmp_path: Path, trust: TrustStore, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "runs" / "mlfow.db"

    rc = main(["edge", "pull", "intents@production", "--trust", str(trust.directory),
               "--out", str(tmp_path / "out"), "--registry", f"sqlite:///{typo}",
               "--state", str(tmp_path / "state")])  # fmt: skip

    assert rc == EXIT_ERROR
    assert f"{typo} does not exist" in capsys.readouterr().err
    assert not typo.parent.exists()
