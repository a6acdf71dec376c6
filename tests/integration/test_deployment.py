"""End-to-end run on Flower's Deployment Engine: real SuperLink, SuperNodes and ``flwr run``.

Three sites, each a ``flower-supernode`` process with its own data file in its node
config, train the packaged MiniLM classifier for two rounds; the ServerApp (started by
the SuperLink from the FAB that ``flwr run`` builds from this repository) writes the
adapter, metrics.json and an MLflow run.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from safetensors.numpy import load_file

from server.demo_data import generate
from server.harness.flower import LocalFederation, flwr_run, run_id_of

pytestmark = pytest.mark.integration

APP_DIR = Path(__file__).resolve().parents[2]
SITES = 3
ROUNDS = 2
# The run takes 70-80 s on 2 idle CPU cores and ~3 min on a busy machine: Flower starts
# a fresh ClientApp process (torch + model load) for every message.
RUN_TIMEOUT = 240.0


@dataclass(frozen=True)
class DemoData:
    site_paths: list[Path]
    eval_path: Path
    labels: list[str]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> DemoData:
    site_paths, eval_path, labels = generate(
        tmp_path_factory.mktemp("data"), sites=SITES, per_site=40, eval_size=40, seed=0
    )
    return DemoData(site_paths, eval_path, labels)


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, demo_data: DemoData, request: pytest.FixtureRequest
) -> Iterator[LocalFederation]:
    """A SuperLink and one SuperNode per site, shared by the module's runs (each is a run
    of its own on it), stopped (and logs shown on a failure) after the last."""
    fed = LocalFederation(
        tmp_path_factory.mktemp("federation"),
        [
            {"data-path": str(path), "site-id": f"site-{i}"}
            for i, path in enumerate(demo_data.site_paths, start=1)
        ],
        # Three sites share the machine's cores: one thread each avoids oversubscription.
        site_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    failed_before = request.session.testsfailed

    def finalize() -> None:
        # The call phase's report is logged before teardown, so a failure is counted here.
        if request.session.testsfailed > failed_before:
            print(f"\n----- process logs (tails) -----\n{fed.log_tails()}")
        fed.stop()

    request.addfinalizer(finalize)
    fed.start()
    yield fed


# method="signal" raises inside the test, so the finalizer still stops every process;
# the default thread method would exit pytest and orphan the SuperNodes.
@pytest.mark.timeout(420, method="signal")
def test_three_sites_two_rounds_on_deployment_engine(
    federation: LocalFederation, demo_data: DemoData, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_log = federation.log_path("flwr-run-plain")

    try:
        result = flwr_run(
            APP_DIR,
            federation,
            {
                "num-server-rounds": ROUNDS,
                "out-dir": str(out),
                "tracking-uri": tracking_uri,
                "labels": ",".join(demo_data.labels),
                "min-fit-clients": SITES,
                "min-available-clients": SITES,
                "local-steps": 2,
                "fraction-evaluate": 1.0,
            },
            timeout=RUN_TIMEOUT,
            log_path=run_log,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish within {RUN_TIMEOUT:.0f}s; see {run_log}")
    # The streamed ServerApp log holds its traceback when the run fails.
    output = _tail(result.stdout + result.stderr)
    assert result.returncode == 0, f"flwr run failed:\n{output}"
    run = federation.run_info(run_id_of(result))
    assert run["status"] == "finished:completed", f"{run}\n{output}"

    assert (out / "metrics.json").is_file(), output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, ROUNDS + 1))
    assert [r["sites"] for r in metrics["rounds"]] == [SITES] * ROUNDS
    assert all(sorted(r["site_ids"]) == ["site-1", "site-2", "site-3"] for r in metrics["rounds"])

    # lora_B starts at zero; a trained and averaged adapter must have moved it.
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = {name: t for name, t in tensors.items() if "lora_B" in name}
    assert lora_b, f"no lora_B tensors in {sorted(tensors)}"
    assert any(np.any(t != 0) for t in lora_b.values()), "every lora_B tensor is still zero"

    client = MlflowClient(tracking_uri=tracking_uri)
    history = client.get_metric_history(metrics["mlflow_run_id"], "accuracy")
    assert sorted(m.step for m in history) == list(range(1, ROUNDS + 1))
    assert client.get_run(metrics["mlflow_run_id"]).info.status == "FINISHED"
    assert metrics["privacy"] == {}


@pytest.mark.timeout(420, method="signal")
def test_secagg_with_client_dp_on_deployment_engine(
    federation: LocalFederation, demo_data: DemoData, tmp_path: Path
) -> None:
    """One SecAgg+ round (four exchanges) with client-level DP across real SuperNodes.

    The protocol's per-site state lives in each SuperNode's run context between the
    ClientApp processes Flower starts for every message.
    """
    out = tmp_path / "out"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_log = federation.log_path("flwr-run-secagg")
    try:
        result = flwr_run(
            APP_DIR,
            federation,
            {
                "num-server-rounds": 1,
                "out-dir": str(out),
                "tracking-uri": tracking_uri,
                "labels": ",".join(demo_data.labels),
                "min-fit-clients": SITES,
                "min-available-clients": SITES,
                "local-steps": 2,
                "fraction-evaluate": 0.0,
                "secagg.enabled": True,
                "dp.clip-norm": 1.0,
                "dp.noise-multiplier": 0.3,
            },
            timeout=RUN_TIMEOUT,
            log_path=run_log,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish within {RUN_TIMEOUT:.0f}s; see {run_log}")
    output = _tail(result.stdout + result.stderr)
    run = federation.run_info(run_id_of(result))
    assert run["status"] == "finished:completed", f"{run}\n{output}"
    metrics = json.loads((out / "metrics.json").read_text())
    (row,) = metrics["rounds"]
    assert row["sites"] == SITES and not row["skipped"]
    assert sorted(row["site_ids"]) == ["site-1", "site-2", "site-3"]
    assert row["epsilon"] > 0 and row["guarantee"] == "client-level"
    assert set(metrics["privacy"]) == {"client-level", "secure-aggregation"}
    client = MlflowClient(tracking_uri=tracking_uri)
    assert [m.step for m in client.get_metric_history(metrics["mlflow_run_id"], "epsilon")] == [1]


@pytest.mark.timeout(420, method="signal")
def test_a_run_refused_by_fedlora_reads_as_one_line_and_fails(
    federation: LocalFederation, tmp_path: Path
) -> None:
    """No labels under flwr run: one line saying what to do, not a ServerApp traceback
    (twice), and a run marked failed. Flower 1.41's `flwr run` still exits 0 (README)."""
    run_log = federation.log_path("flwr-run-no-labels")

    result = flwr_run(
        APP_DIR,
        federation,
        {"num-server-rounds": 1, "out-dir": str(tmp_path / "out")},
        timeout=RUN_TIMEOUT,
        log_path=run_log,
    )

    output = result.stdout + result.stderr
    assert output.count("fedlora run FAILED: labels is required under flwr run") == 1, output
    assert "fedlora site check" in output and "Traceback" not in output, output
    run = federation.run_info(run_id_of(result))
    assert run["status"] == "finished:failed", run
    assert result.returncode == 0  # Flower does not read the run's status back
    assert not (tmp_path / "out").exists()


def _tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-lines:])
