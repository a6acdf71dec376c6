"""The registry against a real ``mlflow server`` (SQLite, artifact proxy, basic-auth app)."""

from __future__ import annotations

import os
import shutil
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
