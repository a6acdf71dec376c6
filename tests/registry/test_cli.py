"""``fedlora registry`` as an operator types it: a wrong value is named, nothing is changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.keys import KeyPair
from registry.mlflow_store import MlflowStore
from server.cli import EXIT_ERROR, main
from tests.conftest import PASSPHRASE, fedlora_killed_at


@pytest.mark.parametrize(
    "command",
    [
        ["list"],
        ["show", "intents"],
        ["promote", "intents", "--version", "1", "--trust", "{trust}", "--key", "{key}"],
        ["rollback", "intents", "--key", "{key}"],
        ["renew", "--key", "{key}"],
        ["revoke", "--digest", "a" * 64, "--key", "{key}"],
        ["add-signer", "--new-key", "{pub}", "--key", "{key}"],
    ],
    ids=lambda c: c[0],
)
def test_a_command_that_only_reads_a_registry_refuses_a_sqlite_file_that_is_not_there(
    command: list[str],
    keypair: KeyPair,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A typo in --registry (mlfow.db) must not answer from a new, empty registry made there.
    monkeypatch.setenv("FEDLORA_KEY_PASSPHRASE", PASSPHRASE)
    (tmp_path / "trust").mkdir()
    (tmp_path / "trust" / "p.pub").write_bytes(keypair.public_path.read_bytes())
    typo = tmp_path / "runs" / "mlfow.db"
    args = [
        a.format(trust=tmp_path / "trust", key=keypair.private_path, pub=keypair.public_path)
        for a in command
    ]

    code = main(["registry", *args, "--registry", f"sqlite:///{typo}"])

    assert code != 0
    err = capsys.readouterr().err
    assert str(typo) in err and "does not exist" in err
    assert not typo.parent.exists()


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        ("alias", "alias 'v1' is reserved"),
        ("passphrase", "wrong passphrase"),
        ("key", "cannot read private key"),
        ("source", "does not exist; expected a training output"),
    ],
)
def test_a_refused_publish_makes_no_registry_in_a_new_sqlite_file(
    wrong: str,
    message: str,
    outputs: list[Path],
    keypair: KeyPair,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Only publish may start a registry, but one refused for its own arguments opened the
    # registry first: `--registry sqlite:///mlfow.db` (a typo) with a wrong alias, key or
    # passphrase left an empty mlfow.db, where `registry list` then answered nothing.
    monkeypatch.setenv("FEDLORA_KEY_PASSPHRASE", PASSPHRASE)
    monkeypatch.setenv("WRONG_PASSPHRASE", "not-" + PASSPHRASE)
    typo = tmp_path / "runs" / "mlfow.db"
    typo.parent.mkdir()
    source, key, flags = str(outputs[0]), str(keypair.private_path), []
    if wrong == "alias":
        flags = ["--alias", "v1"]
    elif wrong == "passphrase":
        flags = ["--passphrase-env", "WRONG_PASSPHRASE"]
    elif wrong == "key":
        key = str(tmp_path / "missing.pem")
    else:
        source = str(tmp_path / "missing")

    code = main(
        ["registry", "publish", source, "--model", "intents", "--key", key, *flags,
         "--registry", f"sqlite:///{typo}"]
    )  # fmt: skip

    assert code == EXIT_ERROR
    assert message in capsys.readouterr().err
    assert list(typo.parent.iterdir()) == []


@pytest.mark.parametrize("uri", ["htp://registry:5000", "registry.example:5000"])
def test_a_registry_uri_mlflow_cannot_open_is_a_registry_error_naming_it(
    uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # MLflow's own exception escaped the constructor: "error: <ExceptionClass>: ..." and
    # exit 1, the code of an unexpected failure.
    code = main(["registry", "list", "--registry", uri])

    assert code == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"open the registry failed at {uri}" in err and len(err.strip().splitlines()) == 1


@pytest.mark.integration  # a real subprocess that gets SIGTERM mid-publish
def test_a_publish_stopped_by_sigterm_exits_143_and_leaves_no_version(
    outputs: list[Path], keypair: KeyPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: `kill PID` arrives once the version is registered, as the index is written.
    uri = f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}"
    argv = ["registry", "publish", str(outputs[0]), "--model", "intents",
            "--key", str(keypair.private_path), "--registry", uri]  # fmt: skip
    monkeypatch.setenv("FEDLORA_KEY_PASSPHRASE", PASSPHRASE)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the publisher's state lives under ~

    # Act
    done = fedlora_killed_at("registry.lifecycle:write_index", argv)

    # Assert: the cleanup Ctrl-C gets ran (the version is gone), and a re-run publishes.
    assert done.returncode == 143, done.stderr[-2000:]
    assert "terminated" in done.stderr
    store = MlflowStore(uri)
    assert store.client.search_model_versions("name='intents'") == []
    assert store.fetch_index_file("timestamp.json", 2**20) is None
    assert main([*argv]) == 0
