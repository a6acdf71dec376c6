"""A secure federation on real processes: TLS, SuperNode authentication, roster, warm workers.

`LocalFederation(secure=True, workers=True)` sets the federation up the way ``fedlora
federation init``/``enroll`` do (server/federation.py): a CA and SuperLink certificate,
one registered key per site, the roster, and a warm worker beside every SuperNode.

- A rogue node, registered through the Control API with a key of its own (as anyone who
  can reach that API could), connects and stays online, but the ServerApp never sends it
  work: only the roster's sites are sampled and asked to evaluate.
- Failure drill: a SuperNode killed (SIGKILL to its process group) while the round runs;
  the round completes with the others (min-fit-clients=2), the dead site is recorded, and
  the global adapter equals FedAvg of the surviving sites' updates, which this test
  recomputes by running the same site code on the same inputs in this process.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from server import pki
from server.checkpoint import CheckpointStore
from server.demo_data import generate
from server.harness.flower import LocalFederation, flwr_run, run_id_of
from server.settings import RunSettings

pytestmark = pytest.mark.integration

APP_DIR = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 420.0


@pytest.fixture
def sites(tmp_path: Path) -> tuple[list[Path], list[str]]:
    paths, _, labels = generate(tmp_path / "data", sites=3, per_site=24, eval_size=8, seed=0)
    return paths, labels


def _federation(
    tmp_path: Path, paths: list[Path], request: pytest.FixtureRequest
) -> LocalFederation:
    fed = LocalFederation(
        tmp_path / "federation",
        [
            {"data-path": str(p), "site-id": f"site-{i}", "state-dir": str(tmp_path / f"s{i}")}
            for i, p in enumerate(paths, start=1)
        ],
        site_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        startup_timeout=240.0,
        secure=True,
        workers=True,
    )
    failed_before = request.session.testsfailed

    def finalize() -> None:
        if request.session.testsfailed > failed_before:
            print(f"\n----- process logs (tails) -----\n{fed.log_tails()}")
        fed.stop()

    request.addfinalizer(finalize)
    return fed


def _config(out: Path, labels: list[str], fed: LocalFederation, **extra) -> dict:
    return {
        "num-server-rounds": 1,
        "out-dir": str(out),
        "tracking-uri": f"sqlite:///{out / 'mlflow.db'}",
        "labels": ",".join(labels),
        "min-fit-clients": 2,
        "min-available-clients": 2,
        "local-steps": 2,
        "fraction-evaluate": 0.0,
        "roster": str(fed.roster_path),
        **extra,
    }


@pytest.fixture
def secure_federation(
    tmp_path: Path, sites: tuple[list[Path], list[str]], request: pytest.FixtureRequest
) -> Iterator[LocalFederation]:
    paths, _ = sites
    fed = _federation(tmp_path, paths[:2], request)
    fed.start()
    yield fed


@pytest.mark.timeout(900, method="signal")
def test_a_registered_rogue_node_gets_no_work(
    secure_federation: LocalFederation, sites: tuple[list[Path], list[str]], tmp_path: Path
) -> None:
    fed = secure_federation
    paths, labels = sites
    assert fed.federation is not None
    # Arrange: a key registered straight through the Control API, not enrolled.
    rogue_key = pki.make_node_key()
    pki.write_private_key(tmp_path / "rogue.key", rogue_key, openssh=True)
    pki.write_public(tmp_path / "rogue.pub", pki.node_public_openssh(rogue_key.public_key()))
    rogue_id = int(
        fed.federation.flwr("supernode", "register", str(tmp_path / "rogue.pub"))["node-id"]
    )
    fed.start_supernode(
        "rogue", {"data-path": str(paths[2]), "site-id": "site-1"}, key=tmp_path / "rogue.key"
    )
    fed.wait_for_nodes(3)
    listed = {row["node-id"]: row for row in fed.federation.sites()}
    assert "NOT ON THE ROSTER" in listed[rogue_id]["status"]
    out = tmp_path / "out"
    # Act: two rounds, every site evaluates too.
    try:
        result = flwr_run(
            APP_DIR,
            fed,
            _config(out, labels, fed, **{"num-server-rounds": 2, "fraction-evaluate": 1.0}),
            timeout=RUN_TIMEOUT,
            log_path=fed.log_path("flwr-run"),
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish within {RUN_TIMEOUT:.0f}s")
    # Assert
    run = fed.run_info(run_id_of(result))
    assert run["status"] == "finished:completed", result.stdout[-3000:]
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["sampled"] for r in rows] == [2, 2]
    assert all(sorted(r["site_ids"]) == ["site-1", "site-2"] for r in rows)
    rogue_log = fed.log_path("rogue").read_text()
    assert "Receiving:" not in rogue_log, rogue_log[-2000:]
    # The ServerApp's round lines reach `flwr run --stream`.
    assert "fedlora: round 2/2 done" in result.stdout
    assert "2 sampled, 2 replied, 2 accepted" in result.stdout
    # The warm workers did the training: one line per site and round.
    for site in ("site-1", "site-2"):
        worker_log = fed.log_path(f"{site}-worker").read_text()
        assert f"site {site} round 2:" in worker_log


@pytest.mark.timeout(900, method="signal")
def test_drill_a_supernode_killed_mid_round(
    tmp_path: Path, sites: tuple[list[Path], list[str]], request: pytest.FixtureRequest
) -> None:
    paths, labels = sites
    fed = _federation(tmp_path, paths, request)
    fed.start()
    out = tmp_path / "out"
    killed: list[str] = []

    def on_line(line: str) -> None:
        # The round has started: the sites are training; site-3 dies now.
        if "fedlora: round 1/1: training" in line and not killed:
            fed.kill("site-3")
            fed.kill("site-3-worker")
            killed.append(line)

    # Act
    try:
        result = flwr_run(
            APP_DIR,
            fed,
            _config(out, labels, fed, **{"round-timeout": 90.0}),
            timeout=RUN_TIMEOUT,
            log_path=fed.log_path("flwr-run"),
            on_line=on_line,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish within {RUN_TIMEOUT:.0f}s")
    # Assert: the round completed with the two others and recorded the dead site.
    assert killed, result.stdout[-3000:]
    assert fed.run_info(run_id_of(result))["status"] == "finished:completed", result.stdout[-3000:]
    (row,) = json.loads((out / "metrics.json").read_text())["rounds"]
    assert sorted(row["site_ids"]) == ["site-1", "site-2"]
    assert [f["site"] for f in row["failures"]] == ["site-3"]
    # The global adapter is FedAvg of the survivors' updates, recomputed here.
    got = CheckpointStore(out / "checkpoint").load()
    assert got is not None
    expected = _fedavg_of(
        paths[:2], ["site-1", "site-2"], labels, _config(out, labels, fed), run=str(tmp_path)
    )
    assert set(got.state) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got.state[name], value, rtol=1e-4, atol=1e-6)


def _fedavg_of(
    paths: list[Path], site_ids: list[str], labels: list[str], config: dict, *, run: str
) -> dict[str, np.ndarray]:
    """The example-weighted mean of what these sites' own code trains from the initial state."""
    from clients.site.settings import SiteSettings
    from clients.site.work import Trained, train
    from clients.task.model import build_model, trainable_state

    settings = RunSettings.from_config({k: v for k, v in config.items() if k != "roster"})
    initial = trainable_state(build_model(settings.spec).model)
    plan = settings.plan(1).to_config() | settings.strategy().client_config()
    total, weight = None, 0
    for path, site_id in zip(paths, site_ids, strict=True):
        site = SiteSettings.from_node_config({"data-path": str(path), "site-id": site_id})
        done = train(site, initial, plan, run=run)
        assert isinstance(done, Trained)
        scaled = {k: v.astype(np.float64) * done.weight for k, v in done.local.items()}
        total = scaled if total is None else {k: total[k] + scaled[k] for k in total}
        weight += done.weight
    assert total is not None
    return {k: (v / weight).astype(np.float32) for k, v in total.items()}
