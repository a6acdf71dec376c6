"""The ServerApp under ``flwr run``: a refused run reads as one line, not a traceback."""

from __future__ import annotations

import io
import json
import logging
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common.config import parse_config_args

from clients.task.errors import ConfigError
from clients.task.label_head import label_name_head
from clients.task.labels import parse_label_set
from clients.task.model import build_model, is_head_tensor
from server.app import DEPLOYMENT_LABELS, OneLineRefusal, main, start_head
from server.settings import RunSettings


def test_a_classification_run_without_labels_says_how_to_get_them() -> None:
    with pytest.raises(ConfigError) as refused:
        main(None, SimpleNamespace(run_config={"task": "sequence-classification"}))  # type: ignore[arg-type]

    assert str(refused.value) == DEPLOYMENT_LABELS
    assert "fedlora site check" in DEPLOYMENT_LABELS
    # The example it gives is a valid --run-config argument.
    (word,) = shlex.split(DEPLOYMENT_LABELS.rsplit("--run-config ", 1)[1])
    assert parse_label_set(parse_config_args([word])["labels"]) == ("a", "b")


def test_flower_s_log_of_a_refused_run_is_one_line() -> None:
    """Flower logs a ServerApp's exception with exc_info; a FedloraError stays one line."""
    logger = logging.getLogger("tests.flwr-like")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.addFilter(OneLineRefusal())
    try:
        for error in (ConfigError(DEPLOYMENT_LABELS), RuntimeError("a bug")):
            try:
                raise error
            except Exception as exc:
                logger.error("%s raised an exception", "ServerApp", exc_info=exc)
    finally:
        logger.removeHandler(handler)
    refused, bug = stream.getvalue().split("ServerApp raised an exception", 1)
    assert refused == f"fedlora run FAILED: {DEPLOYMENT_LABELS}\n"
    assert "Traceback" in bug  # anything else keeps its traceback


def test_a_resume_with_a_changed_setting_names_its_run_config_key(tmp_path) -> None:
    from server.app import _check_resume
    from server.checkpoint import Checkpoint, CheckpointStore
    from server.settings import RunSettings

    config = {"labels": "a,b", "out-dir": str(tmp_path), "num-server-rounds": 3}
    before = RunSettings.from_config({**config, "learning-rate": 0.005})
    store = CheckpointStore(tmp_path / "checkpoint")
    store.save(Checkpoint(1, {}, [], "run", fingerprint=before.fingerprint()))
    now = RunSettings.from_config({**config, "learning-rate": 0.01, "resume": True})

    changed = r"changed: learning-rate was 0\.005, now 0\.01"
    hint = r" \(set learning-rate=0\.005 again to resume\)$"
    with pytest.raises(ConfigError, match=changed + hint):
        _check_resume(now, store)


def _stopped_after_the_last_round(tmp_path, *, rounds: int = 2, **extra):
    """A run config and a checkpoint of round 2 of MLflow run "run", as a run stopped while
    it wrote its outputs leaves them; and the settings of its resume."""
    from server.checkpoint import Checkpoint, CheckpointStore
    from server.settings import RunSettings

    config = {"labels": "a,b", "out-dir": str(tmp_path), "num-server-rounds": rounds, **extra}
    store = CheckpointStore(tmp_path / "checkpoint")
    fingerprint = RunSettings.from_config(config).fingerprint()
    store.save(Checkpoint(2, {}, [{"round": 1}, {"round": 2}], "run", fingerprint=fingerprint))
    return store, RunSettings.from_config({**config, "resume": True})


def _metrics_json(out: Path, *, run_id: str, last_round: int) -> None:
    rounds = [{"round": k} for k in range(1, last_round + 1)]
    (out / "metrics.json").write_text(json.dumps({"rounds": rounds, "mlflow_run_id": run_id}))


@pytest.mark.parametrize(
    ("run_id", "last_round"),
    [("run", 1), ("an-earlier-run", 2)],
    ids=["an-earlier-round", "an-earlier-run-in-the-same-out"],
)
def test_a_resume_after_the_last_round_is_taken_while_outputs_are_missing(
    tmp_path, run_id: str, last_round: int
) -> None:
    from server.app import _check_resume

    store, settings = _stopped_after_the_last_round(tmp_path)
    # A metrics.json of another round, or of another MLflow run, is not this run's outputs.
    _metrics_json(tmp_path, run_id=run_id, last_round=last_round)

    found = _check_resume(settings, store)

    assert found is not None and found.completed_round == 2


@pytest.mark.parametrize("publish", [False, True])
def test_a_resume_of_a_complete_run_says_where_and_what_to_do(tmp_path, publish: bool) -> None:
    from server.app import _check_resume

    (tmp_path / "key.pem").write_text("")  # named only, never read here
    extra = {"registry.model-name": "m", "registry.signing-key": str(tmp_path / "key.pem")}
    store, settings = _stopped_after_the_last_round(tmp_path, **(extra if publish else {}))
    _metrics_json(tmp_path, run_id="run", last_round=2)

    with pytest.raises(ConfigError) as refused:
        _check_resume(settings, store)

    said = str(refused.value)
    assert said.startswith(f"cannot resume {tmp_path}: the run is complete (round 2 of ")
    assert "for a new run choose another --out" in said
    publish_line = f"fedlora registry publish {tmp_path} --model m --key {tmp_path / 'key.pem'}"
    assert (publish_line in said) is publish


def test_the_publish_command_of_a_complete_run_is_the_run_s_own_and_shell_quoted(
    tmp_path,
) -> None:
    from server.app import _check_resume
    from server.cli import build_parser

    key = tmp_path / "my keys" / "key.pem"
    key.parent.mkdir()
    key.write_text("")  # named only, never read here
    out = tmp_path / "my out"
    out.mkdir()
    registry = {
        "tracking-uri": "http://bob:s3cret@mlflow.internal:5000",
        "registry.model-name": "m",
        "registry.signing-key": str(key),
        "registry.alias": "staging",
        "registry.passphrase-env": "MY_PASSPHRASE",
    }
    store, settings = _stopped_after_the_last_round(out, **registry)
    _metrics_json(out, run_id="run", last_round=2)

    with pytest.raises(ConfigError) as refused:
        _check_resume(settings, store)

    said = str(refused.value)
    advice = said.split("finish a publish that was stopped): ", 1)[1]
    # A URI with a user part may hold a credential: never printed, the registry comes
    # from MLFLOW_TRACKING_URI (the registry command's default), and the advice says so.
    assert advice.endswith(" (with MLFLOW_TRACKING_URI set to the run's tracking-uri)")
    command = shlex.split(
        advice.removesuffix(" (with MLFLOW_TRACKING_URI set to the run's tracking-uri)")
    )
    assert command == [
        *("fedlora", "registry", "publish", str(out), "--model", "m", "--key", str(key)),
        *("--alias", "staging", "--passphrase-env", "MY_PASSPHRASE"),
    ]
    assert "s3cret" not in said and "bob" not in said
    args = build_parser().parse_args(command[1:])  # what the CLI takes
    assert (args.source, args.registry) == (str(out), None)


@pytest.mark.parametrize(
    "uri",
    [
        "https://tok3n@mlflow.internal",  # a token as the user name
        "postgresql://u@db/mlflow?password=s3cret",
        "https://u:p@h:5000?token=abc",
        "https://mlflow.internal/#s3cret",
    ],
)
def test_a_tracking_uri_that_may_hold_a_credential_is_never_printed(
    tmp_path, monkeypatch: pytest.MonkeyPatch, uri: str
) -> None:
    from server.app import publish_command
    from server.settings import PublishSettings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    publish = PublishSettings("m", tmp_path / "k.pem", "FEDLORA_KEY_PASSPHRASE", "candidate")
    said = publish_command(tmp_path, publish, tracking_uri=uri)
    assert "--registry" not in said and "MLFLOW_TRACKING_URI" in said
    assert not any(secret in said for secret in ("tok3n", "s3cret", "abc", "u:p"))
    plain = publish_command(tmp_path, publish, tracking_uri="http://[::1]:5000")
    assert shlex.split(plain)[-2:] == ["--registry", "http://[::1]:5000"]  # as given
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://[::1]:5000")
    assert "--registry" not in publish_command(tmp_path, publish, tracking_uri="http://[::1]:5000")


def test_a_run_its_privacy_budget_stopped_early_is_complete(tmp_path) -> None:
    # dp.max-epsilon stopped it after round 2 of 5 and it wrote its outputs: a resume would
    # reopen (or fail) a complete MLflow run.
    from server.app import _check_resume

    store, settings = _stopped_after_the_last_round(tmp_path, rounds=5)
    _metrics_json(tmp_path, run_id="run", last_round=2)

    with pytest.raises(ConfigError, match=r"complete \(round 2 of num-server-rounds=5, where it"):
        _check_resume(settings, store)


@pytest.mark.integration  # a real subprocess or model: seconds, kept out of the unit run
def test_a_new_run_removes_an_earlier_run_s_metrics_json_before_it_writes(
    tmp_path, tiny_bert: Path
) -> None:
    # Left in OUT, it made the new run look complete until the new run wrote its own, and
    # `fedlora registry publish OUT` signed the new adapter with the old run's provenance.
    # A run stopped before its first round (a stopped Grid) shows what it wrote.
    import threading

    from server.app import run_training
    from server.settings import RunSettings
    from server.simulation import StoppableGrid

    out = tmp_path / "out"
    out.mkdir()
    _metrics_json(out, run_id="an-earlier-run", last_round=2)
    settings = RunSettings.from_config(
        {"labels": "a,b", "out-dir": str(out), "num-server-rounds": 2, "base-model": str(tiny_bert)}
    )
    stopped = threading.Event()
    stopped.set()

    with pytest.raises(KeyboardInterrupt):
        run_training(StoppableGrid(None, stopped), settings)  # type: ignore[arg-type]

    assert (out / "mlflow.db").is_file()  # it had started writing
    assert not (out / "metrics.json").exists()


@pytest.mark.integration  # a real subprocess or model: seconds, kept out of the unit run
def test_a_run_refused_by_its_tracking_store_keeps_an_earlier_run_s_metrics_json(
    tmp_path, tiny_bert: Path
) -> None:
    # Everything that can be refused is checked before the first write: a tracking store
    # that cannot be opened refuses the run, which must not have removed anything yet.
    from server.app import run_training
    from server.settings import RunSettings

    out = tmp_path / "out"
    out.mkdir()
    _metrics_json(out, run_id="an-earlier-run", last_round=2)
    earlier = (out / "metrics.json").read_text()
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory path through a regular file: sqlite cannot open it
    settings = RunSettings.from_config(
        {"labels": "a,b", "out-dir": str(out), "num-server-rounds": 2,
         "base-model": str(tiny_bert), "tracking-uri": f"sqlite:///{blocker}/mlflow.db"}
    )  # fmt: skip

    with pytest.raises(Exception):  # noqa: B017 (MLflow's own error type varies)
        run_training(None, settings)  # type: ignore[arg-type]  # refused before any round

    assert (out / "metrics.json").read_text() == earlier


@pytest.mark.integration  # a real model and MLflow store: seconds, kept out of the unit run
def test_a_run_stopped_before_its_mlflow_run_opens_opens_none(tmp_path, tiny_bert: Path) -> None:
    # Ctrl-C while the model loads: the round loop must not open a run after the stop.
    from mlflow.tracking import MlflowClient

    from server.app import run_training
    from server.settings import RunSettings

    out = tmp_path / "out"
    settings = RunSettings.from_config(
        {"labels": "a,b", "out-dir": str(out), "num-server-rounds": 2, "base-model": str(tiny_bert)}
    )

    opened: list[str | None] = []  # the run id when the tracker was handed over

    with pytest.raises(KeyboardInterrupt, match="stopped before its MLflow run opened"):
        run_training(
            None,  # type: ignore[arg-type]
            settings,
            on_tracking=lambda tracker: opened.append(tracker.run_id),
            stop_requested=lambda: True,
        )

    assert opened == [None]  # handed over before it opened: a stop can reach it
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(ids) == []


@pytest.mark.integration  # a real model, MLflow store and signing key: seconds
def test_a_run_stopped_while_it_writes_its_outputs_does_not_publish(
    tmp_path, tiny_bert: Path
) -> None:
    # A resume with no round left runs no Grid call, so only the stop flag can tell it
    # that the user stopped it before the publish; its outputs are complete.
    from mlflow.tracking import MlflowClient

    from clients.task.model import build_model, trainable_state
    from registry.keys import generate_keypair
    from server.app import run_training
    from server.checkpoint import Checkpoint, CheckpointStore, outputs_complete
    from server.settings import RunSettings
    from server.tracking import Tracker

    out = tmp_path / "out"
    key = generate_keypair(tmp_path / "keys").private_path
    config = {
        "labels": "a,b", "out-dir": str(out), "num-server-rounds": 1,
        "base-model": str(tiny_bert), "registry.model-name": "m",
        "registry.signing-key": str(key),
    }  # fmt: skip
    settings = RunSettings.from_config(config)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    out.mkdir()
    run_id = Tracker(uri, settings.experiment).start(params={})
    state = trainable_state(build_model(settings.spec).model)
    CheckpointStore(out / "checkpoint").save(
        Checkpoint(1, state, [{"round": 1}], run_id, fingerprint=settings.fingerprint())
    )
    asked: list[str] = []

    def stopped() -> bool:  # the stop comes once the MLflow run is open
        asked.append("asked")
        return len(asked) > 1

    resumed = RunSettings.from_config({**config, "resume": True})
    with pytest.raises(KeyboardInterrupt, match="after writing its outputs, before the publish"):
        run_training(None, resumed, stop_requested=stopped)  # type: ignore[arg-type]

    assert outputs_complete(out, completed_round=1, run_id=run_id)
    assert MlflowClient(tracking_uri=uri).search_model_versions("name = 'm'") == []


def _head(loaded) -> np.ndarray:
    return next(
        p.detach().numpy().copy()
        for n, p in loaded.model.named_parameters()
        if is_head_tensor(n) and n.endswith(".weight")
    )


def test_a_fresh_label_names_run_starts_from_the_label_embeddings(tiny_bert: Path) -> None:
    settings = RunSettings.from_config(
        {"base-model": str(tiny_bert), "labels": "greet,bye", "head.init": "label-names",
         "head.pooling": "mean", "head.label-scale": 3.0}
    )  # fmt: skip
    loaded = build_model(settings.spec, device="cpu")
    expected, _ = label_name_head(loaded, scale=3.0, max_length=settings.max_length)

    tag = start_head(loaded, settings, fresh=True)

    assert tag == "label-names: scale 3"
    np.testing.assert_allclose(_head(loaded), expected, rtol=1e-5, atol=1e-6)


def test_a_resumed_run_keeps_its_checkpointed_head_and_sets_no_tag(tiny_bert: Path) -> None:
    settings = RunSettings.from_config(
        {"base-model": str(tiny_bert), "labels": "greet,bye", "head.init": "label-names",
         "head.pooling": "mean"}
    )  # fmt: skip
    loaded = build_model(settings.spec, device="cpu")
    before = _head(loaded)

    assert start_head(loaded, settings, fresh=False) is None
    np.testing.assert_array_equal(_head(loaded), before)


def test_a_seeded_run_keeps_the_seeded_head_and_says_so(tiny_bert: Path) -> None:
    # tiny_bert declares no sentence-embedding pooling: auto resolves to the seeded head.
    settings = RunSettings.from_config({"base-model": str(tiny_bert), "labels": "greet,bye"})
    assert settings.head_init == "seeded"
    loaded = build_model(settings.spec, device="cpu")
    before = _head(loaded)

    assert start_head(loaded, settings, fresh=True) == "seeded"
    np.testing.assert_array_equal(_head(loaded), before)
