"""A site's warm worker: one long-lived process that keeps model, tokenizer and data loaded.

Flower starts a fresh ClientApp process for every message a SuperNode receives (a
SecAgg+ round is four), and each would import torch, transformers and peft and load the
base model again. With ``worker-socket`` in the SuperNode's node config, the ClientApp
instead hands the request's tensors and plan to the site's worker (``fedlora site worker
--socket PATH``) and builds its reply from what comes back; the ClientApp process then
imports no torch at all. Without a worker listening it does the work itself.

The channel is a Unix-domain socket that only the site's own user can open:

- the socket's directory is the worker's own, mode 0700 (refused otherwise), and the
  socket file is created with mode 0600;
- each side checks the other's user id with ``SO_PEERCRED`` (Linux): the worker serves
  only its own uid, the ClientApp talks only to a worker of its own uid, so a socket
  someone else placed is never trusted with the site's tensors.

Frames are a length-prefixed JSON header followed by the raw bytes of the tensors it
lists (numeric dtypes only; nothing is unpickled). One request per connection; the
worker serves one request at a time, as a site trains one round at a time.

Usage::

    fedlora site worker --socket /run/fedlora/site-a/worker.sock
    flower-supernode ... --node-config "... worker-socket='/run/fedlora/site-a/worker.sock'"
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from clients.task.errors import FedloraError

log = logging.getLogger(__name__)

HEADER = struct.Struct(">Q")  # the JSON header's length, then the header, then tensor bytes
MAX_HEADER = 16 << 20
NUMERIC_KINDS = set("biuf")  # bool, int, uint, float: never object arrays
# sockaddr_un.sun_path holds 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH = 107


class WorkerError(FedloraError):
    """The channel to the site's worker is unsafe, broken, or the worker failed the job."""


class WorkerAbsent(WorkerError):
    """No worker listens at the configured socket (the ClientApp works in process)."""


# --------------------------------------------------------------------------- framing


def encode(header: Mapping[str, Any], tensors: Mapping[str, np.ndarray] | None = None) -> bytes:
    """One frame: header length, the JSON header (with the tensor table), tensor bytes."""
    arrays = {k: np.ascontiguousarray(v) for k, v in (tensors or {}).items()}
    table = [[name, a.dtype.str, list(a.shape), a.nbytes] for name, a in arrays.items()]
    head = json.dumps({**header, "tensors": table}).encode()
    return b"".join([HEADER.pack(len(head)), head, *(a.tobytes() for a in arrays.values())])


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise WorkerError(f"channel closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read one frame written by `encode`.

    Raises:
        WorkerError: For a closed channel, an oversized header or a non-numeric tensor.
    """
    (size,) = HEADER.unpack(_recv_exactly(sock, HEADER.size))
    if size > MAX_HEADER:
        raise WorkerError(f"frame header of {size} bytes exceeds {MAX_HEADER}")
    header = json.loads(_recv_exactly(sock, size))
    tensors: dict[str, np.ndarray] = {}
    for name, dtype_str, shape, nbytes in header.pop("tensors", []):
        dtype = np.dtype(dtype_str)
        if dtype.kind not in NUMERIC_KINDS:
            raise WorkerError(f"tensor {name!r} has dtype {dtype_str!r}, not numeric")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes != expected:
            raise WorkerError(f"tensor {name!r}: {nbytes} bytes for shape {shape} {dtype}")
        data = _recv_exactly(sock, nbytes)
        tensors[name] = np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    return header, tensors


# --------------------------------------------------------------------------- safety


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (Linux SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def check_socket_path(socket_path: Path) -> None:
    """Raises WorkerError if ``socket_path`` is too long for a Unix socket address."""
    size = len(os.fsencode(socket_path))
    if size > MAX_SOCKET_PATH:
        raise WorkerError(
            f"worker-socket {str(socket_path)!r} is {size} bytes; a Unix socket path holds at "
            f"most {MAX_SOCKET_PATH}: choose a shorter one (e.g. under /run)"
        )


def check_private_dir(directory: Path) -> None:
    """Raises WorkerError unless ``directory`` is ours and closed to group and others."""
    try:
        info = directory.lstat()
    except FileNotFoundError as exc:
        raise WorkerAbsent(f"{directory} does not exist") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise WorkerError(f"{directory} is not a directory")
    if info.st_uid != os.getuid():
        raise WorkerError(f"{directory} belongs to uid {info.st_uid}, not to us ({os.getuid()})")
    if info.st_mode & 0o077:
        raise WorkerError(
            f"{directory} has mode {stat.S_IMODE(info.st_mode):o}; the worker's directory "
            "must be 0700 so no other user can reach its socket"
        )


# --------------------------------------------------------------------------- ClientApp side


def call(
    socket_path: Path, header: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Send one job to the worker at ``socket_path`` and wait for its answer.

    Raises:
        WorkerAbsent: If nothing listens there (the caller may work in process).
        WorkerError: If the channel is not private, the worker is another user's, the
            connection breaks mid-job, or the worker reports an error.
    """
    check_socket_path(socket_path)
    check_private_dir(socket_path.parent)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(str(socket_path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise WorkerAbsent(f"no worker listens on {socket_path}") from exc
        uid = peer_uid(sock)
        if uid != os.getuid():
            raise WorkerError(f"the process on {socket_path} runs as uid {uid}, not ours")
        sock.sendall(encode(header, tensors))
        answer, out = read_frame(sock)
    finally:
        sock.close()
    if "error" in answer:
        raise WorkerError(f"site worker: {answer['error']}")
    return answer, out


# --------------------------------------------------------------------------- worker side


def _handle(header: dict[str, Any], tensors: dict[str, np.ndarray]) -> bytes:
    """Run one job in this (warm) process; every failure becomes an error answer."""
    from clients.site import work  # torch, transformers, peft: loaded once, in the worker
    from clients.site.settings import SiteSettings

    try:
        site = SiteSettings.from_node_config(header["node-config"])
        answer, tensors = work.run_job(
            str(header["kind"]), site, tensors, header["config"], run=str(header["run"])
        )
        return encode(answer, tensors)
    except Exception as exc:  # the worker outlives a bad job; the ClientApp reports it
        log.exception("job failed")
        return encode({"error": f"{type(exc).__name__}: {exc}"})


def bind_private(socket_path: Path) -> socket.socket:
    """A listening Unix socket at ``socket_path``: directory 0700, socket 0600.

    Raises:
        WorkerError: If the directory exists but is not private, or a live worker
            already listens there.
    """
    check_socket_path(socket_path)
    directory = socket_path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private_dir(directory)
    if socket_path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(socket_path))
        except (ConnectionRefusedError, FileNotFoundError):
            socket_path.unlink()  # a dead worker's socket
        else:
            raise WorkerError(f"a worker already listens on {socket_path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is born 0600: no window with wider rights
    try:
        sock.bind(str(socket_path))
    finally:
        os.umask(old)
    os.chmod(socket_path, 0o600)
    sock.listen(8)
    return sock


def serve(socket_path: Path, *, max_jobs: int | None = None) -> None:
    """Serve jobs on ``socket_path`` until interrupted (or after ``max_jobs``)."""
    server = bind_private(socket_path)
    log.info("site worker listening on %s", socket_path)
    served = 0
    try:
        while max_jobs is None or served < max_jobs:
            conn, _ = server.accept()
            with conn:
                uid = peer_uid(conn)
                if uid != os.getuid():
                    log.warning("refused a connection from uid %d", uid)
                    continue
                try:
                    header, tensors = read_frame(conn)
                except (WorkerError, ValueError, KeyError) as exc:
                    log.warning("unreadable job: %s", exc)
                    continue
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    conn.sendall(_handle(header, tensors))
                served += 1
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
