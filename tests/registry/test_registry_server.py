"""The registry against a real ``mlflow server`` (SQLite, artifact proxy, basic-auth app)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from registry.errors import RegistryUnavailable
from registry.keys import KeyPair, TrustStore
from registry.mlflow_store import MlflowStore
from registry.pull import pull
from server.harness.mlflow_server import MlflowServer
from tests.conftest import PASSPHRASE

pytestmark = pytest.mark.integration
FEDLORA = str(Path(sys.executable).parent / "fedlora")
PUBLISHER = ("publisher", "publisher-password-1")
EDGE = ("edge", "edge-password-12345")


def _fedlora(args: list[str], *, uri: str, user: tuple[str, str] | None, cwd: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env |= {"MLFLOW_TRACKING_URI": uri, "FEDLORA_KEY_PASSPHRASE": PASSPHRASE}
    if user:
        env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = user
    return subprocess.run(
        [FEDLORA, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180
    )


def _versions(uri: str) -> int:
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = EDGE
    try:
        store = MlflowStore(uri)
        return len(store.versions("intents")) if store.registered("intents") else 0
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]


def test_publisher_writes_edge_reads_and_strangers_get_clear_errors(
    tmp_path: Path, outputs: list[Path], keypair: KeyPair, trust: TrustStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    with MlflowServer(tmp_path / "mlflow", auth=True) as server:
        server.create_user(*PUBLISHER)
        server.create_user(*EDGE)
        publish = ["registry", "publish", str(outputs[0]), "--model", "intents",
                   "--key", str(keypair.private_path)]  # fmt: skip

        anonymous = _fedlora(publish, uri=server.uri, user=None, cwd=tmp_path)
        assert anonymous.returncode == 2
        assert "refused an unauthenticated client" in anonymous.stderr

        done = _fedlora(publish, uri=server.uri, user=PUBLISHER, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "published: intents version 1" in done.stdout

        publish[2] = str(outputs[1])
        refused = _fedlora(publish, uri=server.uri, user=EDGE, cwd=tmp_path)
        assert refused.returncode == 2
        assert "refused user 'edge' (permission denied)" in refused.stderr
        assert _versions(server.uri) == 1

        # The operator's one-shots, as an edge account: pull a verified copy, verify it again.
        pulled = tmp_path / "pulled"
        pull_cli = _fedlora(["edge", "pull", "intents@candidate", "--trust", str(trust.directory),
                             "--out", str(pulled), "--state", str(tmp_path / "cli-state")],
                            uri=server.uri, user=EDGE, cwd=tmp_path)  # fmt: skip
        assert pull_cli.returncode == 0, pull_cli.stderr
        assert "release 1 verified" in pull_cli.stdout
        verify = ["edge", "verify", str(pulled), "--trust", str(trust.directory)]
        assert _fedlora(verify, uri=server.uri, user=None, cwd=tmp_path).returncode == 0
        (pulled / "adapter_config.json").write_text("{}")
        refused = _fedlora(verify, uri=server.uri, user=None, cwd=tmp_path)
        assert refused.returncode == 1 and "refused (signature)" in refused.stderr

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", EDGE[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", EDGE[1])
        store = MlflowStore(server.uri)
        release = pull(
            store, model="intents", alias="candidate", trust=trust,
            out=tmp_path / "serving", state=tmp_path / "edge-state",
        )  # fmt: skip
        assert release.provenance.release == 1
        assert (tmp_path / "serving" / "adapter_model.safetensors").is_file()

    with pytest.raises(RegistryUnavailable, match="is unreachable"):
        MlflowStore(server.uri)
    shutil.rmtree(tmp_path / "mlflow", ignore_errors=True)


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the artifact files whose bytes this process reads: HTTP bodies of artifact
    files and local artifact copies. A spy only: every call goes on to the real code."""
    import requests
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    seen: list[str] = []
    read, copy = requests.Response.iter_content, LocalArtifactRepository._download_file

    def spy_read(self, *args, **kwargs):
        if "/mlflow-artifacts/artifacts/" in self.url:
            seen.append(self.url.rsplit("/", 1)[-1])
        return read(self, *args, **kwargs)

    def spy_copy(self, remote_file_path, local_path):
        seen.append(Path(remote_file_path).name)
        return copy(self, remote_file_path, local_path)

    monkeypatch.setattr(requests.Response, "iter_content", spy_read)
    monkeypatch.setattr(LocalArtifactRepository, "_download_file", spy_copy)
    return seen


def test_fetching_refuses_foreign_sources_files_and_sizes_before_downloading(
    tmp_path: Path, outputs: list[Path], keypair: KeyPair, trust: TrustStore,
    downloads: list[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import sqlite3

    from registry.errors import VerificationError
    from registry.lifecycle import SigningKey, publish

    padding = tmp_path / "padding.bin"
    with padding.open("wb") as fh:
        fh.truncate(20 << 20)  # 20 MiB of zeros: its size is what counts, not its content
    with MlflowServer(tmp_path / "mlflow") as server:
        store = MlflowStore(server.uri)
        monkeypatch.setenv("HOME", str(tmp_path))  # the publisher's state stays in the test
        key = SigningKey(keypair.private_path, PASSPHRASE)
        done = publish(store, outputs[0], model="intents", key=key)
        mv = store.client.get_model_version("intents", done.version)

        def refused(name: str) -> str:
            downloads.clear()
            with pytest.raises(VerificationError) as err:
                pull(store, model="intents", alias="candidate", trust=trust,
                     out=tmp_path / "serving", state=tmp_path / "edge-state")  # fmt: skip
            assert err.value.reason == "fetch", err.value
            assert name not in downloads, downloads
            return str(err.value)

        # 1. The version's source rewritten (a write to MLflow's database) to a local folder.
        secret = tmp_path / "secret"
        secret.mkdir()
        (secret / "secret.txt").write_text("the edge machine's own files")
        db = sqlite3.connect(tmp_path / "mlflow" / "mlflow.db")
        with db:
            db.execute("UPDATE model_versions SET source = ? WHERE name = 'intents'",
                       (secret.as_uri(),))  # fmt: skip
        assert "file://" in refused("secret.txt")
        with db:
            db.execute("UPDATE model_versions SET source = ? WHERE name = 'intents'",
                       (mv.source,))  # fmt: skip
        db.close()

        # 2. A file added to the release.
        store.client.log_artifact(mv.run_id, str(padding), "release")
        assert "'padding.bin', which is not a file of this release" in refused("padding.bin")
        # MLflow has no call to delete one artifact file: remove it in the artifact store.
        stored = tmp_path / "mlflow" / "artifacts" / mv.source.split("mlflow-artifacts:/", 1)[1]
        (stored / "padding.bin").unlink()

        # 3. A release file grown in place.
        weights = stored / "adapter_model.safetensors"
        original = weights.read_bytes()
        weights.write_bytes(original + bytes(20 << 20))
        assert "over its limit" in refused("adapter_model.safetensors")
        weights.write_bytes(original)
        assert (
            pull(
                store,
                model="intents",
                alias="candidate",
                trust=trust,
                out=tmp_path / "serving",
                state=tmp_path / "edge-state",
            ).digest
            == done.digest
        )

        # 4. Index metadata grown past python-tuf's limit for it (16 KiB for the timestamp).
        index_run = store.index_run(create=False)
        big = tmp_path / "big" / "timestamp.json"
        big.parent.mkdir()
        big.write_bytes(b" " * (1 << 20))
        store.client.log_artifact(index_run, str(big), "tuf")
        assert "timestamp.json" in refused("timestamp.json")

        # 5. The index run's artifact location rewritten (a write to MLflow's database) to
        #    another host: no byte is asked of it, and no credential is sent there.
        with socket.socket() as foreign:
            foreign.bind(("127.0.0.1", 0))
            foreign.listen()
            foreign.setblocking(False)
            elsewhere = f"http://127.0.0.1:{foreign.getsockname()[1]}/stolen"
            db = sqlite3.connect(tmp_path / "mlflow" / "mlflow.db")
            with db:
                db.execute("UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?",
                           (elsewhere, index_run))  # fmt: skip
            db.close()
            downloads.clear()
            with pytest.raises(VerificationError) as err:
                pull(MlflowStore(server.uri), model="intents", alias="candidate", trust=trust,
                     out=tmp_path / "serving", state=tmp_path / "edge-state")  # fmt: skip
            assert err.value.reason == "fetch" and elsewhere in str(err.value), err.value
            with pytest.raises(BlockingIOError):
                foreign.accept()  # nobody connected
