"""The warm worker's channel: frames, a private socket, peer checks, absence detected.

The jobs here are served by the real `serve` loop in a thread; the model work itself is
covered end to end by tests/integration/test_federation.py (real SuperNodes and workers).
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from clients.site import worker
from clients.site.worker import WorkerAbsent, WorkerError, call, encode, read_frame


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def test_a_frame_round_trips_header_and_tensors_exactly() -> None:
    tensors = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1, -2], dtype=np.int64),
        "c": np.zeros((0, 4), dtype=np.float64),
    }
    left, right = _pair()
    with left, right:
        left.sendall(encode({"kind": "train", "config": {"x": 1.5}}, tensors))
        header, out = read_frame(right)
    assert header == {"kind": "train", "config": {"x": 1.5}}
    assert list(out) == ["a", "b", "c"]
    for name, value in tensors.items():
        assert out[name].dtype == value.dtype
        np.testing.assert_array_equal(out[name], value)


def test_object_arrays_and_lying_sizes_are_refused() -> None:
    left, right = _pair()
    with left, right:
        head = b'{"tensors": [["x", "|O", [1], 8]]}'
        left.sendall(worker.HEADER.pack(len(head)) + head + b"\0" * 8)
        with pytest.raises(WorkerError, match="not numeric"):
            read_frame(right)
    left, right = _pair()
    with left, right:
        head = b'{"tensors": [["x", "<f4", [4], 8]]}'
        left.sendall(worker.HEADER.pack(len(head)) + head + b"\0" * 8)
        with pytest.raises(WorkerError, match="8 bytes for shape"):
            read_frame(right)


def test_the_socket_is_0600_in_a_0700_directory(tmp_path: Path) -> None:
    path = tmp_path / "w" / "worker.sock"
    server = worker.bind_private(path)
    try:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with pytest.raises(WorkerError, match="already listens"):
            worker.bind_private(path)
    finally:
        server.close()


def test_a_directory_open_to_others_is_refused_by_both_ends(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(WorkerError, match="must be 0700"):
        worker.bind_private(shared / "worker.sock")
    with pytest.raises(WorkerError, match="must be 0700"):
        call(shared / "worker.sock", {"kind": "train"}, {})


def test_no_worker_is_reported_as_absent(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir(mode=0o700)
    with pytest.raises(WorkerAbsent):
        call(tmp_path / "w" / "worker.sock", {"kind": "train"}, {})
    with pytest.raises(WorkerAbsent):
        call(tmp_path / "missing" / "worker.sock", {"kind": "train"}, {})


def test_the_peer_uid_is_ours_and_a_failed_job_comes_back_as_an_error(tmp_path: Path) -> None:
    left, right = _pair()
    with left, right:
        assert worker.peer_uid(left) == os.getuid()
    path = tmp_path / "w" / "worker.sock"
    served = threading.Thread(target=worker.serve, args=(path,), kwargs={"max_jobs": 1})
    served.start()
    try:
        for _ in range(100):
            if path.exists():
                break
            threading.Event().wait(0.05)
        # A node config without a data path fails inside the worker, which answers with
        # the reason and stays up for the next job.
        with pytest.raises(WorkerError, match="site worker: ConfigError: node config has no"):
            call(path, {"kind": "train", "node-config": {}, "config": {}, "run": "1"}, {})
    finally:
        served.join(timeout=10)
    assert not served.is_alive() and not path.exists()


def test_a_socket_path_too_long_for_a_unix_address_is_refused_by_name(tmp_path: Path) -> None:
    # A long --out folder (federation local puts sockets under it) or node-config path
    # must give the reason, not a bare "AF_UNIX path too long".
    path = tmp_path / ("x" * 100) / "worker.sock"
    for act in (lambda: worker.bind_private(path), lambda: call(path, {"kind": "train"}, {})):
        with pytest.raises(WorkerError, match=r"worker-socket '.*worker\.sock' is \d+ bytes"):
            act()
