"""The node's listening sockets, bound before the base model loads.

A port already in use is found in milliseconds, not after loading the base and pulling
every model. The sockets are bound but not listening while the node loads, so a client
is refused (not queued) until it serves; uvicorn is handed them and listens on them
itself. They are bound as asyncio's ``create_server`` (what uvicorn does with a host and
a port) would: every address the host resolves to, ``SO_REUSEADDR`` (a restarted node
is not kept out by its predecessor's connections in TIME_WAIT), IPv6 sockets v6-only.

    sockets = bind(host, port)        # ConfigError if another process holds the port
    ...load the model...
    listen(sockets, host, port)       # ConfigError if another process listened meanwhile
    uvicorn.Server(config).run(sockets=sockets)
"""

from __future__ import annotations

import socket

from clients.task.errors import ConfigError

# asyncio's default backlog for create_server.
BACKLOG = 100


def bind(host: str, port: int) -> list[socket.socket]:
    """One bound, not yet listening, TCP socket per address of ``host``.

    Raises:
        ConfigError: naming ``host:port`` when it cannot be resolved or bound (in use, not
            an address of this machine, a privileged port).
    """
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} cannot be resolved: {exc.strerror}") from exc
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise _unusable(host, port, exc) from exc
    except BaseException:
        close(sockets)
        raise
    return sockets


def listen(sockets: list[socket.socket], host: str, port: int) -> None:
    """Start listening; another process may have started listening on the port since
    `bind` (``SO_REUSEADDR`` lets two sockets bind while neither listens).

    Raises:
        ConfigError: naming ``host:port`` when it is in use now.
    """
    for sock in sockets:
        try:
            sock.listen(BACKLOG)
        except OSError as exc:
            raise _unusable(host, port, exc) from exc


def close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def _unusable(host: str, port: int, exc: OSError) -> ConfigError:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return ConfigError(f"cannot listen on {where} (--host/--port): {exc.strerror or exc}")
