"""``fedlora edge serve``: what it checks before the slow part (loading the base)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from clients.edge import node as node_module
from server.cli import EXIT_ERROR, main
from server.harness.process import LOCALHOST, free_port


def _serve(tmp_path: Path, port: int) -> list[str]:
    trust = tmp_path / "trust"
    trust.mkdir(exist_ok=True)
    return ["edge", "serve", "--model", "intents", "--trust", str(trust),
            "--cache", str(tmp_path / "cache"), "--registry", "http://127.0.0.1:9",
            "--host", LOCALHOST, "--port", str(port)]  # fmt: skip


class RacedNode:
    """Loads nothing; while it "loads", another server starts listening on the port."""

    closed = False
    index_models = None

    def __init__(self, settings) -> None:
        self.port = settings.port
        self.other = socket.socket()

    def start(self) -> None:
        self.other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.other.bind((LOCALHOST, self.port))
        self.other.listen()

    def unknown_models(self) -> list[str]:
        return []

    def health(self) -> dict:
        return {"models": {}}

    def close(self) -> None:
        RacedNode.closed = True
        self.other.close()


def test_serve_on_a_port_in_use_fails_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_node(settings):
        raise AssertionError("the node was built (and the base loaded) before the port check")

    monkeypatch.setattr(node_module, "EdgeNode", no_node)
    port = free_port()
    with socket.socket() as other:
        other.bind((LOCALHOST, port))
        other.listen()

        rc = main(_serve(tmp_path, port))

    assert rc == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"error: cannot listen on {LOCALHOST}:{port} (--host/--port)" in err
    assert "serving on" not in err


def test_serve_loses_a_race_for_its_port_with_the_same_error_and_stops_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(node_module, "EdgeNode", RacedNode)
    port = free_port()

    rc = main(_serve(tmp_path, port))

    assert rc == EXIT_ERROR and RacedNode.closed
    err = capsys.readouterr().err
    assert f"error: cannot listen on {LOCALHOST}:{port} (--host/--port)" in err
    assert "serving on" not in err


class TypoNode(RacedNode):
    """The release index it reached has ``intents``, not the ``intnets`` asked for (and,
    as RacedNode, it loses its port, so the command ends instead of serving)."""

    index_models = ("intents", "spam")

    def unknown_models(self) -> list[str]:
        return ["intnets"]


def test_serve_warns_of_a_model_the_reachable_index_does_not_have(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A warning, not a refusal: a node may be deployed before its model's first release.
    monkeypatch.setattr(node_module, "EdgeNode", TypoNode)

    main(_serve(tmp_path, free_port()))

    err = " ".join(capsys.readouterr().err.split())
    assert (
        "warning: --model 'intnets': the registry's release index has no such model "
        "(its models: 'intents', 'spam'); unavailable until a release of it is published"
    ) in err
    assert err.index("warning: --model") < err.index("error: cannot listen")
