from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from registry.keys import KeyPair, TrustStore, generate_keypair
from tests.tiny_models import make_tiny_llama

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


PASSPHRASE = "correct horse battery staple"
# The time stamp the node's log lines start with (logging's asctime, server/console.py).
LOG_TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


def _training_output(base: Path, out: Path, *, seed: int, accuracy: float) -> Path:
    """What `fedlora train` leaves behind: OUT/adapter (PEFT dir) and OUT/metrics.json."""
    from clients.task.model import ModelSpec, build_model, quiet_transformers, save_adapter

    quiet_transformers()
    spec = ModelSpec(
        base=str(base),
        task="sequence-classification",
        labels=("greet", "bye"),
        lora_r=4,
        seed=seed,
    )
    save_adapter(build_model(spec), out / "adapter")
    summary = {
        "rounds": [
            {"round": 1, "site_ids": ["site-a", "site-b"], "accuracy": accuracy - 0.1},
            {"round": 2, "site_ids": ["site-a", "site-b", "site-c"], "accuracy": accuracy},
        ],
        "final": {"round": 2, "accuracy": accuracy, "loss": 0.5},
        "mlflow_run_id": f"run-{seed}",
        "privacy": {},
    }
    (out / "metrics.json").write_text(json.dumps(summary))
    return out


def record_client_dp(
    out: Path, *, noise_multiplier: float = 0.5, sampling_rate: float = 1.0, delta: float = 1e-5
) -> float:
    """Make OUT/metrics.json a run with client-level DP in every round, as the round loop
    records it (each round's accounting and the summary they add up to); returns its ε.

    The registry cross-checks the summary against the rounds before it signs
    (registry/artifact.py), so a summary alone no longer passes for a private run.
    """
    from server.privacy import PrivacyLedger, privacy_summary

    summary = json.loads((out / "metrics.json").read_text())
    ledger = PrivacyLedger(delta)
    for row in summary["rounds"]:
        ledger.step(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate)
        row |= {
            "epsilon": ledger.epsilon,
            "delta": delta,
            "guarantee": "client-level",
            "noise_multiplier": noise_multiplier,
            "sampling_rate": sampling_rate,
        }
    summary["privacy"] = privacy_summary(history=summary["rounds"], clip_norm=1.0, secagg=None)
    (out / "metrics.json").write_text(json.dumps(summary))
    return ledger.epsilon


@pytest.fixture(scope="session")
def training_outputs(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("training")
    return [
        _training_output(tiny_llama, root / f"out{i}", seed=i, accuracy=acc)
        for i, acc in ((1, 0.7), (2, 0.9), (3, 0.95), (4, 0.96))
    ]


@pytest.fixture
def outputs(training_outputs: list[Path], tmp_path: Path) -> list[Path]:
    """Private copies, so a test may change them."""
    copies = []
    for src in training_outputs:
        dst = tmp_path / "outputs" / src.name
        shutil.copytree(src, dst)
        copies.append(dst)
    return copies


@pytest.fixture
def keypair(tmp_path: Path) -> KeyPair:
    return generate_keypair(tmp_path / "keys", passphrase=PASSPHRASE)


@pytest.fixture
def trust(tmp_path: Path, keypair: KeyPair) -> TrustStore:
    directory = tmp_path / "trust"
    directory.mkdir()
    shutil.copy(keypair.public_path, directory / "publisher.pub")
    return TrustStore.load(directory)


@pytest.fixture
def make_trust(tmp_path: Path) -> Callable[..., TrustStore]:
    def make(name: str, *pairs: KeyPair) -> TrustStore:
        directory = tmp_path / name
        directory.mkdir()
        for i, pair in enumerate(pairs):
            shutil.copy(pair.public_path, directory / f"key{i}.pub")
        return TrustStore.load(directory)

    return make


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT whose classifier head is ``classifier`` (with a bias), as in MiniLM;
    hidden 64, so it also runs in 4-bit on CPU."""
    from tests.tiny_models import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), hidden_size=64)


def fedlora_killed_at(
    target: str, argv: list[str], *, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``fedlora ARGV`` in a subprocess in which calling ``module:function`` sends the
    process SIGTERM (then waits for its handler), as `kill PID` would arrive at that step.

    Returns:
        The finished `subprocess.CompletedProcess`, with text stdout and stderr.
    """
    module, _, function = target.partition(":")
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        import {module} as target
        from server.cli import main

        def killed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the signal's handler runs here

        target.{function} = killed
        sys.exit(main({argv!r}))
        """
    )
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=timeout
    )
