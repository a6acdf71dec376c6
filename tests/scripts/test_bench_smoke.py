"""Smoke test of scripts/bench_round.py at its smallest scale (2 sites, 1 round, 1 step)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_round.py"


# About 60 s on 2 shared cores, most of it Ray starting and two actors loading MiniLM.
@pytest.mark.timeout(240)
def test_bench_round_writes_results_with_every_key(tmp_path: Path) -> None:
    out = tmp_path / "out"

    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--sites",
            "2",
            "--rounds",
            "1",
            "--local-steps",
            "1",
            "--rows-per-site",
            "16",
            "--deployment-sites",
            "",
            "--out",
            str(out),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )

    # Exit 1 only means "off target", which one local step always is.
    assert done.returncode in (0, 1), done.stderr[-3000:]
    results = json.loads((out / "bench_round.json").read_text())
    assert (out / "bench_round.png").stat().st_size > 0
    assert {
        "machine",
        "settings",
        "trainable",
        "targets",
        "simulation",
        "deployment",
        "total_wall_seconds",
    } <= set(results)
    assert {"cores", "torch"} <= set(results["machine"])
    assert results["deployment"].startswith("not measured")
    run = results["simulation"]["2"]
    assert run["sites"] == 2 and run["parallelism"] == min(2, results["machine"]["cores"])
    summary = run["summary"]
    assert {
        "round_seconds",
        "max_site_train_seconds",
        "overhead_a_fraction",
        "overhead_b_fraction",
        "bytes_up_per_site",
        "bytes_ratio",
        "wire_ratio",
        "on_target",
    } <= set(summary)
    assert [r["round"] for r in run["rounds"]] == [1]
    # What travels is the trainable tensors plus .npy headers and key names: a few % more.
    assert 1.0 < summary["bytes_ratio"] < 1.1
    assert 0 < summary["max_site_train_seconds"] <= summary["round_seconds"]


CLINC150 = ROOT.parent / "shared" / "data" / "clinc150"


def _clinc150_dir(tmp_path: Path) -> Path:
    """CLINC150 when this checkout sits beside it, else a CLINC150-shaped stand-in.

    The stand-in has the file layout and label count (150) of the real set with generated
    sentences, so the bench's plumbing is tested on any checkout (a worktree elsewhere, a
    CI runner without the shared data) instead of being skipped.
    """
    if (CLINC150 / "data_full.json").is_file():
        return CLINC150
    words = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
    splits: dict[str, list[list[str]]] = {"train": [], "val": [], "test": []}
    for label in range(150):
        for split, count in (("train", 4), ("val", 1), ("test", 2)):
            for i in range(count):
                text = f"please {words[label % 8]} {words[label // 8 % 8]} {label} {split} {i}"
                splits[split].append([text, f"intent_{label:03d}"])
    splits["oos_train"] = [["out of scope", "oos"]]
    stand_in = tmp_path / "clinc150"
    stand_in.mkdir()
    (stand_in / "data_full.json").write_text(json.dumps(splits), encoding="utf-8")
    return stand_in


@pytest.mark.timeout(300)
def test_bench_quality_writes_results_and_compares(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_quality.py"),
            "--data-dir",
            str(_clinc150_dir(tmp_path)),
            "--sites",
            "3",
            "--max-labels",
            "0",
            "--per-label",
            "3",
            "--train-rows",
            "0",
            "--test-per-label",
            "1",
            "--test-rows",
            "0",
            "--rounds",
            "1",
            "--set",
            "server.momentum=0.5",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: below target, expected here
    results = json.loads((out / "bench_quality.json").read_text())
    assert (out / "bench_quality.png").stat().st_size > 0
    comparison = results["comparison"]
    assert 0.0 <= comparison["federated_best"] <= 1.0
    assert comparison["ratio"] == pytest.approx(
        comparison["federated_best"] / comparison["centralized_best"]
    )
    assert comparison["on_target"] == (comparison["ratio"] >= 0.97)
    assert results["scale"]["labels"] == 150 and results["scale"]["passes"] == 1
    assert sum(results["scale"]["site_rows"]) == results["scale"]["train_rows"] == 450
    assert results["settings"]["federated_overrides"] == ["server.momentum=0.5"]
    assert float(results["settings"]["federated"]["server.momentum"]) == 0.5
    # The reference is the stronger of the centralized variants, each named.
    variants = results["centralized_variants"]
    own = results["settings"]["federated"]["lora.target-modules"]
    assert [v["target_modules"] for v in variants] == ([own, ""] if own else [""])
    assert comparison["centralized_best"] == max(v["best_accuracy"] for v in variants)


@pytest.mark.timeout(120)
def test_bench_signing_writes_results_with_every_key(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = ROOT / "scripts" / "bench_signing.py"
    done = subprocess.run(
        [sys.executable, str(script), "--sizes-mb", "1", "2", "--repeats", "1",
         "--publish-mb", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "signing.json").read_text())
    assert [r["size_mb"] for r in result["sizes"]] == [1, 2]
    for row in result["sizes"]:
        assert row["bytes"] >= row["size_mb"] << 20
        for key in ("sha256sum_MBps", "sign_MBps", "verify_MBps", "stock_verify_MBps"):
            assert row[key] > 0
    assert (out / "signing.png").stat().st_size > 0


# About 30 s: Ray, three synthetic sites, one SecAgg+ round, two MiniLM steps.
@pytest.mark.timeout(240)
def test_bench_privacy_quick_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_privacy.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: off target
    results = json.loads((out / "bench_privacy.json").read_text())
    assert (out / "bench_privacy.png").stat().st_size > 0
    (row,) = results["secagg"]
    assert row["sites"] == 3 and row["secagg_seconds"] > 0 and row["secagg_bytes_ratio"] > 1
    assert results["dpsgd"]["dpsgd_step_seconds"] > 0
    assert {"machine", "targets", "on_target", "total_wall_seconds"} <= set(results)


# Two Flower simulations of 3 sites, one round, one step each: a few minutes on 2 cores.
@pytest.mark.timeout(600)
def test_bench_robustness_writes_results_with_every_key(tmp_path: Path) -> None:
    out = tmp_path / "out"

    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_robustness.py"),
            "--sites",
            "3",
            "--per-site",
            "16",
            "--eval-size",
            "16",
            "--rounds",
            "1",
            "--local-steps",
            "1",
            "--runs",
            "fedavg-attacked,bounded-attacked",
            "--out",
            str(out),
            "--tag",
            "smoke",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=580,
        check=False,
    )

    # Exit 1: the honest runs, which the accuracy target needs, were not run.
    assert done.returncode == 1, done.stderr[-3000:]
    results = json.loads((out / "bench_robustness-smoke.json").read_text())
    assert (out / "bench_robustness-smoke.png").stat().st_size > 0
    assert set(results["runs"]) == {"fedavg-attacked", "bounded-attacked"}
    verdict = results["verdict"]
    # FedAvg gives the 10^7-row claim nearly everything; bounded influence at most 2 / (n+1).
    assert verdict["fedavg_attacked_max_share_x_fair"] > 2.9
    assert verdict["bounded_attacked_max_share_x_fair"] <= 1.5 + 1e-9
    assert verdict["share_on_target"] and verdict["accuracy_on_target"] is False


# About 15 s on 2 shared cores: two site counts, two runs each, one round of MiniLM.
@pytest.mark.timeout(300)
def test_bench_dp_sites_quick_writes_the_curve(tmp_path: Path) -> None:
    # A labelled file of our own (4 labels, each with its own words), so the smoke test
    # needs no downloaded data set.
    words = {
        "alpha": "red apple",
        "beta": "blue ocean",
        "gamma": "green forest",
        "delta": "gold sun",
    }
    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": f"the {w} number {i}", "label": label}) + "\n"
            for label, w in words.items()
            for i in range(50)
        )
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_dp_sites.py"),
            "--quick",
            "--data",
            str(data),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: below the 0.90 target
    results = json.loads((out / "bench_dp_sites.json").read_text())
    assert (out / "bench_dp_sites.png").stat().st_size > 0
    assert [r["sites"] for r in results["rows"]] == [2, 4]
    assert results["dp_label"] == "dp.clip-norm=0.5 dp.target-epsilon=8"
    assert results["scale"]["train_rows"] == 80 and results["scale"]["labels"] == 4
    for row in results["rows"]:
        assert row["ratio_best"] == pytest.approx(
            row["dp"]["best_accuracy"] / row["non_private"]["best_accuracy"]
        )
        # The same total rows at every site count; the accountant stopped at the target.
        assert row["site_train_rows"] <= results["scale"]["train_rows"]
        client = row["dp"]["client_level"]
        assert 7.9 <= client["epsilon"] <= 8.0 and client["clip_norm"] == 0.5
        assert client["noise_std_on_mean"] == pytest.approx(
            client["noise_multiplier"] * 0.5 / row["sites"]
        )
        assert "client_level" not in row["non_private"]
        # Both runs start from the same state (the defaults' head.init), before any noise.
        assert row["dp"]["start_accuracy"] == row["non_private"]["start_accuracy"]
        assert 0 <= row["dp"]["start_accuracy"] <= 1
