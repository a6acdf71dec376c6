"""Smoke test of scripts/bench_hybrid.py at its smallest scale (--quick)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_hybrid import SWEEP, default_data  # noqa: E402

from clients.edge.settings import DEFAULT_ESCALATE_BELOW  # noqa: E402


# About 2 minutes on 2 shared cores: two small trainings, a registry and two edge nodes.
@pytest.mark.timeout(900)
def test_bench_hybrid_reports_the_curve_and_the_goal(tmp_path: Path) -> None:
    data = default_data()
    assert (data / "data_full.json").is_file(), f"CLINC150 is expected at {data}"

    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_hybrid.py"), "--quick", "--out",
         str(tmp_path), "--data", str(data)],
        cwd=ROOT, capture_output=True, text=True, timeout=850, check=False,
    )  # fmt: skip

    # Exit 1 only means "goal missed", which the tiny --quick models well may.
    assert done.returncode in (0, 1), done.stderr[-3000:]
    result = json.loads((tmp_path / "hybrid.json").read_text())
    assert (tmp_path / "hybrid.png").stat().st_size > 0
    assert [pt["p"] for pt in result["sweep"]] == SWEEP
    assert result["chosen_p"] == DEFAULT_ESCALATE_BELOW  # the node's default
    assert result["validation"]["p"] in SWEEP
    assert result["setup"]["test_rows"] == 8 * 4
    hybrid, local = result["measured"]["hybrid"], result["measured"]["local_only"]
    assert 0 <= hybrid["escalated"] <= 1 and set(hybrid["reasons"]) <= {
        "confident", "low-confidence", "mixed"}  # fmt: skip
    # The offline sweep at the chosen P is what the real hybrid node did.
    point = next(pt for pt in result["sweep"] if pt["p"] == result["chosen_p"])
    assert point["escalated"] == pytest.approx(hybrid["escalated"], abs=2 / 32)
    assert local["p50_ms"] > 0 and isinstance(result["goal"]["met"], bool)
