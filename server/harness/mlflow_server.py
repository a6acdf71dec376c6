"""A real ``mlflow server`` on localhost: SQLite backend, artifact proxy, optional basic auth.

With ``auth=True`` the server runs MLflow's basic-auth app; its admin account gets a fresh
random password (`MlflowServer.admin`) and `MlflowServer.create_user` adds accounts
through MLflow's REST API.

Usage::

    with MlflowServer(work / "mlflow") as server:
        store = MlflowStore(server.uri)
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from server.harness.process import LOCALHOST, ManagedProcess, Service, free_port, http_status

READY_SECONDS = 90.0
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def _admin() -> tuple[str, str]:
    return "admin", secrets.token_urlsafe(16)


@dataclass
class MlflowServer(Service):
    """One ``mlflow server`` process whose database, artifacts and log live under `root`.

    Attributes:
        root: Holds ``mlflow.db``, ``artifacts/``, ``server.log`` (and the auth files).
        auth: Run MLflow's basic-auth app (default READ permission for every account).
        port: The port it serves on (a free one by default).
        admin: The auth app's admin account, with a random password.
    """

    root: Path
    auth: bool = False
    port: int = field(default_factory=free_port)
    admin: tuple[str, str] = field(default_factory=_admin)
    process: ManagedProcess | None = None

    @property
    def uri(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def start(self) -> MlflowServer:
        """Start the server and return once ``/health`` answers.

        Raises:
            HarnessError: If it exits or is not healthy in time (with its log's tail).
        """
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
                f"admin_username = {self.admin[0]}\n"
                f"admin_password = {self.admin[1]}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                "grant_default_workspace_access = true\n"
                "auth_cache_ttl_seconds = 60\n"
            )
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(16)
            cmd += ["--app-name", "basic-auth"]
        self.process = ManagedProcess.start(
            "mlflow server", cmd, env=env, log_path=self.root / "server.log"
        )
        try:
            self.process.wait_ready(
                lambda: http_status(f"{self.uri}/health") == 200,
                timeout=READY_SECONDS,
                what=f"serving {self.uri}/health",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def create_user(self, username: str, password: str) -> None:
        """Add an account to the basic-auth app (as its admin)."""
        from mlflow.server.auth.client import AuthServiceClient

        with _credentials(self.admin):
            AuthServiceClient(self.uri).create_user(username, password)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server and everything it started; safe to call more than once."""
        if self.process is not None:
            self.process.stop(timeout)


@contextmanager
def _credentials(user: tuple[str, str]) -> Iterator[None]:
    """MLflow's clients read credentials from the environment only; set them for a call."""
    saved = {name: os.environ.get(name) for name in CREDENTIAL_VARS}
    os.environ.update(zip(CREDENTIAL_VARS, user, strict=True))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
