"""The validated settings of an edge node (parsed once, from the CLI)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from clients.task.choices import DEFAULT_BASE, QUANTIZATIONS
from clients.task.errors import ConfigError

DEFAULT_ALIAS = "production"
TOKEN_ENV = "FEDLORA_EDGE_TOKEN"
UPSTREAM_KEY_ENV = "FEDLORA_UPSTREAM_KEY"
# Chosen with scripts/bench_hybrid.py on CLINC150 (README, "Hybrid routing").
DEFAULT_ESCALATE_BELOW = 0.6
# More inference threads than any host has cores only contend (torch takes a C int).
MAX_THREADS = 1024
# The ceiling of --max-items. The request models refuse a longer list before they validate
# its items: a body of 96,000 wrongly typed items cost 1.6 s of error building otherwise.
MAX_ITEMS = 1024


@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str = DEFAULT_ALIAS

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """``NAME`` or ``NAME@ALIAS``; split at the last ``@``, since a model name may hold
        one and an MLflow alias may not (a name with ``@`` needs its alias spelt out)."""
        name, at, alias = text.rpartition("@")
        if not at:
            name, alias = text, ""
        if not name or (at and not alias) or "/" in name:
            raise ConfigError(f"--model {text!r} must be NAME or NAME@ALIAS")
        return cls(name, alias or DEFAULT_ALIAS)

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}"


@dataclass(frozen=True)
class EdgeSettings:
    """Everything ``fedlora edge serve`` needs; every field is checked here."""

    models: tuple[ModelRef, ...]
    trust: Path
    cache: Path
    registry_uri: str
    base: str = DEFAULT_BASE
    quantization: str = "none"
    host: str = "127.0.0.1"
    port: int = 8080
    poll_seconds: float = 30.0
    refresh_timeout_s: float = 600.0  # one refresh's registry work; its worker is then killed
    max_epsilon: float | None = None
    admin_token: str | None = None
    max_items: int = 64  # texts per request
    max_text_chars: int = 4000
    max_new_tokens: int = 64
    max_loaded: int = 4  # releases held in memory beyond each model's active one
    max_batch: int = 32  # texts or prompts per forward
    max_queue: int = 256  # requests waiting per base; more get 503 + Retry-After
    batch_wait_ms: float = 2.0  # how long a batch may wait for more requests under load
    body_timeout_s: float = 30.0  # to receive a request's whole body; then 408
    threads: int = 0  # torch threads for inference; 0: half the cores (see `torch_threads`)
    # Hybrid routing (clients.edge.hybrid): nothing leaves without an upstream and a policy.
    upstream: str | None = None
    upstream_model: str | None = None
    escalate_below: float = DEFAULT_ESCALATE_BELOW
    policy: Path | None = None
    upstream_timeout_s: float = 2.0
    breaker_failures: int = 3
    breaker_backoff_s: float = 5.0
    upstream_key: str | None = field(default=None, repr=False)  # $FEDLORA_UPSTREAM_KEY

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("--model is required (NAME or NAME@ALIAS; repeatable)")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"--model lists a model twice: {names}")
        if not self.trust.is_dir():
            raise ConfigError(f"--trust {str(self.trust)!r} is not a directory")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"--quantization {self.quantization!r}: expected none or 4bit")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port {self.port} is not a TCP port")
        # Both are a thread's wait; past TIMEOUT_MAX (inf included) it raises OverflowError.
        for flag, seconds in (
            ("--poll-seconds", self.poll_seconds),
            ("--refresh-timeout-s", self.refresh_timeout_s),
        ):
            if not 0 < seconds <= threading.TIMEOUT_MAX:
                raise ConfigError(
                    f"{flag} {seconds} must be > 0 and at most {threading.TIMEOUT_MAX:g}"
                )
        if self.max_epsilon is not None and not self.max_epsilon > 0:
            raise ConfigError(f"--max-epsilon {self.max_epsilon} must be > 0")
        if self.max_items > MAX_ITEMS:
            raise ConfigError(f"--max-items {self.max_items} must be at most {MAX_ITEMS}")
        for name in ("max_items", "max_text_chars", "max_new_tokens", "max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} must be ≥ 1")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ConfigError(f"--batch-wait-ms {self.batch_wait_ms} must be in 0..1000")
        if not 0 < self.body_timeout_s <= 3600:
            raise ConfigError(f"--body-timeout-s {self.body_timeout_s} must be in (0, 3600]")
        if self.max_loaded < 0:
            raise ConfigError(f"--max-loaded {self.max_loaded} must be ≥ 0")
        if not 0 <= self.threads <= MAX_THREADS:
            raise ConfigError(
                f"--threads {self.threads} must be in 0..{MAX_THREADS} (0: half the cores)"
            )
        self._check_routing()

    def _check_routing(self) -> None:
        if self.upstream is not None:
            url = urlsplit(self.upstream)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ConfigError(f"--upstream {self.upstream!r} must be an http(s):// URL")
            if url.username or url.password or url.query or url.fragment:
                raise ConfigError(
                    f"--upstream {self.upstream!r}: no credentials, query or "
                    "fragment in the URL (the key goes in $FEDLORA_UPSTREAM_KEY)"
                )
        elif self.policy is not None or self.upstream_model is not None:
            raise ConfigError("--policy and --upstream-model need --upstream")
        if self.upstream_model is not None and not 0 < len(self.upstream_model) <= 256:
            raise ConfigError(f"--upstream-model {self.upstream_model!r} must be 1..256 characters")
        if not 0 < self.escalate_below <= 1:
            raise ConfigError(f"--escalate-below {self.escalate_below} must be in (0, 1]")
        if self.policy is not None and not self.policy.is_file():
            raise ConfigError(f"--policy {str(self.policy)!r} is not a file")
        if not 0 < self.upstream_timeout_s <= 60:
            raise ConfigError(f"--upstream-timeout-s {self.upstream_timeout_s} must be in (0, 60]")
        if self.breaker_failures < 1:
            raise ConfigError(f"--breaker-failures {self.breaker_failures} must be ≥ 1")
        if not 0 < self.breaker_backoff_s <= 300:
            raise ConfigError(f"--breaker-backoff-s {self.breaker_backoff_s} must be in (0, 300]")

    @property
    def torch_threads(self) -> int:
        """Inference threads. Half the cores by default: the other half keeps the HTTP loop
        and a swap's verify-and-load from stalling requests (measured in bench_edge.py)."""
        return self.threads or max(1, (os.cpu_count() or 2) // 2)

    @staticmethod
    def token_from_env() -> str | None:
        return os.environ.get(TOKEN_ENV) or None

    @staticmethod
    def upstream_key_from_env() -> str | None:
        return os.environ.get(UPSTREAM_KEY_ENV) or None
