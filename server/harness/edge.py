"""``fedlora edge serve`` as a process of its own, as on an edge machine.

The node pulls and verifies its releases before its HTTP server opens, so once it answers
(``/healthz``, with any status) it serves what it verified or says why not.

Usage::

    node = EdgeNodeProcess(models=["intents@production"], trust=trust_dir,
                           cache=work / "cache", log_path=work / "edge.log",
                           registry=server.uri)
    with node:
        httpx.post(f"{node.url}/v1/predict", json={"texts": ["hello"]})
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server.harness.process import LOCALHOST, ManagedProcess, Service, free_port, http_status

# Loading the base model and verifying a release take a while on a busy machine.
READY_SECONDS = 300.0


@dataclass
class EdgeNodeProcess(Service):
    """One edge node on localhost.

    Attributes:
        models: ``NAME[@ALIAS]`` of each model to serve.
        trust: The trust store directory (trusted public keys).
        cache: The node's cache of verified releases and its state file.
        log_path: Where its output goes (appended, so a restart keeps the earlier log).
        registry: The MLflow URI; None leaves it to ``MLFLOW_TRACKING_URI``.
        base: The base model; None is the node's default.
        poll_seconds: How often the node polls its aliases.
        env: Variables set on top of this process's environment (e.g. the admin token).
        port: The port it serves on (a free one by default).
        startup_timeout: Seconds to wait until it answers HTTP.
        options: More ``fedlora edge serve`` options, e.g. ``["--max-items", "16"]``.
    """

    models: Sequence[str]
    trust: Path
    cache: Path
    log_path: Path
    registry: str | None = None
    base: str | Path | None = None
    poll_seconds: float = 30.0
    env: Mapping[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    startup_timeout: float = READY_SECONDS
    options: Sequence[str] = ()
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def command(self) -> list[str]:
        """The ``fedlora edge serve`` command line of this node."""
        cmd = [sys.executable, "-m", "server.cli", "edge", "serve"]
        for model in self.models:
            cmd += ["--model", model]
        cmd += ["--trust", str(self.trust), "--cache", str(self.cache), "--host", LOCALHOST,
                "--port", str(self.port), "--poll-seconds", str(self.poll_seconds)]  # fmt: skip
        if self.registry is not None:
            cmd += ["--registry", self.registry]
        if self.base is not None:
            cmd += ["--base", str(self.base)]
        return cmd + list(self.options)

    def start(self) -> EdgeNodeProcess:
        """Start the node and return once its HTTP server answers.

        Raises:
            HarnessError: If it exits or does not answer in time (with its log's tail).
        """
        self.process = ManagedProcess.start(
            "edge node",
            self.command(),
            env={**os.environ, **self.env},
            log_path=self.log_path,
        )
        try:
            self.process.wait_ready(
                lambda: http_status(f"{self.url}/healthz") is not None,
                timeout=self.startup_timeout,
                what=f"answering on {self.url}",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the node; safe to call more than once."""
        if self.process is not None:
            self.process.stop(timeout)
