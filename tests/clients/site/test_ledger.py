"""The site's privacy ledger: charge before training, refuse past the budget, survive kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clients.site.ledger import LEDGER_FILE, LedgerMissing, SiteLedger, budget_report
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


def _entry(**fields: object) -> dict:
    return {"delta": 1e-5, "steps": [[1.0, 0.25, 8]], "rounds": [1]} | fields


@pytest.mark.parametrize(
    "document",
    [
        {"runs": []},  # not an object
        {"runs": {"r": _entry(delta="nan")}},
        {"runs": {"r": _entry(steps=[[-1.0, 0.25, 8]])}},  # negative noise
        {"runs": {"r": _entry(steps=[[1.0, 2.0, 8]])}},  # sampling rate above 1
        {"runs": {"r": _entry(steps=[[1.0, 0.25, 0]])}},
        {"runs": {"r": _entry()}, "max_epsilon": "eight"},
        {"runs": {"r": _entry()}, "max_epsilon": [8]},
        # A bool or a numeric string is no number (float() took them as 1.0 and 8.0).
        {"runs": {"r": _entry()}, "max_epsilon": True},
        {"runs": {"r": _entry()}, "max_epsilon": "8"},
        {"runs": {"r": _entry()}, "opening_epsilon": True},
        {"runs": {"r": _entry()}, "opening_epsilon": "0.5"},
        # Integers past float range (JSON reads them exactly): float() overflows on them.
        {"runs": {"r": _entry()}, "max_epsilon": 10**400},
        {"runs": {"r": _entry()}, "opening_epsilon": 10**400},
        {"runs": {"r": _entry(steps=[[10**400, 0.25, 8]])}},
        {"runs": {"r": _entry(delta=10**400)}},
        # Steps and rounds are read as they are, not converted: int(1.9) is 1 (a lower ε),
        # and a bool or a numeric string is no number.
        {"runs": {"r": _entry(steps=[[1.0, 0.25, 1.9]])}},
        {"runs": {"r": _entry(steps=[[1.0, 0.25, True]])}},
        {"runs": {"r": _entry(steps=[[1.0, 0.25, "8"]])}},
        {"runs": {"r": _entry(steps=[[True, 0.25, 8]])}},
        {"runs": {"r": _entry(steps=[["1.0", 0.25, 8]])}},
        {"runs": {"r": _entry(steps=[[1.0, "0.25", 8]])}},
        {"runs": {"r": _entry(delta="1e-5")}},
        {"runs": {"r": _entry(rounds=[1.5])}},
    ],
)
def test_a_corrupt_ledger_is_refused_naming_the_file(tmp_path: Path, document: dict) -> None:
    (tmp_path / LEDGER_FILE).write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=f"{LEDGER_FILE} is unreadable.*--reset"):
        SiteLedger.load(tmp_path, required=True)


def test_a_stored_run_with_a_negative_epsilon_never_lowers_the_total(tmp_path: Path) -> None:
    # Arrange: a run charged with δ = 0.9 (a plan could ask it before δ was the site's) has
    # a negative RDP ε; it must not make room for more rounds.
    (tmp_path / LEDGER_FILE).write_text(json.dumps({"runs": {"old": _entry(delta=0.9)}}))
    ledger = SiteLedger.load(tmp_path, required=True)
    # Act / Assert
    with pytest.raises(ConfigError, match="run old: ε=-"):
        ledger.total_epsilon  # noqa: B018
    with pytest.raises(ConfigError, match="run old"):
        ledger.charge("new", 1, **ROUND)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"delta": 0.9}, "is not a finite number >= 0"),  # RDP's conversion turns negative
        ({"delta": 1.0}, "must be in"),
        ({"noise_multiplier": float("nan")}, "noise multiplier nan"),
        ({"noise_multiplier": 0.0}, "noise multiplier 0.0"),
        ({"sampling_rate": 0.0}, "sampling rate 0.0"),
        ({"steps": 0}, "steps 0"),
    ],
)
def test_a_charge_that_would_not_be_a_valid_epsilon_is_refused(
    tmp_path: Path, change: dict, message: str
) -> None:
    ledger = SiteLedger.load(tmp_path)
    ledger.charge("run-a", 1, **ROUND)
    spent = ledger.total_epsilon
    with pytest.raises(ConfigError, match=message):
        ledger.charge("run-b", 1, **(ROUND | change))
    assert SiteLedger.load(tmp_path).total_epsilon == spent == ledger.total_epsilon


def test_a_run_keeps_its_delta(tmp_path: Path) -> None:
    ledger = SiteLedger.load(tmp_path)
    ledger.charge("run-a", 1, **ROUND)
    with pytest.raises(ConfigError, match=r"charged with δ=1e-05, this round asks δ=0\.001"):
        ledger.charge("run-a", 2, **(ROUND | {"delta": 1e-3}))


def test_reset_records_why_and_what_was_there(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs --reason"):
        SiteLedger.reset(tmp_path, reason=" ")
    with pytest.raises(LedgerMissing, match="--reset"):
        SiteLedger.load(tmp_path, required=True)
    first = SiteLedger.reset(tmp_path, reason="new site")
    eps = first.charge("run-a", 1, **ROUND)
    SiteLedger.reset(tmp_path, reason="new data set", spent=1.5)
    ledger = SiteLedger.load(tmp_path, required=True)
    assert ledger.total_epsilon == 1.5 and not ledger.runs
    assert [r["reason"] for r in ledger.resets] == ["new site", "new data set"]
    assert ledger.resets[0]["previous"] == {"state": "missing"}
    previous = ledger.resets[1]["previous"]
    assert previous["state"] == "present" and previous["runs"] == ["run-a"]
    assert previous["total_epsilon"] == pytest.approx(eps)
    (tmp_path / LEDGER_FILE).write_text("{torn")
    SiteLedger.reset(tmp_path, reason="disk error")
    assert SiteLedger.load(tmp_path).resets[-1]["previous"]["state"] == "unreadable"


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


def test_budget_report_shows_the_enforced_total_not_the_stated_one(tmp_path: Path) -> None:
    # An edited ledger that lowers its stated total must not make `site budget` report
    # less than the site charges against: the report recomputes from the recorded steps.
    ledger = SiteLedger.load(tmp_path)
    ledger.max_epsilon = 10.0
    eps = ledger.charge("run-a", 1, **ROUND)
    raw = json.loads((tmp_path / LEDGER_FILE).read_text())
    raw["total_epsilon"] = 0.01
    raw["runs"]["run-a"]["epsilon"] = 0.01
    (tmp_path / LEDGER_FILE).write_text(json.dumps(raw))
    report = budget_report(tmp_path, None)
    assert eps > 0.01 and report["spent_epsilon"] == pytest.approx(eps)
    assert report["runs"]["run-a"]["epsilon"] == pytest.approx(eps)
    assert report["remaining_epsilon"] == pytest.approx(10.0 - eps)
    assert report["stored_total_epsilon"] == 0.01 and "states total ε 0.01" in report["warning"]
    # A ledger the site would refuse to train on is refused here too, not displayed.
    raw["runs"]["run-a"]["steps"][0][0] = -1.0
    (tmp_path / LEDGER_FILE).write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"unreadable.*noise multiplier"):
        budget_report(tmp_path, None)


def test_budget_report_has_no_warning_for_an_honest_ledger(tmp_path: Path) -> None:
    SiteLedger.load(tmp_path).charge("run-a", 1, **ROUND)
    assert "warning" not in budget_report(tmp_path, None)


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
    SiteLedger.reset(tmp_path, reason="new site")  # a site with a budget starts here
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


# A ClientApp process of one site: wait for the start signal, then charge ROUNDS rounds
# exactly as the ClientApp does (no budget, so no refusal ever stops it).
CONCURRENT = """
import sys, time
from pathlib import Path
from clients.site.work import _charge_budget
from clients.site.settings import SiteSettings
from clients.task.model import ModelSpec
from clients.task.plan import TrainPlan
state, run, go, rounds = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
site = SiteSettings(data_path=Path("x"), site_id="s", state_dir=state)
spec = ModelSpec(base="b", task="causal-lm")
(go.parent / run).touch()  # imported and ready
while not go.exists():
    time.sleep(0.005)
for server_round in range(1, rounds + 1):
    plan = TrainPlan(spec=spec, base_digest="d", server_round=server_round, local_steps=8,
                     batch_size=4, site_dp_noise_multiplier=1.0)
    _charge_budget(site, plan, run=run, num_train=16)
"""


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_two_clientapp_processes_on_one_state_dir_lose_no_charge(tmp_path: Path) -> None:
    # Arrange: two site processes (Flower starts one per message) share a state dir.
    rounds, go = 12, tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, str(tmp_path / "state"), run, str(go), str(rounds)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for run in ("run-a", "run-b")
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / run).exists() for run in ("run-a", "run-b")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    # Act: both start charging at once.
    go.touch()
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    # Assert: every round of both processes is in the ledger.
    ledger = SiteLedger.load(tmp_path / "state")
    assert {run: e.rounds for run, e in ledger.runs.items()} == {
        "run-a": list(range(1, rounds + 1)),
        "run-b": list(range(1, rounds + 1)),
    }


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 0.0, "8"])
def test_a_site_budget_that_is_not_a_positive_number_is_refused(value: object) -> None:
    from clients.site.settings import SiteSettings

    with pytest.raises(ConfigError, match="max-epsilon="):
        SiteSettings.from_node_config(
            {"data-path": "x.jsonl", "state-dir": "s", "max-epsilon": value}
        )


@pytest.mark.parametrize(
    "step",
    [
        [1e-300, 0.25, 8],  # the accountant divides by z²: ZeroDivisionError
        [1e300, 0.25, 8],  # OverflowError
        [1.0, 0.25, 10**400],  # more steps than a float holds: OverflowError
    ],
)
def test_steps_the_accountant_cannot_account_are_a_config_error_naming_the_file(
    tmp_path: Path, step: list
) -> None:
    # A ledger whose steps make Opacus' arithmetic fail is refused by name, in `site
    # budget` and in a training round alike, rather than crashing with a traceback.
    (tmp_path / LEDGER_FILE).write_text(json.dumps({"runs": {"old": _entry(steps=[step])}}))
    with pytest.raises(ConfigError, match=f"{LEDGER_FILE}: run old: .*cannot be computed"):
        budget_report(tmp_path, None)
    with pytest.raises(ConfigError, match="run old"):
        SiteLedger.load(tmp_path).charge("new", 1, **ROUND)


@pytest.mark.parametrize("noise_multiplier", [1e-300, 1e300])
def test_a_plan_whose_epsilon_cannot_be_computed_is_refused_not_crashed(
    tmp_path: Path, noise_multiplier: float
) -> None:
    # A server's site-dp.noise-multiplier is any finite z > 0: one the accountant cannot
    # handle must give the site's ordinary refusal, not an exception out of the ClientApp.
    from clients.site.settings import SiteSettings
    from clients.site.work import _charge_budget
    from clients.task.errors import BudgetRefused
    from clients.task.model import ModelSpec
    from clients.task.plan import TrainPlan

    plan = TrainPlan(
        spec=ModelSpec(base="b", task="causal-lm"),
        base_digest="d",
        server_round=1,
        local_steps=8,
        batch_size=4,
        site_dp_noise_multiplier=noise_multiplier,
    )
    for state_dir in (tmp_path, None):
        site = SiteSettings(data_path=Path("x"), site_id="s", state_dir=state_dir)
        with pytest.raises(BudgetRefused, match="cannot be computed"):
            _charge_budget(site, plan, run="run-1", num_train=16)
    assert not (tmp_path / LEDGER_FILE).exists()


@pytest.mark.parametrize("budget", ["NaN", "Infinity", "-5", "0"])
def test_a_stored_budget_that_is_not_a_positive_number_is_refused(
    tmp_path: Path, budget: str
) -> None:
    # A site never writes one (its max-epsilon is refused first); `site budget` showed
    # "max-epsilon nan, remaining ε nan" and NaN in --json.
    (tmp_path / LEDGER_FILE).write_text('{"runs": {}, "max_epsilon": ' + budget + "}")
    with pytest.raises(ConfigError, match=f"unreadable: max_epsilon={json.loads(budget)!r}"):
        budget_report(tmp_path, None)


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), -1.0, 0.0])
def test_budget_report_refuses_a_max_epsilon_that_is_not_a_positive_number(
    tmp_path: Path, budget: float
) -> None:
    SiteLedger.load(tmp_path).charge("run-a", 1, **ROUND)
    with pytest.raises(ConfigError, match="--max-epsilon="):
        budget_report(tmp_path, budget)


def test_a_ledger_nested_past_the_parser_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / LEDGER_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="unreadable"):
        budget_report(tmp_path, None)

    # The reset the error asks for works on it (it read the file with json.loads and let
    # the RecursionError out).
    SiteLedger.reset(tmp_path, reason="replace the lost ledger")
    assert SiteLedger.load(tmp_path, required=True).resets[-1]["previous"]["state"] == (
        "unreadable"
    )


def test_a_reset_writes_valid_json_whatever_the_old_ledger_held(tmp_path: Path) -> None:
    # NaN and Infinity in the old ledger's total and reset records were copied into the
    # new one, which no strict JSON reader then reads.
    old = '{"total_epsilon": NaN, "runs": {}, "resets": [{"opening_epsilon": Infinity}]}'
    (tmp_path / LEDGER_FILE).write_text(old)

    SiteLedger.reset(tmp_path, reason="r")

    def refuse(constant: str) -> float:
        raise ValueError(f"{constant} is not JSON")

    written = json.loads((tmp_path / LEDGER_FILE).read_text(), parse_constant=refuse)
    assert written["resets"][0] == {"opening_epsilon": None}
    assert written["resets"][1]["previous"]["total_epsilon"] is None


def test_a_state_directory_that_is_a_file_is_refused_by_name(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("")
    with pytest.raises(ConfigError, match=r"'.*state' is not a directory"):
        SiteLedger.reset(state, reason="r")


def test_budget_report_has_no_warning_for_a_round_charged_while_it_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A ClientApp charging between the report's reads made an honest ledger look edited:
    # the stated total must come from the read the recomputed one comes from.
    SiteLedger.load(tmp_path).charge("run-a", 1, **ROUND)
    load = SiteLedger.load.__func__  # type: ignore[attr-defined]

    def load_then_charge(cls: type[SiteLedger], *args: object, **kwargs: object) -> SiteLedger:
        ledger = load(cls, *args, **kwargs)
        load(cls, tmp_path).charge("run-a", 2, **ROUND)  # another process, in between
        return ledger

    monkeypatch.setattr(SiteLedger, "load", classmethod(load_then_charge))
    assert "warning" not in budget_report(tmp_path, None)


def test_reset_records_nested_past_what_is_kept_neither_block_training_nor_a_reset(
    tmp_path: Path,
) -> None:
    deep: object = 0
    for _ in range(100):
        deep = {"x": deep}
    document = {"runs": {"r": _entry()}, "total_epsilon": 0.0, "resets": [deep]}
    (tmp_path / LEDGER_FILE).write_text(json.dumps(document))

    assert SiteLedger.load(tmp_path, required=True).runs  # the site still trains on it
    SiteLedger.reset(tmp_path, reason="r")

    first, second = SiteLedger.load(tmp_path, required=True).resets
    assert first["state"] == "unreadable" and "64 levels" in first["error"]
    assert second["reason"] == "r"
