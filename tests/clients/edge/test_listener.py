"""The node's sockets: bound before the model loads, listening only when it serves."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from clients.edge import listener
from clients.task.errors import ConfigError
from server.harness.process import LOCALHOST, free_port, port_open


@contextmanager
def _listening(port: int) -> Iterator[socket.socket]:
    """Another process's server on ``port`` (uvicorn's and asyncio's options)."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind((LOCALHOST, port))
        other.listen()
        yield other


def test_a_bound_port_refuses_connections_until_it_listens() -> None:
    port = free_port()
    sockets = listener.bind(LOCALHOST, port)
    try:
        assert len(sockets) == 1 and sockets[0].getsockname() == (LOCALHOST, port)
        assert not port_open(port)  # a client is refused while the model loads, not queued
        listener.listen(sockets, LOCALHOST, port)
        assert port_open(port)
    finally:
        listener.close(sockets)
    assert not port_open(port)


def test_a_port_in_use_is_refused_naming_host_and_port() -> None:
    port = free_port()
    with _listening(port), pytest.raises(ConfigError) as refused:
        listener.bind(LOCALHOST, port)
    assert str(refused.value) == (
        f"cannot listen on {LOCALHOST}:{port} (--host/--port): Address already in use"
    )


def test_a_server_that_starts_on_the_port_after_the_bind_is_refused_at_listen() -> None:
    # SO_REUSEADDR lets two sockets bind one port while neither listens: the race between
    # the early check and serving ends in the same one-line error, not a traceback.
    port = free_port()
    sockets = listener.bind(LOCALHOST, port)
    try:
        with _listening(port), pytest.raises(ConfigError, match=f"{LOCALHOST}:{port}"):
            listener.listen(sockets, LOCALHOST, port)
    finally:
        listener.close(sockets)


def test_a_host_that_does_not_resolve_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"--host 'no-such-host\.invalid' cannot be resolved"):
        listener.bind("no-such-host.invalid", free_port())


def _ipv6_loopback() -> bool:
    """Whether this machine can bind ::1, asked of a plain socket, not of the code tested."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_an_ipv6_address_is_named_in_brackets() -> None:
    # Skipped only where the machine has no IPv6 loopback: a ConfigError from
    # listener.bind itself fails the test instead of skipping it.
    if not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    sockets = listener.bind("::1", 0)
    port = sockets[0].getsockname()[1]
    try:
        listener.listen(sockets, "::1", port)
        with pytest.raises(ConfigError, match=rf"cannot listen on \[::1\]:{port} "):
            listener.bind("::1", port)
    finally:
        listener.close(sockets)
