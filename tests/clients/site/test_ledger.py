"""The site's privacy ledger: charge before training, refuse past the budget, survive kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clients.site.ledger import LEDGER_FILE, SiteLedger, budget_report
from clients.task.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
ROUND = {"noise_multiplier": 1.0, "sampling_rate": 0.25, "steps": 8, "delta": 1e-5}


def test_charge_persists_and_accumulates(tmp_path: Path) -> None:
    ledger = SiteLedger.load(tmp_path)
    assert ledger.total_epsilon == 0.0 and not (tmp_path / LEDGER_FILE).exists()
    eps1 = ledger.charge("run-a", 1, **ROUND)
    eps2 = ledger.charge("run-a", 2, **ROUND)
    ledger.charge("run-b", 1, **ROUND)
    again = SiteLedger.load(tmp_path)
    assert 0 < eps1 < eps2 == pytest.approx(again.runs["run-a"].epsilon)
    # Runs compose by adding ε: two runs of one round each cost 2·ε1.
    assert again.total_epsilon == pytest.approx(eps2 + eps1)
    assert again.runs["run-a"].rounds == [1, 2]
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed, not left


def test_epsilon_after_does_not_charge(tmp_path: Path) -> None:
    ledger = SiteLedger.load(tmp_path)
    run_eps, total = ledger.epsilon_after("r", **ROUND)
    assert run_eps == total > 0 and ledger.total_epsilon == 0.0


def test_unreadable_ledger_is_refused(tmp_path: Path) -> None:
    (tmp_path / LEDGER_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        SiteLedger.load(tmp_path)


def test_budget_report(tmp_path: Path) -> None:
    ledger = SiteLedger.load(tmp_path)
    ledger.max_epsilon = 10.0
    eps = ledger.charge("run-a", 1, **ROUND)
    report = budget_report(tmp_path, None)
    assert report["spent_epsilon"] == pytest.approx(eps)
    assert report["remaining_epsilon"] == pytest.approx(10.0 - eps)
    assert budget_report(tmp_path, 1e9)["max_epsilon"] == 1e9
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has not trained with DP-SGD"):
        budget_report(tmp_path / "empty", None)


# A site process: charge a round exactly as the ClientApp does, then "train" forever.
CHILD = """
import sys, time
from pathlib import Path
from clients.site.work import _charge_budget
from clients.site.settings import SiteSettings
from clients.task.model import ModelSpec
from clients.task.plan import TrainPlan
state, budget, server_round = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
site = SiteSettings(data_path=Path("x"), site_id="s", state_dir=state, max_epsilon=budget)
spec = ModelSpec(base="b", task="causal-lm")
plan = TrainPlan(spec=spec, base_digest="d", server_round=server_round, local_steps=8,
                 batch_size=4, site_dp_noise_multiplier=1.0)
_charge_budget(site, plan, run="run-1", num_train=16)
print("charged", flush=True)
time.sleep(600)
"""


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_kill_9_mid_round_loses_no_entry_and_never_exceeds_budget(tmp_path: Path) -> None:
    from clients.site.settings import SiteSettings
    from clients.site.work import _charge_budget
    from clients.task.errors import BudgetRefused
    from clients.task.model import ModelSpec
    from clients.task.plan import TrainPlan

    budget = 20.0
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), str(budget), "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"charged"
    proc.send_signal(signal.SIGKILL)  # mid-"training", after the charge
    proc.wait()
    # The restarted site sees the killed round, and keeps refusing once past its budget.
    ledger = SiteLedger.load(tmp_path)
    assert ledger.runs["run-1"].rounds == [1]
    site = SiteSettings(data_path=Path("x"), site_id="s", state_dir=tmp_path, max_epsilon=budget)
    refused_at = None
    for server_round in range(2, 40):
        plan = TrainPlan(
            spec=ModelSpec(base="b", task="causal-lm"),
            base_digest="d",
            server_round=server_round,
            local_steps=8,
            batch_size=4,
            site_dp_noise_multiplier=1.0,
        )
        try:
            _charge_budget(site, plan, run="run-1", num_train=16)
        except BudgetRefused as exc:
            refused_at = server_round
            assert "max-epsilon=20.0" in str(exc)
            break
    assert refused_at is not None
    final = SiteLedger.load(tmp_path)
    assert final.total_epsilon <= budget
    assert final.runs["run-1"].rounds == list(range(1, refused_at))
    assert json.loads((tmp_path / LEDGER_FILE).read_text())["max_epsilon"] == budget
