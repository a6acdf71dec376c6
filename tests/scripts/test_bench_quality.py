"""bench_quality's report on a made-up run: JSON, PNG, ratio, stability flag (no training)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_quality as bq


def _results(fed: list[float], cen: list[float]) -> dict:
    return {
        "scale": {"data": "x", "sites": 3, "alpha": 0.5, "rounds": len(fed), "labels": 4,
                  "site_train_rows": 90, "chance": 0.25},
        "settings": {},
        "federated": {
            "label": "federated, defaults",
            "history": [{"round": i + 1, "accuracy": a} for i, a in enumerate(fed)],
            "best_accuracy": max(fed),
            "final_accuracy": fed[-1],
        },
        "centralized": {
            "per_epoch": [{"epoch": i + 1, "accuracy": a} for i, a in enumerate(cen)],
            "best_accuracy": max(cen),
            "final_accuracy": cen[-1],
        },
        "total_wall_seconds": 1.0,
    }  # fmt: skip


def test_report_writes_json_and_png_and_flags_a_late_drop(tmp_path: Path) -> None:
    # Round 3 drops 0.80 -> 0.75: more than 2 points, flagged.
    path = tmp_path / "bench_quality.json"

    code = bq.report(_results([0.5, 0.8, 0.75], [0.7, 0.8, 0.9]), path)

    out = json.loads(path.read_text())
    assert code == 1  # 0.80 / 0.90 < 0.97
    assert out["comparison"]["ratio"] == pytest.approx(0.8 / 0.9)
    stability = out["federated"]["stability"]
    assert not stability["stable"] and stability["max_drop"] == pytest.approx(0.05)
    assert [d["round"] for d in stability["flagged"]] == [3]
    assert path.with_suffix(".png").stat().st_size > 0


def test_a_run_on_target_and_stable_exits_0(tmp_path: Path) -> None:
    code = bq.report(_results([0.5, 0.79, 0.80], [0.7, 0.8, 0.81]), tmp_path / "b.json")

    out = json.loads((tmp_path / "b.json").read_text())
    assert code == 0 and out["federated"]["stability"]["stable"]


@pytest.mark.parametrize(
    ("given", "own", "expected"),
    [
        ([], ("all-linear",), ["all-linear", ""]),  # the run's layers and peft's default
        ([], (), [""]),  # the run uses peft's default: one reference
        ([], ("query", "value"), ["query,value", ""]),
        (["", "all-linear", ""], ("all-linear",), ["", "all-linear"]),  # as given, once each
    ],
)
def test_the_centralized_reference_trains_each_variant_once(
    given: list[str], own: tuple[str, ...], expected: list[str]
) -> None:
    settings = SimpleNamespace(spec=SimpleNamespace(target_modules=own))
    assert bq.central_targets(given, settings) == expected
