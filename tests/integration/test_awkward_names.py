"""Awkward labels and model names through every layer, exactly as they were written.

Labels: a data file -> ``fedlora site check`` (the run-config line it prints) -> the run
config as ``flwr run --run-config`` passes it -> a federated run in Flower's simulation
(round plans as Flower messages) -> MLflow params and ``run-config.toml`` -> the adapter
and its signed provenance -> an edge node's answers. Model names: publish, the MLflow
search filter, ``registry show``, promote, pull and the edge node's answers.
"""

from __future__ import annotations

import json
import shlex
import tomllib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from flwr.common.config import parse_config_args
from mlflow.tracking import MlflowClient

from clients.edge.app import create_app
from clients.edge.node import EdgeNode
from clients.edge.settings import EdgeSettings, ModelRef
from clients.task.labels import parse_label_set
from registry.artifact import read_provenance
from registry.keys import KeyPair, TrustStore, generate_keypair
from registry.lifecycle import SigningKey, promote, publish
from registry.mlflow_store import MlflowStore
from registry.policy import Policy
from registry.pull import pull
from server.cli import main
from server.run_config import read_config
from server.settings import RunSettings
from server.simulation import SimSite, simulate
from server.tracking import CONFIG_ARTIFACT

pytestmark = pytest.mark.integration

LABELS = [
    "billing, refunds",
    'say "hi"',
    "it's",
    "a=b; c",
    "back\\slash",
    " leading",
    "trailing ",
    "100% sure",
    "日本語 ✓",
    "two\nlines",
    "L" * 300,
]
# Names MLflow accepts (no '/' or ':'); 'it_s' matches the LIKE filter of "it's" too.
NAMES = ["it's", "it_s", 'say "hi"', "a,b=c %", "back\\slash", " lead", "日本 ✓", "N" * 200]


@pytest.fixture(scope="module")
def run(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two sites holding every label; a one-round simulated run configured as a user
    would after ``fedlora site check``."""
    root = tmp_path_factory.mktemp("awkward")
    sites = []
    for i in range(2):
        rows = [{"text": f"site {i} row {j} about {label}", "label": label}
                for j in range(2) for label in LABELS]  # fmt: skip
        path = root / f"site-{i}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        sites.append(SimSite(f'site {i}, "quoted"', path))
    return {"root": root, "sites": sites, "base": tiny_bert}


def test_labels_survive_check_config_training_mlflow_provenance_and_the_edge(
    run: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    root, sites = run["root"], run["sites"]
    # site check prints the run-config line; what a shell passes to flwr run is read back.
    assert main(["site", "check", "--data", str(sites[0].data_path), "--task",
                 "sequence-classification"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    arg = next(line for line in printed.splitlines() if "--run-config" in line)
    (word,) = shlex.split(arg.split("--run-config", 1)[1])
    overrides = parse_config_args([word])
    lines = [line.strip() for line in printed.splitlines()]
    line = next(line for line in lines if line.startswith("labels = "))
    assert parse_label_set(tomllib.loads(line)["labels"]) == tuple(sorted(LABELS))

    uri = f"sqlite:///{root / 'mlflow.db'}"
    settings = RunSettings.from_config(
        overrides
        | {
            "base-model": str(run["base"]),
            "num-server-rounds": 1,
            "local-steps": 1,
            "batch-size": 4,
            "lora.r": 2,
            "min-available-clients": 2,
            "out-dir": str(root / "out"),
            "tracking-uri": uri,
        }
    )
    assert settings.spec.labels == tuple(sorted(LABELS))

    result = simulate(settings, sites)  # round plans travel as Flower messages to each site

    row = result.history[0]
    assert row["sites"] == 2 and row["failed"] == 0, row
    assert sorted(row["site_train"]) == sorted(s.site_id for s in sites)
    client = MlflowClient(tracking_uri=uri)
    mlflow_run = client.get_run(result.run_id)
    assert parse_label_set(mlflow_run.data.params["labels"]) == settings.spec.labels
    # Each site's metrics, under a key MLflow accepts, mapped back to the site id.
    site_tags = {k: v for k, v in mlflow_run.data.tags.items() if k.startswith("fedlora.site.")}
    assert sorted(site_tags.values()) == sorted(s.site_id for s in sites)
    for tag in site_tags:
        key = tag.removeprefix("fedlora.site.")
        assert client.get_metric_history(result.run_id, f"site/{key}/examples")
    config_file = Path(client.download_artifacts(result.run_id, CONFIG_ARTIFACT, str(root)))
    saved = tomllib.loads(config_file.read_text(encoding="utf-8"))
    assert parse_label_set(read_config(_flat(saved))["labels"]) == settings.spec.labels
    task = json.loads((result.adapter_dir / "fedlora_task.json").read_text(encoding="utf-8"))
    assert task["labels"] == sorted(LABELS)

    # Signed provenance, the registry and an edge node's answers.
    store, key, trust = _registry(root)
    publish(store, result.out_dir, model="intents", key=key)
    promote(store, model="intents", version="1", key=key, trust=trust, policy=Policy())
    release = pull(store, model="intents", alias="production", trust=trust,
                   out=root / "pulled", state=root / "state")  # fmt: skip
    assert read_provenance(release.directory).labels == sorted(LABELS)
    answer = _edge(root, store, run["base"], ["intents"]).post(
        "/v1/predict", json={"texts": ["about refunds"]}
    )
    assert answer.status_code == 200, answer.text
    (prediction,) = answer.json()["predictions"]
    assert sorted(prediction["scores"]) == sorted(LABELS) and prediction["label"] in LABELS


def test_model_names_survive_publish_search_show_promote_pull_and_the_edge(
    run: dict, training_outputs: list[Path], tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = run["root"] / "names"
    store, key, trust = _registry(root)
    for i, name in enumerate(NAMES):
        published = publish(store, training_outputs[i % len(training_outputs)], model=name, key=key)
        promote(store, model=name, version=published.version, key=key, trust=trust,
                policy=Policy())  # fmt: skip
    for i, name in enumerate(NAMES):
        # The search filter finds this model's versions only ('it_s' also matches "it's").
        assert [v.name for v in store.versions(name)] == [name]
        release = pull(store, model=name, alias="production", trust=trust,
                       out=root / "pulled" / str(i), state=root / "state")  # fmt: skip
        assert read_provenance(release.directory).model_name == name
        assert main(["registry", "show", name, "--registry", store.uri, "--json"]) == 0
        (facts,) = json.loads(capsys.readouterr().out)["versions"]
        assert facts["aliases"] == ["candidate", "production"] and facts["metrics"]

    edge = _edge(root, store, tiny_llama, NAMES)
    for name in NAMES:
        answer = edge.post("/v1/predict", json={"model": name, "texts": ["hello"]})
        assert answer.status_code == 200 and answer.json()["model"] == name, answer.text
    assert set(edge.get("/v1/adapters").json()) == set(NAMES)


def test_registry_show_prints_whole_aliases_and_metrics_at_80_columns(
    run: dict, training_outputs: list[Path], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    root = run["root"] / "show"
    store, key, trust = _registry(root)
    name = "intents-with-a-rather-long-model-name"
    published = publish(store, training_outputs[0], model=name, key=key,
                        alias="candidate-for-the-quarterly-review-2026")  # fmt: skip
    promote(store, model=name, version=published.version, key=key, trust=trust, policy=Policy(),
            alias="production-eu-west-hospital-network")  # fmt: skip

    assert main(["registry", "show", name, "--registry", store.uri]) == 0

    out = capsys.readouterr().out
    for whole in (
        "candidate-for-the-quarterly-review-2026, production-eu-west-hospital-network",
        "accuracy=0.7",
        published.digest,
        published.key_id,
    ):
        assert whole in out, out


def _flat(config: dict, prefix: str = "") -> dict:
    """A TOML run-config file as Flower flattens it (``lora.r = 8`` is a table)."""
    out: dict = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _registry(root: Path) -> tuple[MlflowStore, SigningKey, TrustStore]:
    pair: KeyPair = generate_keypair(root / "keys")
    (root / "trust").mkdir(parents=True)
    (root / "trust" / "k.pub").write_bytes(pair.public_path.read_bytes())
    store = MlflowStore(f"sqlite:///{root / 'registry.db'}")
    return store, SigningKey(pair.private_path), TrustStore.load(root / "trust")


def _edge(root: Path, store: MlflowStore, base: Path, names: list[str]) -> TestClient:
    node = EdgeNode(
        EdgeSettings(
            models=tuple(ModelRef(name) for name in names),
            trust=root / "trust",
            cache=root / "edge-cache",
            registry_uri=store.uri,
            base=str(base),
        )
    )
    node.start()
    return TestClient(create_app(node, poll=False))
