"""A real ``fedlora edge serve`` (uvicorn) against a real ``mlflow server`` on 127.0.0.1:
swap under load, registry-side attacks, registry outage and an offline restart."""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from registry.index import AliasEntry
from registry.keys import KeyPair, TrustStore, generate_keypair
from registry.lifecycle import (
    PublishResult,
    SigningKey,
    load_index,
    move_alias,
    promote,
    publish,
    revoke,
)
from registry.mlflow_store import MlflowStore
from registry.policy import Policy
from registry.signing import sign_release
from server.harness.edge import EdgeNodeProcess
from server.harness.mlflow_server import MlflowServer
from server.harness.process import free_port
from tests.conftest import LOG_TIME, PASSPHRASE, _training_output
from tests.tiny_models import make_tiny_llama

# `fedlora edge serve`'s log line: local time, level, logger, message.
LOG_LINE = re.compile(rf"{LOG_TIME} WARNING clients\.edge\.node: ")

pytestmark = pytest.mark.integration
TOKEN = "edge-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def _node(
    *, uri: str, trust: Path, base: Path, cache: Path, log: Path, poll: float = 1.0
) -> EdgeNodeProcess:
    return EdgeNodeProcess(
        models=["intents"],
        trust=trust,
        cache=cache,
        log_path=log,
        registry=uri,
        base=base,
        poll_seconds=poll,
        env={"MLFLOW_TRACKING_URI": uri, "FEDLORA_EDGE_TOKEN": TOKEN},
        startup_timeout=180,
        # A refresh stuck on the registry is killed (and logged) within a wait, not after
        # the default 600 s.
        options=["--refresh-timeout-s", "30"],
    )


def _wait(
    what: str,
    check: Callable[[], bool],
    *,
    node: EdgeNodeProcess | None = None,
    timeout: float = 120,
) -> None:
    """Poll ``check`` until it holds. A node's refresh takes about a second (0.4 to 1.2 s
    per step here, also beside 6 busy processes), so the timeout is only for a stalled
    node; its failure, and a wait over 10 s that passes (as a warning), show the node's
    state. An error of ``check`` (the node down, a body that is not JSON) counts as not
    yet and is shown with it."""
    start = time.monotonic()
    error: Exception | None = None
    while True:
        try:
            if check():
                break
        except Exception as exc:  # shown below, with the node's state
            error = exc
        if time.monotonic() - start >= timeout:
            pytest.fail(
                f"timed out after {timeout:g} s waiting for {what}; last error of the check: "
                f"{error!r}{_node_state(node)}"
            )
        time.sleep(0.25)
    took = time.monotonic() - start
    if took > 10:
        warnings.warn(f"waited {took:.0f} s for {what}{_node_state(node)}", stacklevel=2)


def _node_state(node: EdgeNodeProcess | None) -> str:
    if node is None or node.process is None:
        return ""
    process = node.process
    state = f"\nnode alive: {process.alive} (exit code {process.popen.returncode})"
    for path in ("healthz", "metrics"):
        try:
            body = httpx.get(f"{node.url}/{path}", timeout=10).text
            if path == "metrics":  # the node's own counters: refusals, registry errors, swaps
                lines = body.splitlines()
                body = "\n".join(ln for ln in lines if ln.startswith("fedlora_edge_"))
        except httpx.HTTPError as exc:
            body = repr(exc)
        state += f"\n/{path}: {body}"
    return state + "\nnode log (end):\n" + process.tail(40)


def _active(url: str) -> str | None:
    active = httpx.get(f"{url}/v1/adapters", timeout=10).json()["intents"]["active"]
    return active["version"] if active else None


def _refusals(url: str, reason: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("fedlora_edge_verification_failures_total") and (
            f'reason="{reason}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _predict(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", json={"texts": ["hello", "see you"]}, timeout=30)


@pytest.mark.timeout(900)
def test_edge_node_swaps_without_dropping_and_refuses_every_attack(
    tmp_path: Path, outputs: list[Path], keypair: KeyPair, trust: TrustStore, tiny_llama: Path
) -> None:
    key = SigningKey(keypair.private_path, PASSPHRASE)
    node_log = tmp_path / "edge.log"
    with MlflowServer(tmp_path / "mlflow") as server:
        store = MlflowStore(server.uri)
        client = MlflowClient(server.uri, registry_uri=server.uri)

        def release(source: Path) -> PublishResult:
            done = publish(store, source, model="intents", key=key)
            promote(store, model="intents", version=done.version, key=key, trust=trust,
                    policy=Policy())  # fmt: skip
            return done

        v1 = release(outputs[0]).version
        node = _node(uri=server.uri, trust=trust.directory, base=tiny_llama,
                     cache=tmp_path / "cache", log=node_log)  # fmt: skip
        with node as running:
            url = running.url
            wait = functools.partial(_wait, node=running)
            wait("v1 served", lambda: _active(url) == v1)

            # 1. A new release while a client sends a steady stream: no request fails.
            statuses: list[int] = []
            served: set[str] = set()
            stop = threading.Event()

            def stream() -> None:
                while not stop.is_set():
                    r = _predict(url)
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        served.add(r.json()["version"])

            thread = threading.Thread(target=stream)
            thread.start()
            time.sleep(1)
            started = time.monotonic()
            v2 = release(outputs[1]).version
            wait("v2 served", lambda: _active(url) == v2)
            swap_seconds = time.monotonic() - started
            time.sleep(1)
            stop.set()
            thread.join()
            assert statuses and set(statuses) == {200}, statuses
            assert served == {v1, v2}
            assert swap_seconds < 30

            # 2. Replay: an account with EDIT on the model moves production back to v1. The
            # node follows the signed index, so it stays on v2 and healthy.
            client.set_registered_model_alias("intents", "production", v1)
            refreshed = httpx.post(f"{url}/v1/refresh", headers=ADMIN, timeout=60)
            assert refreshed.status_code == 200, refreshed.text
            assert _active(url) == v2 and _predict(url).json()["version"] == v2
            assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
            client.set_registered_model_alias("intents", "production", v2)

            # 3. The next release, signed into the index, whose signature in the artifact
            # store is replaced by one over the same files by a key outside the trust store.
            published = publish(store, outputs[2], model="intents", key=key)
            source = client.get_model_version("intents", published.version).source
            stored = tmp_path / "mlflow" / "artifacts" / source.split("mlflow-artifacts:/", 1)[1]
            signature = (stored / "model.sig").read_bytes()
            stranger = generate_keypair(tmp_path / "stranger")
            forged = tmp_path / "forged"
            shutil.copytree(stored, forged)
            sign_release(forged, private_key=stranger.private_path)
            shutil.copy(forged / "model.sig", stored / "model.sig")
            index = load_index(store, key, create=False)
            entry = AliasEntry(
                release=published.release, version=published.version,
                digest=published.digest, key_id=published.key_id,
            )  # fmt: skip
            move_alias(store, index, model="intents", alias="production", entry=entry)
            wait("untrusted-key refusal", lambda: _refusals(url, "untrusted-key") >= 1)
            assert _active(url) == v2

            # 4. ... then its weights changed, with its own signature back in place.
            weights = stored / "adapter_model.safetensors"
            good = weights.read_bytes()
            weights.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
            (stored / "model.sig").write_bytes(signature)
            wait("signature refusal", lambda: _refusals(url, "signature") >= 1)
            assert _active(url) == v2
            assert httpx.get(f"{url}/healthz").json()["status"] == "degraded"
            # The node's log says when: its warning of each refusal starts with the time.
            logged = node_log.read_text(errors="replace").splitlines()
            refusals = [line for line in logged if "WARNING clients.edge.node: intents@" in line]
            assert refusals, logged[-20:]
            assert all(LOG_LINE.match(line) for line in refusals), refusals
            weights.write_bytes(good)  # repaired: the node takes it on the next poll
            v3 = published.version
            wait("v3 served", lambda: _active(url) == v3)

            # 5. A promoted release that is then revoked: never served (or dropped at once).
            v4 = release(outputs[3])
            revoke(store, key=key, digests={v4.digest})
            wait("revoked refusal", lambda: _refusals(url, "revoked-release") >= 1)
            wait("back on v3", lambda: _active(url) == v3)

            # 6. A release trained on another base model.
            other_base = make_tiny_llama(tmp_path / "other-base", seed=7)
            foreign = _training_output(other_base, tmp_path / "foreign", seed=5, accuracy=0.99)
            release(foreign)
            wait("base-mismatch refusal", lambda: _refusals(url, "base-mismatch") >= 1)
            assert _predict(url).json()["version"] == v3

            # 7. The registry goes away: the node keeps serving and says so.
            server.stop()
            wait("degraded", lambda: httpx.get(f"{url}/healthz").json()["status"] == "degraded")
            assert _predict(url).status_code == 200

        # 8 and 9 are two fresh nodes with the registry down, on caches of their own: they
        # start side by side (each start waits for its own node), one start's time less.
        cached = _node(uri=server.uri, trust=trust.directory, base=tiny_llama,
                       cache=tmp_path / "cache", log=node_log)  # fmt: skip
        empty = _node(uri=server.uri, trust=trust.directory, base=tiny_llama,
                      cache=tmp_path / "empty-cache", log=tmp_path / "edge-empty.log")  # fmt: skip
        try:
            with ThreadPoolExecutor(2) as pool:
                for started in [pool.submit(n.start) for n in (cached, empty)]:
                    started.result()

            # 8. Restart with the registry still down: the re-verified cache is served.
            health = httpx.get(f"{cached.url}/healthz").json()
            assert health["status"] == "degraded", health
            assert health["models"]["intents"]["source"] == "cache"
            assert _predict(cached.url).json()["version"] == v3

            # 9. Nothing verified and no registry: 503 with the reason, never an unverified
            # model.
            assert httpx.get(f"{empty.url}/healthz").status_code == 503
            refused = _predict(empty.url)
            assert refused.status_code == 503
            assert "no verified release" in refused.json()["detail"]
        finally:
            cached.stop()
            empty.stop()


@pytest.mark.timeout(300)
def test_ctrl_c_stops_the_node_and_its_refresh_worker_without_a_traceback(
    tmp_path: Path, trust: TrustStore, tiny_llama: Path
) -> None:
    # No registry: the node starts (degraded, nothing to serve) with its refresh worker
    # running, which is all Ctrl-C needs to reach. The node gets Ctrl-C's default
    # handling, as from a terminal: a test session started in the background (nohup, CI)
    # ignores SIGINT, its children inherit that, and uvicorn would then shut down
    # gracefully and exit 0.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    node = EdgeNodeProcess(
        models=["intents"], trust=trust.directory, cache=tmp_path / "cache",
        log_path=tmp_path / "edge.log", registry=f"http://127.0.0.1:{free_port()}",
        base=tiny_llama, startup_timeout=180,
    )  # fmt: skip
    try:
        with node:
            signal.signal(signal.SIGINT, previous)  # the node has started: inherited
            assert node.process is not None
            os.killpg(node.process.popen.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
            rc = node.process.popen.wait(timeout=60)
    finally:
        signal.signal(signal.SIGINT, previous)

    log = (tmp_path / "edge.log").read_text()
    assert rc == 130, log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    assert log.rstrip().endswith("interrupted"), log
