"""Reproducible, honestly evaluated runs on Flower's Simulation Engine (tiny BERT, dropout on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from server.settings import RunSettings
from server.simulation import SimSite, simulate
from tests.tiny_models import make_tiny_bert

pytestmark = pytest.mark.integration
LABELS = ("greet", "bye", "thank")
WORDS = {"greet": "hello there", "bye": "goodbye now", "thank": "thanks a lot"}


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(labels: tuple[str, ...], n: int, tag: str) -> list[dict[str, str]]:
    return [
        {"text": f"{WORDS[labels[i % len(labels)]]} {tag} {i}", "label": labels[i % len(labels)]}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SimSite], Path]:
    root = tmp_path_factory.mktemp("quality")
    base = make_tiny_bert(root / "bert", dropout=0.2)
    sites = [
        SimSite("site-a", _write(root / "a.jsonl", _rows(("greet", "bye"), 20, "a"))),
        SimSite("site-b", _write(root / "b.jsonl", _rows(("bye", "thank"), 20, "b"))),
        # 9 rows hold none out at the default 10%: this site must not report an accuracy.
        SimSite("site-c", _write(root / "c.jsonl", _rows(LABELS, 9, "c"))),
    ]
    eval_file = _write(root / "eval.jsonl", _rows(LABELS, 12, "eval"))
    return base, sites, eval_file


def _run(setup: tuple[Path, list[SimSite], Path], out: Path, **extra: object) -> dict:
    base, sites, eval_file = setup
    settings = RunSettings.from_config(
        {
            "base-model": str(base),
            "labels": ",".join(LABELS),
            "num-server-rounds": 2,
            "local-steps": 3,
            "batch-size": 4,
            "max-length": 16,
            "lora.r": 4,
            "learning-rate": 0.05,
            "min-fit-clients": 3,
            "min-available-clients": 3,
            "eval-file": str(eval_file),
            "out-dir": str(out),
        }
        | extra
    )
    simulate(settings, sites)
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.timeout(900)
def test_same_data_seed_and_settings_give_bit_identical_adapters(
    setup: tuple[Path, list[SimSite], Path], tmp_path: Path
) -> None:
    # Act: the same run twice (dropout on at the sites, replies in any order).
    first = _run(setup, tmp_path / "one")
    second = _run(setup, tmp_path / "two")

    # Assert: every adapter file is byte for byte the same.
    for name in ("adapter", "adapter-last", "adapter-best"):
        weights = "adapter_model.safetensors"
        one = (tmp_path / "one" / name / weights).read_bytes()
        assert one == (tmp_path / "two" / name / weights).read_bytes(), name
    assert [r["accuracy"] for r in first["rounds"]] == [r["accuracy"] for r in second["rounds"]]

    # The site with no held-out rows says so instead of scoring its training rows.
    for row in first["rounds"]:
        assert [u["site"] for u in row["unevaluated"]] == ["site-c"]
        assert "no held-out rows" in row["unevaluated"][0]["reason"]
        assert row["evaluated_sites"] == 2
        assert row["headline"] == "central held-out file (eval-file)"
        assert row["accuracy"] == row["central_accuracy"]

    # OUT/adapter is the best round on the eval file; both are in MLflow.
    selection = first["adapter"]
    best = max(first["rounds"], key=lambda r: (r["central_accuracy"], r["round"]))
    assert selection["rule"] == "best" and selection["round"] == best["round"]
    assert first["final"]["round"] == best["round"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'one' / 'mlflow.db'}")
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.tags["fedlora.adapter.round"] == str(best["round"])
    assert run.data.tags["fedlora.headline"] == "central held-out file (eval-file)"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "adapter-last", "adapter-best"} <= artifacts


@pytest.mark.timeout(900)
def test_an_lda_head_run_starts_from_every_sites_training_rows(
    setup: tuple[Path, list[SimSite], Path], tmp_path: Path
) -> None:
    # Act: the real ClientApps answer the head-statistics query before round 1.
    metrics = _run(setup, tmp_path, **{"head.init": "lda"})

    # Assert: 18 + 18 training rows (10% held out) + site-c's 9 (too few to hold one out).
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    tags = client.get_run(metrics["mlflow_run_id"]).data.tags
    assert tags["fedlora.head-init"] == "lda: LDA of 45 rows from 3 site(s)"
    assert len(metrics["rounds"]) == 2 and metrics["rounds"][-1]["central_accuracy"] >= 0


@pytest.mark.timeout(900)
def test_a_label_names_run_starts_from_the_label_embeddings(
    setup: tuple[Path, list[SimSite], Path], tmp_path: Path
) -> None:
    # Act: the server sets the head before round 1; no site is asked for anything.
    metrics = _run(
        setup,
        tmp_path,
        **{"head.init": "label-names", "head.label-scale": 4.0, "head.pooling": "mean"},
    )

    # Assert: the run says where its head came from and trained as usual.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.data.tags["fedlora.head-init"] == "label-names: scale 4"
    assert run.data.params["head.init"] == "label-names"
    assert len(metrics["rounds"]) == 2 and metrics["rounds"][-1]["central_accuracy"] >= 0
