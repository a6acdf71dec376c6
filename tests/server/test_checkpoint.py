from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clients.task.errors import ConfigError
from server.checkpoint import Checkpoint, CheckpointStore, outputs_complete


def _ckpt(k: int) -> Checkpoint:
    return Checkpoint(
        completed_round=k,
        state={"w": np.full(3, k, np.float32)},
        history=[{"round": i} for i in range(1, k + 1)],
        run_id="r",
        fingerprint={"x": 1},
    )


def test_save_load_keeps_only_the_newest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    assert store.load() is None
    store.save(_ckpt(1))
    store.save(_ckpt(2))
    loaded = store.load()
    assert loaded is not None and loaded.completed_round == 2
    np.testing.assert_array_equal(loaded.state["w"], [2, 2, 2])
    assert [p.name for p in tmp_path.glob("round-*.npz")] == ["round-2.npz"]
    assert not list(tmp_path.glob(".*tmp*"))


def test_unreadable_checkpoint_is_named(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_ckpt(1))
    (tmp_path / "round-1.npz").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="unreadable"):
        store.load()


def test_server_optimizer_state_round_trips_beside_the_state(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    ckpt = _ckpt(1)
    server_state = {"m::w": np.array([0.5, -1.0, 2.0], np.float32), "v::w": np.ones(3)}
    store.save(Checkpoint(**{**ckpt.__dict__, "server_state": server_state}))
    loaded = store.load()
    assert loaded is not None
    assert set(loaded.state) == {"w"}
    assert set(loaded.server_state) == {"m::w", "v::w"}
    np.testing.assert_array_equal(loaded.server_state["m::w"], server_state["m::w"])
    store.save(_ckpt(2))  # a plain FedAvg checkpoint carries no optimiser state
    loaded = store.load()
    assert loaded is not None and loaded.server_state == {}


def test_best_round_and_its_tensors_round_trip_apart_from_the_state(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    ckpt = _ckpt(3)
    best = {"w": np.array([7.0, 8.0, 9.0], np.float32)}
    store.save(
        Checkpoint(**{**ckpt.__dict__, "best_round": 2, "best_accuracy": 0.75, "best_state": best})
    )

    loaded = store.load()

    assert loaded is not None
    assert (loaded.best_round, loaded.best_accuracy) == (2, 0.75)
    assert set(loaded.state) == {"w"} and set(loaded.best_state) == {"w"}
    np.testing.assert_array_equal(loaded.state["w"], [3, 3, 3])
    np.testing.assert_array_equal(loaded.best_state["w"], best["w"])


@pytest.mark.parametrize(
    ("metrics", "complete"),
    [
        ('{"rounds": [{"round": 1}, {"round": 2}], "mlflow_run_id": "r"}', True),
        ('{"rounds": [{"round": 1}], "mlflow_run_id": "r"}', False),  # an earlier round
        ('{"rounds": [{"round": 1}, {"round": 2}], "mlflow_run_id": "old"}', False),
        ('{"rounds": [{"round": 1}, {"round": 2}]}', False),  # names no run
        ('{"rounds": [], "mlflow_run_id": "r"}', False),
        ("[1, 2]", False),
        ("{not json", False),
        (None, False),
    ],
)
def test_outputs_are_complete_only_where_metrics_json_is_the_run_s_at_its_round(
    tmp_path: Path, metrics: str | None, complete: bool
) -> None:
    if metrics is not None:
        (tmp_path / "metrics.json").write_text(metrics)

    assert outputs_complete(tmp_path, completed_round=2, run_id="r") is complete


def test_newest_reads_the_round_and_run_id_without_the_tensors(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    assert store.newest() == (0, None)
    store.save(_ckpt(2))
    (tmp_path / "round-2.npz").unlink()  # not read

    assert store.newest() == (2, "r")
