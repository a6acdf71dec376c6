"""``fedlora federation enroll`` and ``sites`` against a real SuperLink whose answers get lost.

A real ``flower-superlink`` (TLS, SuperNode authentication) and the real ``flwr`` CLI;
between them `AnswerLoser`, a TCP relay that can let a request through and lose the
SuperLink's answer, so the SuperLink registers a key and the CLI never hears of it: the
failure a timeout or a dropped connection causes, which cannot be caused on demand
otherwise. tests/server/test_federation.py checks every outcome with a faked SuperLink.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from server import pki
from server.cli import main
from server.federation import Federation, NoAnswer
from server.harness.flower import LocalFederation, write_cli_connection
from server.harness.process import LOCALHOST

pytestmark = pytest.mark.integration

APPLICATION_DATA = 0x17  # TLS record type of everything after the handshake
# More TLS application data than a handshake's Finished (under 100 bytes) means the
# request is on its way: any Control API request is longer.
REQUEST_BYTES = 150
QUIET_S = 0.5  # the SuperLink has answered once it sends nothing for this long


class AnswerLoser:
    """A TCP relay to ``port`` that loses the answers on its next ``lose`` connections.

    On such a connection, everything from the client reaches the SuperLink, so it handles
    the request in full; from the moment the client has sent its request, nothing more
    from the SuperLink reaches the client, whose connection is closed once the SuperLink
    is quiet. The client sees the connection close without an answer.
    """

    def __init__(self, port: int) -> None:
        self.target = (LOCALHOST, port)
        self.listener = socket.create_server((LOCALHOST, 0))
        self.address = f"{LOCALHOST}:{self.listener.getsockname()[1]}"
        self.lose = 0
        self.lost = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            with self.lock:
                armed = self.lose > 0
                self.lose -= armed
            threading.Thread(target=self._relay, args=(client, armed), daemon=True).start()

    def _relay(self, client: socket.socket, armed: bool) -> None:
        server = socket.create_connection(self.target)
        asked = threading.Event()

        def requests() -> None:
            pending, sent = b"", 0
            while data := _recv(client):
                pending += data
                while len(pending) >= 5 and len(pending) >= 5 + _length(pending):
                    length = _length(pending)
                    sent += length if pending[0] == APPLICATION_DATA else 0
                    pending = pending[5 + length :]
                if sent > REQUEST_BYTES:
                    asked.set()  # before the request reaches the SuperLink
                server.sendall(data)
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_WR)

        threading.Thread(target=requests, daemon=True).start()
        while data := _recv(server):
            if armed and asked.is_set():
                server.settimeout(QUIET_S)
                while _recv(server):  # the answer, read and dropped
                    pass
                with self.lock:
                    self.lost += 1
                break
            client.sendall(data)
        for sock in (client, server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the other thread's recv
            sock.close()


def _length(record: bytes) -> int:
    return int.from_bytes(record[3:5], "big")


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:  # reset, closed, or quiet past its timeout
        return b""


@pytest.fixture(scope="module")
def superlink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """A real secure SuperLink, no SuperNodes."""
    with LocalFederation(
        tmp_path_factory.mktemp("enrolment"), [], secure=True, startup_timeout=120.0
    ) as local:
        yield local


@pytest.fixture
def relay(superlink: LocalFederation) -> Iterator[tuple[Federation, AnswerLoser]]:
    """The SuperLink's federation with its ``flwr`` connection through an `AnswerLoser`."""
    fed: Federation = superlink.federation
    relay = AnswerLoser(superlink.port)
    write_cli_connection(
        fed.cli_home, fed.connection, address=relay.address, root_certificates=fed.ca_cert
    )
    yield fed, relay
    relay.close()
    write_cli_connection(
        fed.cli_home, fed.connection, address=fed.address, root_certificates=fed.ca_cert
    )


def _nodes_with(fed: Federation, pub: Path) -> list[int]:
    fingerprint = pki.fingerprint(pub.read_bytes())
    return [n.node_id for n in fed.nodes() if n.public_key == fingerprint]


@pytest.mark.timeout(300)
def test_a_registration_whose_answer_is_lost_enrols_the_node_the_superlink_made(
    relay: tuple[Federation, AnswerLoser], caplog: pytest.LogCaptureFixture
) -> None:
    fed, loser = relay
    # Arrange: the registration's answer will be lost.
    loser.lose = 1
    # Act
    with caplog.at_level(logging.WARNING, logger="server.federation"):
        entry = fed.enroll("lost-answer")
    # Assert: the SuperLink did register the key, and that node is enrolled with the key
    # pair kept (before, the key pair was removed and the node left off the roster).
    assert loser.lost == 1
    pub = fed.site_dir("lost-answer") / "node.pub"
    assert (fed.site_dir("lost-answer") / "node.key").exists()
    assert _nodes_with(fed, pub) == [entry.node_id]
    assert fed.roster().sites["lost-answer"] == entry
    assert "Connection to the SuperLink is unavailable" in caplog.text
    row = next(r for r in fed.sites() if r["site"] == "lost-answer")
    assert row["status"] == "registered" and row["public-key"] == entry.public_key


@pytest.mark.timeout(300)
def test_with_every_answer_lost_the_key_is_kept_and_the_named_command_finishes(
    relay: tuple[Federation, AnswerLoser], capsys: pytest.CaptureFixture[str]
) -> None:
    fed, loser = relay
    # Arrange: the registration's answer and the node list's are lost.
    loser.lose = 2
    # Act
    with pytest.raises(NoAnswer, match="may have registered the key") as failed:
        fed.enroll("no-answers")
    # Assert: registered, though nothing could tell; the key pair kept, off the roster.
    assert loser.lost == 2
    pub = fed.site_dir("no-answers") / "node.pub"
    registered = _nodes_with(fed, pub)
    assert len(registered) == 1 and "no-answers" not in fed.roster().sites
    assert (fed.site_dir("no-answers") / "node.key").exists()
    # Act: the command the error names, through the CLI.
    command = str(failed.value).split("run: fedlora ", 1)[1].split(" (it enrols", 1)[0]
    assert main(shlex.split(command)) == 0
    # Assert: the SuperLink refused the key as in use; its node is enrolled, no other made.
    assert f"enrolled as node {registered[0]}" in capsys.readouterr().out
    assert fed.roster().sites["no-answers"].node_id == registered[0]
    assert _nodes_with(fed, pub) == registered


@pytest.mark.timeout(300)
def test_sites_shows_the_key_of_a_node_that_is_not_on_the_roster(
    relay: tuple[Federation, AnswerLoser], tmp_path: Path
) -> None:
    fed, _ = relay
    # Arrange: a key registered straight through the Control API, not enrolled.
    pub = tmp_path / "rogue.pub"
    pub.write_bytes(pki.node_public_openssh(pki.make_node_key().public_key()))
    node_id = int(fed.flwr("supernode", "register", str(pub))["node-id"])
    # Act
    rows = [r for r in fed.sites() if r["node-id"] == node_id]
    # Assert: listed with its key's fingerprint, which says whose key it is.
    assert rows == [
        {
            "site": None,
            "node-id": node_id,
            "public-key": pki.fingerprint(pub.read_bytes()),
            "status": "registered, NOT ON THE ROSTER (gets no work)",
            "finish": None,
        }
    ]
