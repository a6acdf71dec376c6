"""MlflowStore's artifact client: MLflow's credentials, resolved once, or MLflow's own path."""

from __future__ import annotations

import pytest

from registry.mlflow_store import MlflowStore


def _store(uri: str) -> MlflowStore:
    # A unit seam: the client is decided from the environment alone, so no server is
    # started here (tests/registry/test_registry_server.py downloads through it for real).
    store = object.__new__(MlflowStore)
    store.uri, store._http, store._plain_http = uri, None, None
    return store


def test_a_token_and_tls_settings_go_into_one_persistent_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123")
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    store = _store("https://registry.example:5000")

    client = store._artifact_client()

    assert client is not None
    assert client.headers["Authorization"] == "Bearer tok-123"
    assert store._artifact_client() is client  # resolved once, reused


def test_basic_auth_needs_both_the_user_and_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "edge")
    client = _store("http://127.0.0.1:5000")._artifact_client()
    assert client is not None and client.auth is None

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    client = _store("http://127.0.0.1:5000")._artifact_client()
    assert client is not None and client.auth is not None


def test_an_mlflow_auth_plugin_keeps_mlflows_own_request_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_AUTH", "some_plugin")
    assert _store("http://127.0.0.1:5000")._artifact_client() is None
