"""EdgeNode refresh logic against MLflow's embedded SQLite store (no HTTP)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from clients.edge.node import EdgeNode
from clients.edge.settings import EdgeSettings, ModelRef
from registry.keys import KeyPair, TrustStore
from registry.lifecycle import SigningKey, promote, publish, revoke, rollback
from registry.mlflow_store import MlflowStore
from registry.policy import Policy
from registry.signing import verify_release
from server.harness.process import free_port
from tests.clients.edge.test_runtime import LABELS, stock_scores
from tests.conftest import LOG_TIME, PASSPHRASE

pytestmark = pytest.mark.integration
TEXTS = ["hello there", "see you later"]


def test_rollback_swaps_back_to_the_loaded_previous_release_without_reloading(
    tmp_path: Path, outputs: list[Path], keypair: KeyPair, trust: TrustStore, tiny_llama: Path
) -> None:
    store = MlflowStore(f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}")
    key = SigningKey(keypair.private_path, PASSPHRASE)
    for source in outputs[:2]:
        version = publish(store, source, model="intents", key=key).version
        promote(store, model="intents", version=version, key=key, trust=trust, policy=Policy())
    settings = EdgeSettings(
        models=(ModelRef("intents"),),
        trust=trust.directory,
        cache=tmp_path / "cache",
        registry_uri=store.uri,
        base=str(tiny_llama),
    )
    node = EdgeNode(settings)
    node.start()
    two = node.slots["intents"].active
    assert two is not None and two.version == "2"

    rollback(store, model="intents", key=key)  # production: 2 -> 1, loaded fresh
    assert node.refresh("intents") is True
    one = node.slots["intents"].active
    assert one is not None and one.version == "1"

    # Forward again to 2, which the node still holds as `previous`: swapped back, no reload.
    promote(store, model="intents", version="2", key=key, trust=trust, policy=Policy())
    assert node.refresh("intents") is True

    slot = node.slots["intents"]
    assert slot.active is two
    assert slot.previous is one
    assert node.refresh("intents") is False  # nothing new


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The publisher's default state lives under ~; keep it inside the test."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _node(tmp_path: Path, uri: str, trust: TrustStore, tiny_llama: Path, **kw) -> EdgeNode:
    settings = EdgeSettings(
        models=(ModelRef("intents"),), trust=trust.directory, cache=tmp_path / "cache",
        registry_uri=uri, base=str(tiny_llama), **kw,
    )  # fmt: skip
    return EdgeNode(settings)


def _released(store: MlflowStore, key: SigningKey, trust: TrustStore, sources: list[Path]):
    done = []
    for source in sources:
        done.append(publish(store, source, model="intents", key=key))
        promote(store, model="intents", version=done[-1].version, key=key, trust=trust,
                policy=Policy())  # fmt: skip
    return done


def _refusals(node: EdgeNode, reason: str) -> float:
    value = node.metrics.registry.get_sample_value(
        "fedlora_edge_verification_failures_total", {"model": "intents", "reason": reason}
    )
    return value or 0.0


def test_a_signed_release_whose_tensors_the_model_would_not_use_is_refused(
    tmp_path: Path, outputs: list[Path], keypair: KeyPair, trust: TrustStore, tiny_llama: Path
) -> None:
    store = MlflowStore(f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}")
    key = SigningKey(keypair.private_path, PASSPHRASE)
    v1 = publish(store, outputs[0], model="intents", key=key).version
    promote(store, model="intents", version=v1, key=key, trust=trust, policy=Policy())
    node = _node(tmp_path, store.uri, trust, tiny_llama)
    node.start()
    # Signed as it is: the config targets modules the weights were never trained for, so
    # PEFT would load the release and silently drop every LoRA tensor of the file.
    config = outputs[1] / "adapter" / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"target_modules": ["k_proj"]}))
    v2 = publish(store, outputs[1], model="intents", key=key).version
    promote(store, model="intents", version=v2, key=key, trust=trust, policy=Policy())

    assert node.refresh("intents") is False

    slot = node.slots["intents"]
    assert slot.active is not None and slot.active.version == v1
    assert node.health()["status"] == "degraded"
    assert "unloadable" in (slot.last_error or "") and "would not use" in (slot.last_error or "")
    assert _refusals(node, "unloadable") == 1


def test_a_cached_copy_changed_on_disk_is_never_served(
    tmp_path: Path, outputs: list[Path], keypair: KeyPair, trust: TrustStore, tiny_llama: Path
) -> None:
    store = MlflowStore(f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}")
    key = SigningKey(keypair.private_path, PASSPHRASE)
    v1 = publish(store, outputs[0], model="intents", key=key).version
    promote(store, model="intents", version=v1, key=key, trust=trust, policy=Policy())
    node = _node(tmp_path, store.uri, trust, tiny_llama)
    node.start()
    v2 = publish(store, outputs[1], model="intents", key=key)
    # Someone with write access to the cache plants v2's folder with other weights.
    planted = tmp_path / "cache" / "releases" / "intents" / v2.digest
    shutil.copytree(outputs[2] / "adapter", planted)
    promote(store, model="intents", version=v2.version, key=key, trust=trust, policy=Policy())

    node.refresh("intents")

    served = node.slots["intents"].active
    assert served is not None
    if served.version == v2.version:  # a node that replaced the planted copy: genuine v2
        answer = torch.tensor([[row["scores"][label] for label in LABELS]
                               for row in served.predict(TEXTS)])  # fmt: skip
        genuine = stock_scores(tiny_llama, outputs[1] / "adapter", TEXTS)
        torch.testing.assert_close(answer, genuine, atol=1e-4, rtol=0)
    else:  # a node that found the planted copy: refused, still on v1
        assert served.version == v1 and _refusals(node, "signature") == 1
        assert node.health()["status"] == "degraded"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _state(cache: Path) -> Path:
    return cache / "state.json"


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    # what breaks -> (how, what the node then serves: the version or the reason)
    "state truncated": (lambda c: _truncate(_state(c)), "1"),
    "state of wrong types": (lambda c: _state(c).write_text('{"intents": {"digest": 7}}'), "1"),
    "state a directory": (lambda c: (_state(c).unlink(), _state(c).mkdir()), "1"),
    # json.loads raises RecursionError, which is no ValueError.
    "state nested deep": (lambda c: _state(c).write_text("[" * 100_000 + "]" * 100_000), "1"),
    "state names a path": (
        lambda c: _state(c).write_text(
            json.dumps({"intents": {"alias": "production", "version": "1", "digest": "../../x"}})
        ),
        "names no release digest",
    ),
    "index truncated": (lambda c: _truncate(c / "tuf" / "targets.json"), "index"),
    "release truncated": (
        lambda c: _truncate(
            next((c / "releases" / "intents").iterdir()) / "adapter_model.safetensors"
        ),
        "signature",
    ),
}


@pytest.mark.parametrize("broken", sorted(CORRUPTIONS))
def test_corrupt_local_state_never_keeps_the_node_from_starting(
    broken: str,
    tmp_path: Path,
    outputs: list[Path],
    keypair: KeyPair,
    trust: TrustStore,
    tiny_llama: Path,
) -> None:
    store = MlflowStore(f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}")
    key = SigningKey(keypair.private_path, PASSPHRASE)
    version = publish(store, outputs[0], model="intents", key=key).version
    promote(store, model="intents", version=version, key=key, trust=trust, policy=Policy())
    cache = tmp_path / "cache"
    _node(tmp_path, store.uri, trust, tiny_llama).start()  # fills the cache
    corrupt, expected = CORRUPTIONS[broken]
    corrupt(cache)
    offline = f"http://127.0.0.1:{free_port()}"  # the registry is down

    node = _node(tmp_path, offline, trust, tiny_llama)
    node.start()  # never raises

    health = node.health()["models"]["intents"]
    if expected.isdigit():  # falls back to what it can verify: the index's alias entry
        assert health["version"] == expected and health["status"] == "degraded", health
    else:
        assert health["status"] == "unavailable" and expected in health["reason"], health


def test_a_node_serves_what_the_signed_index_names_not_the_mlflow_alias(
    tmp_path: Path, outputs: list[Path], keypair: KeyPair, trust: TrustStore, tiny_llama: Path
) -> None:
    store = MlflowStore(f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}")
    key = SigningKey(keypair.private_path, PASSPHRASE)
    v1, v2 = _released(store, key, trust, outputs[:2])
    node = _node(tmp_path, store.uri, trust, tiny_llama)
    node.start()
    assert node.slots["intents"].active.version == v2.version

    # A signed rollback, then an account with EDIT puts MLflow's alias back on v2.
    rollback(store, model="intents", key=key)
    store.client.set_registered_model_alias("intents", "production", v2.version)
    node.refresh("intents")

    assert node.slots["intents"].active.version == v1.version
    assert node.health()["models"]["intents"]["status"] == "ok"
    # ... and the other way round: MLflow's alias moved by hand changes nothing either.
    promote(store, model="intents", version=v2.version, key=key, trust=trust, policy=Policy())
    store.client.set_registered_model_alias("intents", "production", v1.version)
    node.refresh("intents")
    assert node.slots["intents"].active.version == v2.version
    assert node.health()["models"]["intents"]["status"] == "ok"


def test_a_cached_release_is_accepted_again_before_it_is_loaded(
    tmp_path: Path, outputs: list[Path], keypair: KeyPair, trust: TrustStore, tiny_llama: Path
) -> None:
    store = MlflowStore(f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}")
    key = SigningKey(keypair.private_path, PASSPHRASE)
    v1, v2 = _released(store, key, trust, outputs[:2])
    rollback(store, model="intents", key=key)  # production: v1
    node = _node(tmp_path, store.uri, trust, tiny_llama, max_loaded=0)  # keeps no previous
    node.start()
    promote(store, model="intents", version=v2.version, key=key, trust=trust, policy=Policy())
    node.refresh("intents")
    assert node.slots["intents"].active.version == v2.version

    # v1's folder in the cache is changed while v1 is not loaded; then v1 comes back.
    weights = tmp_path / "cache" / "releases" / "intents" / v1.digest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    rollback(store, model="intents", key=key)
    node.refresh("intents")

    active = node.slots["intents"].active
    assert active.version == v1.version
    assert verify_release(active.verified.directory, trust).digest == v1.digest


def test_a_cache_folder_holding_another_release_is_refused_at_restart(
    tmp_path: Path, outputs: list[Path], keypair: KeyPair, trust: TrustStore, tiny_llama: Path
) -> None:
    store = MlflowStore(f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}")
    key = SigningKey(keypair.private_path, PASSPHRASE)
    v1, v2 = _released(store, key, trust, outputs[:2])
    _node(tmp_path, store.uri, trust, tiny_llama).start()  # serves v2, caches it
    home = tmp_path / "cache" / "releases" / "intents" / v2.digest
    old = Path(store.client.get_model_version("intents", v1.version).source.removeprefix("file://"))
    for f in old.iterdir():  # v2's cache folder now holds v1's validly signed files
        shutil.copy(f, home / f.name)

    offline = _node(tmp_path, f"http://127.0.0.1:{free_port()}", trust, tiny_llama)
    offline.start()

    slot = offline.slots["intents"]
    assert slot.active is None
    assert "wrong-release" in str(slot.last_error)
    assert offline.health()["models"]["intents"]["status"] == "unavailable"


def test_refresh_work_runs_in_a_lower_priority_child_with_the_nodes_environment(
    tmp_path: Path,
    outputs: list[Path],
    keypair: KeyPair,
    trust: TrustStore,
    tiny_llama: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = MlflowStore(f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}")
    key = SigningKey(keypair.private_path, PASSPHRASE)
    _released(store, key, trust, outputs[:1])
    node = _node(tmp_path, store.uri, trust, tiny_llama)
    try:
        node.start()  # the fork server runs from here on, with the environment of now
        assert node.slots["intents"].active is not None
        # A credential set later must still reach the next worker, as it would a spawned one.
        monkeypatch.setenv("FEDLORA_TEST_MARK", "node-environment")
        node.close()
        assert node.refresh("intents") is False  # a new worker; nothing new to load
        pool = node.worker._executor()  # the worker's own process, asked directly
        child = pool.submit(os.getpid).result()
        assert child != os.getpid()
        nice = pool.submit(os.getpriority, os.PRIO_PROCESS, 0).result()
        assert nice >= os.getpriority(os.PRIO_PROCESS, 0) + 1
        assert pool.submit(os.getenv, "FEDLORA_TEST_MARK").result() == "node-environment"
    finally:
        node.close()


# A node's process as `fedlora edge serve` sets it up (time-stamped lines, fedlora's
# warnings, other libraries' errors only), whose refresh worker logs three records. A
# process of its own: the fork server's stderr is the stderr of the process that started it.
WORKER_LOGS = """
import logging, sys
from pathlib import Path
from clients.edge.fetcher import RegistryWorker
from server.console import quiet_libraries

if __name__ == "__main__":
    quiet_libraries(timestamps=True)
    home = Path(sys.argv[1])
    if sys.argv[2:] == ["redacting"]:  # a filter that cannot be passed to the worker
        logging.getLogger().handlers[0].addFilter(lambda r: "SECRET" not in r.getMessage())
    worker = RegistryWorker(registry_uri=f"sqlite:///{home / 'r.db'}", trust=home,
                            cache=home, base_digest=None)
    pool = worker._executor()
    for name, level in (("registry.pull", logging.WARNING), ("urllib3", logging.WARNING),
                        ("urllib3", logging.ERROR)):
        record = pool.submit(logging.getLogger(name).log, level, "worker %s %s", name, level)
        record.result()
    worker.close()
"""


def test_the_refresh_worker_logs_in_the_nodes_format_and_under_its_filter(
    tmp_path: Path,
) -> None:
    script = tmp_path / "node.py"
    script.write_text(WORKER_LOGS)
    root = Path(__file__).resolve().parents[3]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.getenv("PYTHONPATH")])),
    }

    def node(*mode: str) -> str:
        command = [sys.executable, str(script), str(tmp_path), *mode]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stderr

    lines = node().splitlines()
    when = LOG_TIME
    assert any(re.fullmatch(f"{when} WARNING registry.pull: worker registry.pull 30", x)
               for x in lines), lines  # fmt: skip
    assert any(re.fullmatch(f"{when} ERROR urllib3: worker urllib3 40", x) for x in lines), lines
    assert not any("urllib3 30" in x for x in lines), lines  # a library's warning: dropped

    # Fails closed: with a handler the worker cannot have, the worker logs nothing.
    stderr = node("redacting")
    assert "worker registry.pull" not in stderr and "worker urllib3" not in stderr
    assert "the refresh worker will log nothing" in stderr, stderr


def test_a_killed_refresh_worker_fails_one_refresh_and_the_next_one_works(
    tmp_path: Path, outputs: list[Path], keypair: KeyPair, trust: TrustStore, tiny_llama: Path
) -> None:
    store = MlflowStore(f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}")
    key = SigningKey(keypair.private_path, PASSPHRASE)
    v1, v2 = _released(store, key, trust, outputs[:2])
    node = _node(tmp_path, store.uri, trust, tiny_llama)
    try:
        node.start()
        assert node.slots["intents"].active.version == v2.version
        rollback(store, model="intents", key=key)  # production: v2 -> v1
        # The child dies (as under the OOM killer); a real SIGKILL, no fake.
        os.kill(node.worker._executor().submit(os.getpid).result(), signal.SIGKILL)

        assert node.refresh("intents") is False

        slot = node.slots["intents"]
        assert slot.active.version == v2.version  # still serving
        assert node.health()["status"] == "degraded"
        assert "refresh worker process stopped" in (slot.last_error or "")
        assert node.refresh("intents") is True  # a new child
        assert slot.active.version == v1.version and slot.last_error is None
    finally:
        node.close()


def test_a_registry_that_never_finishes_an_answer_fails_the_refresh_at_the_timeout(
    tmp_path: Path, trust: TrustStore, tiny_llama: Path
) -> None:
    # A fake registry, for a failure a real one cannot be made to show: it answers the
    # health check, then trickles one header line every second and never ends the answer
    # (no read timeout fires on it).
    stop = threading.Event()

    def answer(conn: socket.socket) -> None:
        with conn:
            request = conn.recv(65536)
            if b"GET /health" in request:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK")
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.wait(1.0):
                conn.sendall(b"X-Slow: a\r\n")

    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
    node = _node(tmp_path, uri, trust, tiny_llama, refresh_timeout_s=4.0)
    try:
        start = time.monotonic()
        assert node.refresh("intents") is False
        took = time.monotonic() - start
        assert node.health()["models"]["intents"]["status"] == "unavailable"
        assert "--refresh-timeout-s" in (node.slots["intents"].last_error or "")
        assert took < 60  # the worker start plus 4 s, not forever
        closing = time.monotonic()
        node.close()
        assert time.monotonic() - closing < 30
    finally:
        stop.set()
        listener.close()
        node.close()


def test_revocations_take_effect_when_the_rest_of_the_refresh_fails_with_any_error(
    tmp_path: Path, outputs: list[Path], keypair: KeyPair, trust: TrustStore, tiny_llama: Path
) -> None:
    store = MlflowStore(f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}")
    key = SigningKey(keypair.private_path, PASSPHRASE)
    _, v2 = _released(store, key, trust, outputs[:2])
    node = _node(tmp_path, store.uri, trust, tiny_llama)
    try:
        node.start()
        assert node.slots["intents"].active.version == v2.version
        # v2 revoked and production moved back to v1, which must be downloaded; the
        # staging folder is a file now, so the download fails with an OSError (not a
        # fedlora error) after the fresh index is known.
        revoke(store, key=key, digests={v2.digest}, trust=trust)
        rollback(store, model="intents", key=key)
        shutil.rmtree(tmp_path / "cache" / "staging", ignore_errors=True)
        (tmp_path / "cache" / "staging").write_text("not a folder")

        assert node.refresh("intents") is False

        slot = node.slots["intents"]
        assert slot.active is None  # the revoked release no longer serves
        assert "FileExistsError" in (slot.last_error or "") or "NotADirectory" in (
            slot.last_error or ""
        ), slot.last_error
    finally:
        node.close()


def test_a_model_the_reachable_index_does_not_know_is_reported_with_the_models_it_has(
    tmp_path: Path, outputs: list[Path], keypair: KeyPair, trust: TrustStore, tiny_llama: Path
) -> None:
    store = MlflowStore(f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}")
    _released(store, SigningKey(keypair.private_path, PASSPHRASE), trust, outputs[:1])
    settings = EdgeSettings(
        models=(ModelRef("intents"), ModelRef("intnets")), trust=trust.directory,
        cache=tmp_path / "cache", registry_uri=store.uri, base=str(tiny_llama),
    )  # fmt: skip
    node = EdgeNode(settings)
    try:
        node.start()
        health = node.health()["models"]

        assert node.unknown_models() == ["intnets"]
        assert health["intents"]["status"] == "ok"
        assert health["intnets"]["status"] == "unavailable"
        assert "it has no model 'intnets' (its models: 'intents')" in health["intnets"]["reason"]
    finally:
        node.close()


def test_a_node_that_cannot_reach_the_registry_knows_of_no_unknown_model(
    tmp_path: Path, trust: TrustStore, tiny_llama: Path
) -> None:
    node = _node(tmp_path, f"http://127.0.0.1:{free_port()}", trust, tiny_llama)
    try:
        node.start()
        assert node.index_models is None
        assert node.unknown_models() == []  # it may serve from its cache; nothing to refuse
    finally:
        node.close()


def test_a_mistyped_sqlite_registry_is_unreachable_and_never_created(
    tmp_path: Path, trust: TrustStore, tiny_llama: Path
) -> None:
    missing = tmp_path / "typo" / "mlflow.db"
    node = _node(tmp_path, f"sqlite:///{missing}", trust, tiny_llama)
    try:
        node.start()
        errors = node.metrics.registry.get_sample_value("fedlora_edge_registry_errors_total")

        assert node.health()["status"] == "unavailable"
        assert errors and errors >= 1  # the refresh found no registry (`RegistryUnavailable`)
        assert not missing.exists() and not missing.parent.exists()
    finally:
        node.close()
