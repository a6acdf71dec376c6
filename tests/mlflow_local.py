"""A real ``mlflow server`` on 127.0.0.1 for tests: SQLite backend, artifact proxy, and
optionally MLflow's basic-auth app with users created through its REST API."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tests.integration.flower_local import LOCALHOST, free_port

ADMIN = ("admin", "admin-password-1234")


@dataclass
class MlflowServer:
    root: Path
    auth: bool = False
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def start(self) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        cmd = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--host",
            LOCALHOST,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        if self.auth:
            ini = self.root / "basic_auth.ini"
            ini.write_text(
                "[mlflow]\n"
                "default_permission = READ\n"
                f"database_uri = sqlite:///{self.root / 'auth.db'}\n"
                f"admin_username = {ADMIN[0]}\n"
                f"admin_password = {ADMIN[1]}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                "grant_default_workspace_access = true\n"
                "auth_cache_ttl_seconds = 60\n"
            )
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = "fedlora-tests-only"
            cmd += ["--app-name", "basic-auth"]
        log = open(self.root / "server.log", "wb")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError((self.root / "server.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("mlflow server did not become healthy in 90 s")

    def create_user(self, username: str, password: str) -> None:
        from mlflow.server.auth.client import AuthServiceClient

        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = ADMIN
        try:
            AuthServiceClient(self.uri).create_user(username, password)
        finally:
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
