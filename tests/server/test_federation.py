"""``fedlora federation init``'s directory and commands, enrolment against a SuperLink that
is down or faked (against a real one, answers lost included, it is in
tests/integration/test_enrolment.py), the progress lines and the URI redaction."""

from __future__ import annotations

import logging
import re
import shlex
import stat
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from clients.task.errors import ConfigError
from clients.task.interrupt import Terminated
from server import federation, pki
from server.app import redact_uri
from server.federation import (
    Federation,
    FederationError,
    NoAnswer,
    Node,
    check_site_id,
    init_federation,
)
from server.harness.process import free_port
from server.local import progress_line
from server.record import RoundRecord


def test_init_makes_a_private_directory_with_0600_keys_and_a_tls_cli_connection(
    tmp_path: Path,
) -> None:
    fed = init_federation(tmp_path / "fed", address="link.example.org:9092", sans=["10.0.0.5"])
    assert stat.S_IMODE(fed.directory.stat().st_mode) == 0o700
    for key in (fed.ca_key, fed.superlink_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(fed.superlink_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["link.example.org"]
    cli = (fed.cli_home / "config.toml").read_text()
    assert 'address = "link.example.org:9092"' in cli and str(fed.ca_cert) in cli
    assert "insecure" not in cli
    assert Federation.load(fed.directory) == fed
    command = fed.superlink_command()
    assert "--enable-supernode-auth" in command and "--insecure" not in command
    assert command[command.index("--port") + 1] == "9092"
    with pytest.raises(ConfigError, match="holds a federation already"):
        init_federation(fed.directory, address="link.example.org:9092", sans=[])


def test_init_with_a_relative_directory_writes_absolute_paths_flower_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: the README's `fedlora federation init fed/`, run from tmp_path.
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.chdir(tmp_path)
    fed_dir = (tmp_path / "fed").resolve()
    # Act
    fed = init_federation(Path("fed/"), address="link.example.org:9092", sans=[])
    # Assert: Flower's CLI refuses a relative root-certificates ("expected absolute path");
    # every path written or printed names the directory absolutely.
    cli = tomllib.loads((fed_dir / "flwr-home" / "config.toml").read_text())
    assert cli["superlink"]["fedlora"]["root-certificates"] == str(fed_dir / "ca.pem")
    monkeypatch.setenv("FLWR_HOME", str(fed_dir / "flwr-home"))
    connection = read_superlink_connection("fedlora")
    assert connection.root_certificates == str(fed_dir / "ca.pem")
    assert connection.address == "link.example.org:9092" and not connection.insecure
    assert fed.directory == fed_dir and fed.cli_home == fed_dir / "flwr-home"
    command = fed.superlink_command()
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert Path(command[command.index(flag) + 1]).parent == fed_dir
    loaded = Federation.load(Path("fed"))
    assert loaded == fed and loaded.site_dir("a") == fed_dir / "sites" / "a"


def test_a_relative_root_certificates_from_an_older_init_is_refused_with_the_line_to_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange: config.toml as `init fed/` wrote it before it made paths absolute.
    from flwr.cli.flower_config import read_superlink_connection

    from server.cli import EXIT_ERROR, main

    fed = init_federation(tmp_path / "fed", address="link.example.org:9092", sans=[])
    config = fed.cli_home / "config.toml"
    config.write_text(
        '[superlink]\ndefault = "fedlora"\n\n[superlink.fedlora]\n'
        'address = "link.example.org:9092"\nroot-certificates = "fed/ca.pem"\n'
    )
    # Act / Assert: `sites` and `enroll` refuse it, naming the file, the line, the value
    # and the line to write instead; enroll makes nothing.
    expected = (
        f'{config}, line 6: root-certificates = "fed/ca.pem" is a relative path, which '
        "Flower refuses"
    )
    for command in (["sites"], ["enroll", "a"]):
        assert main(["federation", *command, "--federation", str(fed.directory)]) == EXIT_ERROR
        assert expected in " ".join(capsys.readouterr().err.split())
    assert not (fed.directory / "sites").exists()
    with pytest.raises(ConfigError) as refused:
        Federation.load(fed.directory)
    # Act: the edit the error names.
    fix = str(refused.value).split("replace that line with: ", 1)[1]
    lines = config.read_text().splitlines()
    lines[5] = fix
    config.write_text("\n".join(lines) + "\n")
    # Assert: fedlora and Flower read it.
    assert Federation.load(fed.directory) == fed
    monkeypatch.setenv("FLWR_HOME", str(fed.cli_home))
    assert read_superlink_connection("fedlora").root_certificates == str(fed.ca_cert)


HEAD = '[superlink]\ndefault = "fedlora"\n'


@pytest.mark.parametrize(
    ("text", "where"),
    [
        # Another connection holds the same value, earlier in the file.
        (
            f'{HEAD}[superlink.other]\nroot-certificates = "fed/ca.pem"\n'
            '[superlink.fedlora]\naddress = "x:1"\nroot-certificates = "fed/ca.pem"\n',
            "line 7",
        ),
        # An escaped value, a quoted key, under a quoted table name.
        (f'{HEAD}[superlink."fedlora"]\n"root-certificates" = "fed\\u002Fca.pem"\n', "line 4"),
        # A dotted key in the parent table.
        (f'{HEAD}fedlora.root-certificates = "fed/ca.pem"\n', "line 3"),
        # A value no line holds alone: the connection's table is named.
        (
            f'{HEAD}[superlink.fedlora]\nroot-certificates = """\nfed/ca.pem"""\n',
            "[superlink.fedlora]",
        ),
    ],
    ids=["another-connection-first", "escaped-and-quoted", "dotted-key", "multi-line"],
)
def test_the_relative_root_certificates_named_is_the_connections_own(
    tmp_path: Path, text: str, where: str
) -> None:
    # Arrange: config.toml as a hand edit may have left it.
    fed = init_federation(tmp_path / "fed", address="link.example.org:9092", sans=[])
    config = fed.cli_home / "config.toml"
    config.write_text(text)
    # Act
    with pytest.raises(ConfigError) as refused:
        Federation.load(fed.directory)
    # Assert: the connection's own line (or table), the value as TOML reads it, the fix.
    assert str(refused.value).startswith(
        f'{config}, {where}: root-certificates = "fed/ca.pem" is a relative path'
    )
    assert str(refused.value).endswith(f'with: root-certificates = "{fed.ca_cert}"')


def test_init_refuses_a_bad_address_and_enroll_a_bad_site_id(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be HOST:PORT"):
        init_federation(tmp_path / "fed", address="link.example.org", sans=[])
    with pytest.raises(ConfigError, match=r"site id '\.\./x'"):
        check_site_id("../x")
    assert check_site_id("hospital-a.eu_1") == "hospital-a.eu_1"


class FakeSuperLink:
    """`Federation.flwr` and `Federation.nodes` without a SuperLink: registers keys as nodes
    7, 8, ... and refuses a key it holds, as Flower does; or fails as told.

    ``fail`` is raised by every call. ``lose`` makes a registration raise `NoAnswer`
    after it registered the key (``lose_after=True``) or before: a lost answer, which
    tests/integration/test_enrolment.py causes for real; here it is faked to check each
    outcome without a SuperLink. ``unlisted`` is raised by `nodes`. Set on the class, an
    instance is not bound: it is called without the Federation.
    """

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail
        self.lose: NoAnswer | None = None
        self.lose_after = True
        self.unlisted: FederationError | None = None
        self.nodes: dict[int, tuple[bytes, str]] = {}  # node id -> (public key, status)

    def __call__(self, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        if self.fail is not None:
            raise self.fail
        if args[:2] == ("supernode", "register"):
            pub = Path(args[2]).read_bytes()
            if self.lose is not None and not self.lose_after:
                raise self.lose
            if any(key == pub for key, _ in self.nodes.values()):
                raise FederationError(
                    "`flwr supernode register` against x failed: [code: 5] Public key "
                    "already in use while registering node for flwr_aid=, account_name=none."
                )
            node_id = 7 + len(self.nodes)
            self.nodes[node_id] = (pub, "registered")
            if self.lose is not None:
                raise self.lose
            return {"success": True, "node-id": node_id}
        if args[:2] == ("supernode", "unregister"):
            pub, _ = self.nodes[int(args[2])]
            self.nodes[int(args[2])] = (pub, "unregistered")
        return {"success": True}

    def list(self, *, timeout: float = 60.0) -> list[Node]:
        if self.fail is not None or self.unlisted is not None:
            raise self.unlisted or self.fail  # type: ignore[misc]
        return [
            Node(node_id, status, pki.fingerprint(pub))
            for node_id, (pub, status) in self.nodes.items()
        ]

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeSuperLink:
        monkeypatch.setattr(Federation, "flwr", self)
        monkeypatch.setattr(Federation, "nodes", self.list)
        return self


LOST = NoAnswer(
    "`flwr supernode register` against x failed: Connection to the SuperLink is unavailable"
)


def _public_key(path: Path) -> Path:
    path.write_bytes(pki.node_public_openssh(pki.make_node_key().public_key()))
    return path


def _finishing_command(message: str) -> list[str]:
    """The arguments of the ``fedlora`` command an error names to finish an enrolment."""
    command = message.split("run: fedlora ", 1)[1].split(" (it enrols", 1)[0]
    return shlex.split(command)


@pytest.mark.integration  # a real subprocess or model: seconds, kept out of the unit run
def test_an_enrol_while_the_superlink_is_down_keeps_the_key_pair_and_names_what_finishes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main

    # Arrange: a federation whose SuperLink is down (nothing listens on its port). The
    # real `flwr` says the same when a connection is refused as when an answer is lost,
    # so the registration may have been done.
    fed = init_federation(tmp_path / "fed", address=f"127.0.0.1:{free_port()}", sans=[])
    # Act: the registration fails, and so does the node list that would tell.
    with pytest.raises(NoAnswer) as failed:
        fed.enroll("hospital-a")
    # Assert: the key pair is kept, off the roster, and the error says how to finish.
    message = str(failed.value)
    assert message.startswith("`flwr supernode register` against 127.0.0.1")
    assert "its node list could not be read to tell" in message
    key, pub = fed.site_dir("hospital-a") / "node.key", fed.site_dir("hospital-a") / "node.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and pub.exists()
    assert fed.roster().sites == {}
    args = _finishing_command(message)
    assert args == [
        "federation", "enroll", "hospital-a", "--federation", str(fed.directory),
        "--public-key", str(pub),
    ]  # fmt: skip
    # Act: the SuperLink is up; the named command, through the CLI.
    superlink = FakeSuperLink().install(monkeypatch)
    assert main(args) == 0
    # Assert: enrolled with the key pair that was kept, which the site is to be given.
    assert superlink.nodes == {7: (pub.read_bytes(), "registered")}
    entry = fed.roster().sites["hospital-a"]
    assert entry.node_id == 7 and entry.public_key == pki.fingerprint(pub.read_bytes())
    out = "".join(capsys.readouterr().out.split())  # as rich wraps it, without the wraps
    assert f"givethesite{key}(0600,secret)" in out
    assert "--auth-supernode-private-keynode.key" in out


def test_an_answer_lost_after_the_superlink_registered_the_key_enrols_that_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Arrange: the SuperLink registers the key, and its answer is lost.
    fed = init_federation(tmp_path / "fed", address="127.0.0.1:9092", sans=[])
    superlink = FakeSuperLink().install(monkeypatch)
    superlink.lose = LOST
    # Act
    with caplog.at_level(logging.WARNING, logger="server.federation"):
        entry = fed.enroll("a")
    # Assert: the node list shows the key on node 7; that node is enrolled, the key kept.
    pub = fed.site_dir("a") / "node.pub"
    assert superlink.nodes == {7: (pub.read_bytes(), "registered")}
    assert (fed.site_dir("a") / "node.key").exists()
    assert entry.node_id == 7 and fed.roster().sites["a"] == entry
    assert "holds the key as node 7 (not on the roster), which is enrolled as 'a'" in caplog.text


@pytest.mark.parametrize("lands_later", [True, False])
def test_an_answer_lost_with_the_key_not_listed_keeps_the_key_pair_it_may_be_registered_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lands_later: bool
) -> None:
    # Arrange: the registration gets no answer and the node list, read next, lacks the
    # key; a request delayed on its way may still be done after that (lands_later).
    fed = init_federation(tmp_path / "fed", address="127.0.0.1:9092", sans=[])
    superlink = FakeSuperLink().install(monkeypatch)
    superlink.lose, superlink.lose_after = LOST, False
    # Act
    with pytest.raises(NoAnswer, match="node list does not hold the key, but may") as failed:
        fed.enroll("a")
    # Assert: the key pair is kept, off the roster, with the command that finishes.
    key, pub = fed.site_dir("a") / "node.key", fed.site_dir("a") / "node.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and fed.roster().sites == {}
    args = _finishing_command(str(failed.value))
    assert args == [
        "federation", "enroll", "a", "--federation", str(fed.directory),
        "--public-key", str(pub),
    ]  # fmt: skip
    # Act: the registration lands (or not); then the named command.
    superlink.lose = None
    if lands_later:
        superlink.nodes[7] = (pub.read_bytes(), "registered")
    entry = fed.enroll("a", public_key=Path(args[-1]))
    # Assert: either way the site is enrolled as the one node that holds its kept key.
    assert superlink.nodes == {7: (pub.read_bytes(), "registered")}
    assert entry.node_id == 7 and entry.public_key == pki.fingerprint(pub.read_bytes())


@pytest.mark.parametrize("registered", [True, False])
def test_an_answer_lost_with_no_node_list_keeps_the_key_and_the_named_command_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registered: bool
) -> None:
    # Arrange: the answer is lost, whether or not the key was registered, and the node
    # list cannot be read either.
    fed = init_federation(tmp_path / "fed", address="127.0.0.1:9092", sans=[])
    superlink = FakeSuperLink().install(monkeypatch)
    superlink.lose, superlink.lose_after = LOST, registered
    superlink.unlisted = NoAnswer("`flwr supernode ls` against x failed: timed out")
    # Act
    with pytest.raises(NoAnswer, match="may have registered the key") as failed:
        fed.enroll("a")
    # Assert: the key pair is kept, and the named command enrols it either way.
    pub = fed.site_dir("a") / "node.pub"
    assert (fed.site_dir("a") / "node.key").exists() and fed.roster().sites == {}
    superlink.lose = superlink.unlisted = None
    args = _finishing_command(str(failed.value))
    entry = fed.enroll("a", public_key=Path(args[args.index("--public-key") + 1]))
    assert superlink.nodes == {7: (pub.read_bytes(), "registered")}
    assert entry.node_id == 7 and fed.roster().sites["a"] == entry


def test_a_key_the_superlink_holds_already_is_enrolled_as_its_node_if_it_can_be(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: three keys the SuperLink holds: "free" on a node not on the roster,
    # "gone" on an unregistered node, "taken" on a node enrolled as site "b".
    fed = init_federation(tmp_path / "fed", address="127.0.0.1:9092", sans=[])
    superlink = FakeSuperLink().install(monkeypatch)
    free, gone, taken = (_public_key(tmp_path / f"{n}.pub") for n in ("free", "gone", "taken"))
    superlink.nodes = {
        7: (free.read_bytes(), "online"),
        8: (gone.read_bytes(), "unregistered"),
        9: (taken.read_bytes(), "online"),
    }
    fed.roster().enrol("b", node_id=9, public_key="sha256:x").save(fed.roster_path)
    # Act / Assert: only the live node no site has is enrolled; the others are refused
    # and leave nothing behind.
    with pytest.raises(FederationError, match="node 8, unregistered, which the SuperLink"):
        fed.enroll("a", public_key=gone)
    with pytest.raises(ConfigError, match=r"the key is that of site 'b' \(node 9\) on the roster"):
        fed.enroll("a", public_key=taken)
    assert not (fed.directory / "sites").exists()
    assert fed.enroll("a", public_key=free).node_id == 7
    assert len(superlink.nodes) == 3


def test_a_refused_enrol_removes_only_what_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: site "a" has a key pair from before (enrolled again with its own node.pub);
    # site "c" has only a node.pub, replaced by another key; site "b" has nothing.
    fed = init_federation(tmp_path / "fed", address="127.0.0.1:9092", sans=[])
    old_key = fed.site_dir("a") / "node.key"
    key = pki.make_node_key()
    pki.write_private_key(old_key, key, openssh=True)
    (fed.site_dir("a") / "node.pub").write_bytes(pki.node_public_openssh(key.public_key()))
    (tmp_path / "a.pub").write_bytes((fed.site_dir("a") / "node.pub").read_bytes())
    before = old_key.read_bytes()
    fed.site_dir("c").mkdir()
    old_pub = _public_key(fed.site_dir("c") / "node.pub").read_bytes()
    FakeSuperLink(fail=FederationError("[code: 3] refused")).install(monkeypatch)
    # Act: every enrolment is refused.
    enrols = (("a", tmp_path / "a.pub"), ("c", _public_key(tmp_path / "new.pub")), ("b", None))
    for site, public_key in enrols:
        with pytest.raises(FederationError, match="refused"):
            fed.enroll(site, public_key=public_key)
    # Assert: "a"'s key pair is as it was, "c"'s node.pub put back; nothing of "b" is left.
    assert old_key.read_bytes() == before
    assert (fed.site_dir("c") / "node.pub").read_bytes() == old_pub
    assert sorted(p.name for p in (fed.directory / "sites").iterdir()) == ["a", "c"]
    assert fed.roster().sites == {}


@pytest.mark.parametrize("stop", [KeyboardInterrupt, Terminated], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_during_the_registration_keeps_a_key_pair_it_made_and_says_how_to_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: type[KeyboardInterrupt]
) -> None:
    # Arrange: Ctrl-C (or SIGTERM) while `flwr supernode register` runs (raised by the
    # fake in its place): the SuperLink may have registered the key.
    fed = init_federation(tmp_path / "fed", address="127.0.0.1:9092", sans=[])
    fed.site_dir("c").mkdir(parents=True)
    old_pub = _public_key(fed.site_dir("c") / "node.pub").read_bytes()
    FakeSuperLink(fail=stop()).install(monkeypatch)
    # Act / Assert: "b"'s new key pair is kept, with the command that finishes it; "c"'s
    # key was the caller's (--public-key), so its node.pub is put back. The stop keeps its
    # kind: the CLI exits 143 for SIGTERM, 130 for Ctrl-C.
    with pytest.raises(stop, match="may have done; the key pair is kept") as b:
        fed.enroll("b")
    assert type(b.value) is stop
    assert _finishing_command(str(b.value))[-1] == str(fed.site_dir("b") / "node.pub")
    assert (fed.site_dir("b") / "node.key").exists()
    with pytest.raises(stop, match="run the same command again") as c:
        fed.enroll("c", public_key=_public_key(tmp_path / "new.pub"))
    assert type(c.value) is stop
    assert (fed.site_dir("c") / "node.pub").read_bytes() == old_pub
    assert fed.roster().sites == {}


def test_a_roster_that_cannot_be_written_after_the_registration_says_how_to_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: the disk is full when the roster is written (faked: as root, the test
    # cannot make a write fail otherwise), after the SuperLink registered the key.
    import errno

    from server.roster import Roster

    fed = init_federation(tmp_path / "fed", address="127.0.0.1:9092", sans=[])
    superlink = FakeSuperLink().install(monkeypatch)
    real_save = Roster.save

    def full(self: Roster, path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Roster, "save", full)
    # Act
    with pytest.raises(FederationError, match="registered 'a''s key as node 7, but") as failed:
        fed.enroll("a")
    # Assert: the key pair is kept; once the roster can be written, the named command
    # enrols node 7.
    assert (fed.site_dir("a") / "node.key").exists() and fed.roster().sites == {}
    monkeypatch.setattr(Roster, "save", real_save)
    args = _finishing_command(str(failed.value))
    assert fed.enroll("a", public_key=Path(args[-1])).node_id == 7
    assert len(superlink.nodes) == 1


@pytest.mark.integration  # a real subprocess or model: seconds, kept out of the unit run
def test_a_revoke_the_superlink_does_not_take_names_the_command_that_finishes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: "a" is enrolled; then the SuperLink goes down (nothing listens on its port).
    fed = init_federation(tmp_path / "fed", address=f"127.0.0.1:{free_port()}", sans=[])
    FakeSuperLink().install(monkeypatch)
    fed.enroll("a")
    monkeypatch.undo()
    # Act
    with pytest.raises(NoAnswer) as failed:
        fed.revoke("a")
    # Assert: off the roster, and the error names the unregister still to be done.
    assert fed.roster().sites == {}
    assert str(failed.value).endswith(
        f"'a' is off the roster (no more work for it), but node 7 may still be registered; "
        f"once the SuperLink answers, run: FLWR_HOME={fed.cli_home} flwr supernode "
        "unregister 7 fedlora"
    )


@pytest.mark.parametrize("stop", [KeyboardInterrupt, Terminated], ids=["ctrl-c", "sigterm"])
def test_a_revoke_stopped_during_the_unregister_keeps_the_stop_s_kind_and_names_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: type[KeyboardInterrupt]
) -> None:
    fed = init_federation(tmp_path / "fed", address="127.0.0.1:9092", sans=[])
    superlink = FakeSuperLink().install(monkeypatch)
    fed.enroll("a")
    superlink.fail = stop()  # Ctrl-C or SIGTERM while `flwr supernode unregister` runs

    with pytest.raises(stop) as stopped:
        fed.revoke("a")

    assert type(stopped.value) is stop
    assert str(stopped.value).startswith("'a' is off the roster (no more work for it), but node 7")
    assert fed.roster().sites == {}


def _revoked_with_its_node_live(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Federation, FakeSuperLink]:
    """A federation whose site "a" (node 7) is revoked, its unregister unanswered."""
    fed = init_federation(tmp_path / "fed", address="127.0.0.1:9092", sans=[])
    superlink = FakeSuperLink().install(monkeypatch)
    fed.enroll("a")
    superlink.fail = NoAnswer("`flwr supernode unregister` against x failed: timed out")
    with pytest.raises(NoAnswer):
        fed.revoke("a")
    superlink.fail = None
    return fed, superlink


def test_a_revoked_sites_key_is_never_enrolled_again_and_its_unfinished_unregister_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: "a" is revoked, and the unregister gets no answer: node 7 stays registered.
    fed, superlink = _revoked_with_its_node_live(tmp_path, monkeypatch)
    key, pub = fed.site_dir("a") / "node.key", fed.site_dir("a") / "node.pub"
    live = dict(superlink.nodes)
    assert live[7][1] == "registered"
    finish = (
        f"node 7 is still registered at the SuperLink: finish that first, with: "
        f"FLWR_HOME={fed.cli_home} flwr supernode unregister 7 fedlora; then "
    )
    # Act / Assert: its key, as another site's or as its own again, is refused, naming
    # the unregister to finish; nothing is registered or made.
    with pytest.raises(ConfigError) as other:
        fed.enroll("new-site", public_key=pub)
    assert f"--public-key '{pub}' is that of site 'a', revoked as node 7" in str(other.value)
    assert f"{finish}enroll 'new-site' with a new key pair" in str(other.value)
    with pytest.raises(ConfigError, match=re.escape(f"{finish}enroll 'a' with a new key pair")):
        fed.enroll("a", public_key=pub)
    with pytest.raises(ConfigError, match=re.escape(f"{finish}remove {key} and {pub} and")):
        fed.enroll("a")
    assert superlink.nodes == live and fed.roster().sites == {}
    assert sorted(p.name for p in (fed.directory / "sites").iterdir()) == ["a"]
    # Act / Assert: a revoked record without the key's fingerprint (written by hand) is
    # found by its node, which the SuperLink lists for the key it holds already.
    fed.roster_path.write_text('{"sites": {}, "revoked": {"a": {"node-id": 7}}}')
    with pytest.raises(ConfigError, match="the key's node is that of site 'a', revoked as"):
        fed.enroll("new-site", public_key=pub)
    assert superlink.nodes == live and fed.roster().sites == {}


def test_sites_names_the_revoked_site_of_a_node_still_registered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange: "a" is revoked, and the unregister gets no answer: node 7 stays registered.
    # Brackets in the directory: rich markup would eat "[prod]" from the printed command.
    (tmp_path / "[prod]").mkdir()
    fed, superlink = _revoked_with_its_node_live(tmp_path / "[prod]", monkeypatch)
    revoked_on = fed.roster().revoked["a"]["revoked"]
    unregister = f"FLWR_HOME='{fed.cli_home}' flwr supernode unregister 7 fedlora"
    assert "[prod]" in unregister
    # Act
    (row,) = [r for r in fed.sites() if r["node-id"] == 7]
    # Assert: off the roster, whose it was, and the command that finishes the revoke.
    assert row["site"] is None
    assert row["status"] == (
        "registered, NOT ON THE ROSTER (gets no work); held by revoked site 'a' "
        f"(revoked on {revoked_on})"
    )
    assert row["finish"] == unregister
    # Act / Assert: the CLI prints the command whole, on a line of its own.
    from server.cli import main

    assert main(["federation", "sites", "--federation", str(fed.directory)]) == 0
    assert f"node 7: finish its revoke with: {unregister}\n" in capsys.readouterr().out
    # Act / Assert: once unregistered, the node is named as the revoked site's, no more.
    superlink.nodes[7] = (superlink.nodes[7][0], "unregistered")
    (row,) = [r for r in fed.sites() if r["node-id"] == 7]
    assert row["status"].startswith("unregistered, NOT ON THE ROSTER (gets no work); held by")
    assert row["finish"] is None


def test_a_revoked_key_spelled_another_way_is_still_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same key with a comment and other padding bits in its base64 (both decode to
    # the same key): a fingerprint of the text would differ from the roster's.
    import base64

    fed, _ = _revoked_with_its_node_live(tmp_path, monkeypatch)
    kind, blob = (fed.site_dir("a") / "node.pub").read_bytes().split()[:2]
    raw = base64.b64decode(blob)
    assert len(raw) % 3, "the blob needs padding for the last character to have spare bits"
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    text = blob.rstrip(b"=")
    last = alphabet.index(text[-1:]) | (1 if len(raw) % 3 == 2 else 3)  # spare bits set
    respelled = text[:-1] + alphabet[last : last + 1] + b"=" * (len(blob) - len(text))
    assert respelled != blob and base64.b64decode(respelled) == raw
    other = tmp_path / "other.pub"
    other.write_bytes(kind + b" " + respelled + b" admin@laptop\n")

    with pytest.raises(ConfigError, match="is that of site 'a', revoked as node 7"):
        fed.enroll("new-site", public_key=other)
    assert fed.roster().sites == {}


def test_a_node_registered_for_another_site_is_not_adopted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A roster from before revoked records were kept may have lost a revoked site's
    # record; the node's registered name (enroll's --name) still tells whose it is.
    fed = init_federation(tmp_path / "fed", address="127.0.0.1:9092", sans=[])
    superlink = FakeSuperLink().install(monkeypatch)
    pub = _public_key(tmp_path / "old.pub")
    superlink.nodes[7] = (pub.read_bytes(), "registered")
    listed = superlink.list
    monkeypatch.setattr(
        Federation,
        "nodes",
        lambda _self, *, timeout=60.0: [replace(n, name="a") for n in listed(timeout=timeout)],
    )

    with pytest.raises(ConfigError, match="node 7 was registered for site 'a', not 'b'"):
        fed.enroll("b", public_key=pub)
    assert fed.roster().sites == {}


def test_a_success_answer_without_a_node_id_keeps_the_key_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `flwr` said success, so the SuperLink has probably registered the key: a malformed
    # answer (faked: Flower always sends the id) is no reason to remove the key pair.
    fed = init_federation(tmp_path / "fed", address="127.0.0.1:9092", sans=[])
    superlink = FakeSuperLink().install(monkeypatch)
    superlink.unlisted = NoAnswer("`flwr supernode ls` against x failed: timed out")
    real = FakeSuperLink.__call__

    def no_node_id(self: FakeSuperLink, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        answer = real(self, *args, timeout=timeout)
        return {"success": True} if args[:2] == ("supernode", "register") else answer

    monkeypatch.setattr(FakeSuperLink, "__call__", no_node_id)

    with pytest.raises(NoAnswer, match="said success without a node id"):
        fed.enroll("a")
    assert (fed.site_dir("a") / "node.key").exists() and (fed.site_dir("a") / "node.pub").exists()


def test_an_init_that_did_not_finish_is_named_as_such_by_init_and_by_the_commands(
    tmp_path: Path,
) -> None:
    # Arrange: init stopped after the CA key (it writes federation.json last).
    directory = tmp_path / "fed"
    directory.mkdir()
    pki.write_private_key(directory / "ca.key", pki.make_ca("x").key)
    unfinished = "holds a CA key \\(ca.key\\) but no federation.json.*remove .* run init again"
    # Act / Assert: each says what happened and what to do, instead of sending the
    # admin from one to the other.
    with pytest.raises(ConfigError, match=unfinished):
        Federation.load(directory)
    with pytest.raises(ConfigError, match=unfinished):
        init_federation(directory, address="127.0.0.1:9092", sans=[])
    assert (directory / "ca.key").exists()
    # A federation.json without an address is named, not a KeyError.
    (directory / "federation.json").write_text('{"sans": []}')
    with pytest.raises(ConfigError, match=r'federation\.json has no "address"'):
        Federation.load(directory)


def test_the_failures_flower_reports_are_the_ones_fedlora_tells_apart() -> None:
    # The words `flwr` prints for a lost connection and the SuperLink for a key it holds
    # (Flower 1.41); if an upgrade changes them, lost answers would count as refusals.
    from flwr.cli.utils import SUPERLINK_UNAVAILABLE_MESSAGE
    from flwr.common.constant import PUBLIC_KEY_ALREADY_IN_USE_MESSAGE

    assert SUPERLINK_UNAVAILABLE_MESSAGE.startswith(federation.UNAVAILABLE)
    assert PUBLIC_KEY_ALREADY_IN_USE_MESSAGE == federation.KEY_IN_USE


def _site_with_key_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Federation, Path, Path]:
    """A federation (its SuperLink a FakeSuperLink) where site "a" has a node.key and a
    node.pub that were never registered: (federation, node.key, node.pub)."""
    fed = init_federation(tmp_path / "fed", address="127.0.0.1:9092", sans=[])
    key = fed.site_dir("a") / "node.key"
    pki.write_private_key(key, pki.make_node_key(), openssh=True)
    pub = _public_key(fed.site_dir("a") / "node.pub")
    FakeSuperLink().install(monkeypatch)
    return fed, key, pub


def test_a_public_key_that_is_not_the_site_keys_own_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Enrolling it would replace node.pub beside a node.key it does not match.
    fed, _key, pub = _site_with_key_files(tmp_path, monkeypatch)
    before = pub.read_bytes()
    with pytest.raises(ConfigError, match="mismatched pair: remove both files first"):
        fed.enroll("a", public_key=_public_key(tmp_path / "other.pub"))
    assert pub.read_bytes() == before and fed.roster().sites == {}


def test_an_existing_key_is_refused_with_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: "a" has a key pair that was never registered (an enrol that died).
    fed, key, pub = _site_with_key_files(tmp_path, monkeypatch)
    # Act / Assert: refused, naming the option that reuses it; reusing it enrols "a".
    reuse = rf"{re.escape(str(key))} exists.*--public-key {re.escape(str(pub))}.* or remove"
    with pytest.raises(ConfigError, match=reuse):
        fed.enroll("a")
    assert fed.enroll("a", public_key=pub).public_key == pki.fingerprint(pub.read_bytes())
    # Arrange: "a" is revoked; the SuperLink keeps a revoked key in use.
    fed.revoke("a")
    # Act / Assert: refused, saying the key is the revoked one and is to be removed.
    with pytest.raises(ConfigError, match=rf"{re.escape(str(key))} exists.*revoked.*remove"):
        fed.enroll("a")
    assert key.exists() and pub.exists()


def test_the_round_summary_says_what_happened() -> None:
    record = RoundRecord(round=2, sampled=3, replies=2, sites=2, accuracy=0.8125, epsilon=1.5)
    record.delta = 1e-5
    record.failed_site("site-3", "no reply before timeout")
    record.finish()
    line = record.summary(5)
    assert line.startswith("round 2/5 done in ")
    assert "3 sampled, 2 replied, 2 accepted, 0 rejected, 1 failed, 0 refused" in line
    assert "accuracy 0.8125" in line and "ε 1.5 (δ 1e-05)" in line
    assert line.endswith("site-3: no reply before timeout")


def test_progress_shows_fedloras_lines_and_problems_only() -> None:
    assert progress_line("INFO : fedlora: round 1/3: training on 3") == "round 1/3: training on 3"
    assert progress_line("INFO :      [ROUND 1]") is None
    assert progress_line("ERROR : ServerApp raised") == "ERROR : ServerApp raised"


def test_a_password_in_a_tracking_uri_is_never_shown() -> None:
    assert redact_uri("http://pub:s3cret@registry:5000") == "http://pub:***@registry:5000"
    assert redact_uri("sqlite:////tmp/x/mlflow.db") == "sqlite:////tmp/x/mlflow.db"


def test_federation_local_refuses_a_site_it_cannot_enrol_before_starting_anything(
    tmp_path: Path,
) -> None:
    # Arrange: "Ward 7" is a valid site id for training, not for enrolment (letters,
    # digits, '.', '_', '-'); the secure rehearsal enrols every site.
    from server.local import run_local

    sites = tmp_path / "sites"
    sites.mkdir()
    for name in ("Ward 7", "b"):
        (sites / f"{name}.jsonl").write_text(
            '{"text": "hello", "label": "x"}\n{"text": "bye", "label": "y"}\n' * 4
        )
    # Act / Assert: refused with enrolment's rule, and no federation folder was made.
    with pytest.raises(ConfigError, match="site id 'Ward 7' must be 1-64 letters"):
        run_local(sites_dir=sites, rounds=1, out=tmp_path / "out")
    assert not (tmp_path / "out" / "federation").exists()
