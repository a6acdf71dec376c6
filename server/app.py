"""The ServerApp: the composition root of a training run.

`run_training` parses nothing itself: it takes validated `RunSettings`, checks everything
that could fail before anything is written (base model, eval file, checkpoint state,
MLflow), then runs the rounds and writes ``OUT/adapter/`` and ``OUT/metrics.json``
atomically, metrics.json last (an earlier run's metrics.json is removed before the run
writes anything). Resumed from a checkpoint of the last round (a run stopped while it
wrote its outputs), it runs no round and writes the outputs. ``flwr run .``
enters through `app`; ``fedlora train`` through `server.simulation.simulate`.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients.task.data import load_examples
from clients.task.errors import ConfigError, FedloraError
from clients.task.files import swap_directory, write_atomic
from clients.task.label_head import set_label_name_head
from clients.task.labels import parse_label_set, run_config_arg
from clients.task.model import (
    LoadedModel,
    base_digest,
    build_model,
    load_trainable_state,
    quiet_transformers,
    save_adapter,
    trainable_state,
)
from clients.task.train import evaluate
from registry.errors import KeyFileError
from registry.keys import PASSPHRASE_ENV, load_private_key
from registry.lifecycle import PublishResult, SigningKey, publish
from registry.mlflow_store import MlflowStore
from server.checkpoint import CheckpointStore, outputs_complete
from server.loop import HEAD_TAG, Evaluator, run_rounds
from server.privacy import privacy_summary
from server.record import RoundRecord
from server.roster import Roster
from server.run_config import read_config, to_toml
from server.selection import BestRound, chosen_round
from server.settings import PublishSettings, RunSettings
from server.tracking import Tracker, resolve_tracking_uri, run_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingResult:
    out_dir: Path
    adapter_dir: Path
    metrics_path: Path
    run_id: str
    tracking_uri: str
    history: list[dict[str, Any]]
    published: PublishResult | None = None
    # The resumed checkpoint held the last round: no round ran, only the outputs were written.
    outputs_only: bool = False


def start_head(loaded: LoadedModel, settings: RunSettings, *, fresh: bool) -> str | None:
    """Set round 1's classification head as ``head.init`` says; the MLflow tag to record.

    Only a fresh run's head is set (a resumed run's comes from its checkpoint), and only
    here for ``label-names`` and ``seeded`` (``build_model``'s init); ``lda`` is fitted by
    the round loop from the sites' statistics and tagged there. Returns None where this
    step sets nothing (a resume, ``lda``, a model without a classifier).

    Raises:
        ModelError: From `set_label_name_head` (a label whose embedding is unusable).
    """
    if not fresh or settings.spec.task != "sequence-classification":
        return None
    if settings.head_init == "label-names":
        set_label_name_head(loaded, scale=settings.head_label_scale, max_length=settings.max_length)
        log.info("head: round 1 starts from the embeddings of the label names")
        return f"label-names: scale {settings.head_label_scale:g}"
    return "seeded" if settings.head_init == "seeded" else None


def _check_resume(settings: RunSettings, store: CheckpointStore):
    found = store.load()
    if settings.resume:
        if found is None:
            raise ConfigError(f"resume=true but {store.directory} holds no checkpoint")
        if changed := settings.changed_since(found.fingerprint):
            raise ConfigError(
                f"cannot resume {store.directory}: the run config changed: {'; '.join(changed)}"
            )
        if outputs_complete(
            settings.out_dir, completed_round=found.completed_round, run_id=found.run_id
        ):
            raise ConfigError(_complete_run(settings, found.completed_round))
        return found  # a run stopped after its last round has its outputs written
    if found is not None:
        raise ConfigError(
            f"out-dir={str(settings.out_dir)!r} holds a checkpoint of an earlier run; "
            "pass --resume to continue it or choose another --out"
        )
    return None


def _complete_run(settings: RunSettings, completed_round: int) -> str:
    """Why a resume of a run whose outputs are all written is refused, and what to do."""
    out = str(settings.out_dir)
    early = ", where it stopped early" if completed_round < settings.rounds else ""
    text = (
        f"cannot resume {out}: the run is complete (round {completed_round} of "
        f"num-server-rounds={settings.rounds}{early}; {out}/adapter and {out}/metrics.json "
        "are written); for a new run choose another --out"
    )
    if settings.publish is not None:  # a publish stopped midway is completed by its CLI
        uri = resolve_tracking_uri(settings.tracking_uri, settings.out_dir)
        command = publish_command(settings.out_dir, settings.publish, tracking_uri=uri)
        text += f"; to publish it (or finish a publish that was stopped): {command}"
    return text


def publish_command(out_dir: Path, publish: PublishSettings, *, tracking_uri: str) -> str:
    """The ``fedlora registry publish`` command line that publishes a run's outputs as
    the run does: into its tracking store, with its model name, key, alias and passphrase
    variable. Shell-quoted.

    A tracking URI that may hold a credential (any user part, query or fragment: a
    password, a token as user name, ``?password=``) is never printed: the command then
    has no ``--registry`` and says to run it with ``MLFLOW_TRACKING_URI`` set to the run's
    tracking URI, the registry command's default; so is a URI equal to that variable.
    """
    words = [
        *("fedlora", "registry", "publish", str(out_dir)),
        *("--model", publish.model_name, "--key", str(publish.signing_key)),
        *("--alias", publish.alias),
    ]
    is_default = tracking_uri == os.environ.get("MLFLOW_TRACKING_URI")
    hidden = not is_default and _may_hold_secret(tracking_uri)
    if not (is_default or hidden):
        words += ["--registry", tracking_uri]
    if publish.passphrase_env != PASSPHRASE_ENV:
        words += ["--passphrase-env", publish.passphrase_env]
    command = shlex.join(words)
    if hidden:
        command += " (with MLFLOW_TRACKING_URI set to the run's tracking-uri)"
    return command


def _may_hold_secret(uri: str) -> bool:
    """Whether a URI has a part a credential can hide in: a user part, query or fragment."""
    parts = urlsplit(uri)
    return bool("@" in parts.netloc or parts.query or parts.fragment)


def run_training(
    grid: Grid,
    settings: RunSettings,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_tracking: Callable[[Tracker], None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> TrainingResult:
    """Run a whole training run on a Grid (simulation or Deployment Engine).

    Args:
        on_tracking: Called with the run's `Tracker` before its MLflow run opens (the
            simulation marks the run KILLED with it when a stop begins, and if it has to
            abandon this call; a run opened after that is marked as it opens).
        stop_requested: Whether the run has been told to stop (the simulation's Ctrl-C or
            SIGTERM). Looked at before the MLflow run opens and before the publish, the
            two steps after which a stop would otherwise go unseen where no Grid call
            follows (the Grid's own calls raise once stopped).

    Raises:
        KeyboardInterrupt: ``stop_requested()`` said so at one of those two steps.
    """
    quiet_transformers()
    # Everything that can be refused is checked before the first write.
    digest = base_digest(settings.spec.base)
    settings.plan(1)
    eval_examples = (
        load_examples(
            settings.eval_file, task=settings.spec.task, labels=settings.spec.labels or None
        )
        if settings.eval_file
        else None
    )
    roster = Roster.load(settings.roster) if settings.roster else None
    store = CheckpointStore(settings.out_dir / "checkpoint")
    resume_from = _check_resume(settings, store)
    outputs_only = resume_from is not None and resume_from.completed_round >= settings.rounds
    if settings.publish is not None:
        try:  # a wrong passphrase is found now, not after hours of training
            load_private_key(settings.publish.signing_key, passphrase=settings.publish.passphrase)
        except KeyFileError as exc:
            raise ConfigError(f"registry.signing-key: {exc}") from exc
    loaded = build_model(settings.spec)
    head_tag = start_head(loaded, settings, fresh=resume_from is None)
    initial = trainable_state(loaded.model)

    settings.out_dir.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(settings.tracking_uri, settings.out_dir)
    tracker = Tracker(uri, settings.experiment, artifact_root=settings.out_dir / "mlartifacts")
    if on_tracking is not None:  # before the run opens: a stop meanwhile marks it as it opens
        on_tracking(tracker)
    _unless_stopped(stop_requested, "before its MLflow run opened")
    params = settings.as_params() | {"base-model-digest": digest}
    run_id = tracker.start(
        params=params,
        run_id=resume_from.run_id if resume_from else None,
        run_name=run_name(settings.spec.base),
        config_toml=to_toml(settings.to_config() | {"tracking-uri": ""}),
    )
    log.info("MLflow run %s at %s", run_id, redact_uri(uri))
    if head_tag is not None:
        tracker.set_tags({HEAD_TAG: head_tag})
    # Refused above if it were this run's: an earlier run's metrics.json would make this
    # one look complete, and `fedlora registry publish OUT` would sign this run's adapter
    # with that run's provenance. Removed only now that every check has passed and the
    # MLflow run is open (a refused run loses nothing); this run writes its own last.
    stale = settings.out_dir / "metrics.json"
    if stale.is_file():
        log.warning("removing %s: it is not this run's (this run writes its own)", stale)
        stale.unlink()
    if outputs_only:
        log.info(
            "%s holds the last round (%d): writing the run's outputs only",
            store.directory,
            settings.rounds,
        )

    evaluator: Evaluator | None = None
    if eval_examples is not None:

        def evaluator(state: Mapping[str, np.ndarray]) -> tuple[float, float]:
            load_trainable_state(loaded.model, dict(state))
            result = evaluate(loaded, eval_examples, max_length=settings.max_length)
            return result.loss, result.accuracy

    best = BestRound()
    try:
        state, history, stopped = run_rounds(
            grid,
            settings,
            initial_state=initial,
            tracker=tracker,
            checkpoints=store,
            evaluator=evaluator,
            resume_from=resume_from,
            on_round=on_round,
            roster=roster,
            best=best,
        )
        last_round = int(history[-1]["round"]) if history else 0
        kept = chosen_round(
            rule=settings.keep_adapter, best_round=best.round, last_round=last_round
        )
        chosen_state = best.state if kept == best.round and best.round else state
        # OUT/adapter is the chosen one; the last and (with an eval-file) the best are kept
        # beside it under their own names.
        extra = {"adapter-last": state}
        if best.round:
            extra["adapter-best"] = best.state
        for name, tensors in extra.items():
            load_trainable_state(loaded.model, tensors)
            _publish_adapter(loaded, settings.out_dir, name=name)
        load_trainable_state(loaded.model, chosen_state)
        adapter_dir = _publish_adapter(loaded, settings.out_dir)
        metrics_path = settings.out_dir / "metrics.json"
        # `final` describes the adapter in OUT/adapter (what the registry publishes).
        final = next((row for row in history if row["round"] == kept), {})
        selection = {
            "rule": settings.keep_adapter if best.round else "last (no eval-file)",
            "round": kept,
            "best_round": best.round or None,
            "best_accuracy": best.accuracy if best.round else None,
            "last_round": last_round,
            "last_accuracy": history[-1].get("accuracy") if history else None,
        }
        privacy = privacy_summary(
            history=history,
            clip_norm=settings.client_dp.clip_norm if settings.client_dp else None,
            secagg=settings.secagg,
        )
        summary = {
            "rounds": history,
            "final": final,
            "adapter": selection,
            "headline": final.get("headline", ""),
            "mlflow_run_id": run_id,
            "privacy": privacy,
            "stopped": stopped,
        }
        metrics_text = json.dumps(summary, indent=2) + "\n"
        tracker.log_artifacts(adapter_dir, "adapter")
        for name in extra:
            tracker.log_artifacts(settings.out_dir / name, name)
        tracker.set_tags(
            {
                "fedlora.adapter.rule": str(selection["rule"]),
                "fedlora.adapter.round": str(kept),
                "fedlora.adapter.best_round": str(best.round or ""),
            }
        )
        tracker.client.log_text(run_id, metrics_text, metrics_path.name)
        tracker.finish()
        # Last: a metrics.json of this run at its checkpoint's round says every output
        # above is done (`_check_resume` refuses to redo them; a resume before it writes
        # them again).
        write_atomic(metrics_path, metrics_text.encode())
    except KeyboardInterrupt:  # stopped, not failed: `--resume` reopens it
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    published = None
    if settings.publish is not None:
        _unless_stopped(stop_requested, "after writing its outputs, before the publish")
        # The registry is the run's tracking store; the run is finished and its outputs are
        # in place, so a publish failure loses nothing: `fedlora registry publish OUT` redoes it.
        p = settings.publish
        published = publish(
            MlflowStore(uri),
            settings.out_dir,
            model=p.model_name,
            key=SigningKey(p.signing_key, p.passphrase),
            alias=p.alias,
        )
        log.info("published %s version %s as %r", p.model_name, published.version, p.alias)
    return TrainingResult(
        out_dir=settings.out_dir,
        adapter_dir=adapter_dir,
        metrics_path=metrics_path,
        run_id=run_id,
        tracking_uri=uri,
        history=history,
        published=published,
        outputs_only=outputs_only,
    )


def _unless_stopped(stop_requested: Callable[[], bool] | None, where: str) -> None:
    """Raises KeyboardInterrupt if ``stop_requested()`` says the run was told to stop."""
    if stop_requested is not None and stop_requested():
        raise KeyboardInterrupt(f"the run was stopped {where}")


def _publish_adapter(loaded, out_dir: Path, *, name: str = "adapter") -> Path:
    """Save the adapter beside its final place, then swap it in."""
    final = out_dir / name
    staging = out_dir / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    save_adapter(loaded, staging)
    swap_directory(staging, final)
    return final


app = ServerApp()

# Under ``flwr run`` the ServerApp sees no site's files, so the label set cannot come from
# them as it does in ``fedlora train``.
DEPLOYMENT_LABELS = (
    "labels is required under flwr run: the server never sees the sites' files; run "
    "`fedlora site check --data FILE --task sequence-classification` at each site, which "
    "prints the labels line, and pass the union of the sites' labels, e.g. --run-config "
    + run_config_arg(["a", "b"])
)


class OneLineRefusal(logging.Filter):
    """Log a run refused by fedlora as its one-line reason, not a traceback.

    Flower 1.41 logs any exception of a ServerApp with its traceback
    (flwr/superlink/runtime/run_serverapp.py), and ``flwr run --stream`` shows it, while
    the run is marked failed with the exception's text as its details. A `FedloraError`
    is a refusal whose message says everything (field, value, what to do), so its record
    on the ``flwr`` logger keeps only that line, marked FAILED.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, FedloraError):
            record.msg, record.args = "fedlora run FAILED: %s", (error,)
            record.exc_info = record.exc_text = None
        return True


def _log_to_stream() -> None:
    """Send fedlora's INFO lines to stderr, which ``flwr run --stream`` shows the user.

    Flower mirrors the ServerApp process's stdout and stderr to the run's log stream; a
    handler made here, after that, writes to the mirror. Library chatter stays quiet.
    """
    logger = logging.getLogger("server")
    if not any(getattr(h, "_fedlora_stream", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fedlora: %(message)s"))
        handler._fedlora_stream = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def redact_uri(uri: str) -> str:
    """A tracking URI without a password in it (``http://user:secret@host`` → ``user:***``)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}{port}"))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point under ``flwr run``: the run config comes from pyproject + overrides."""
    flwr_log = logging.getLogger("flwr")
    if not any(isinstance(f, OneLineRefusal) for f in flwr_log.filters):
        flwr_log.addFilter(OneLineRefusal())
    # Flower prints its records with its own handler; opacus gives the root logger a second
    # one when it is imported (logging.basicConfig), so Flower's lines would show twice.
    flwr_log.propagate = False
    _log_to_stream()
    config = dict(context.run_config)
    values = read_config(config)
    if values["task"] == "sequence-classification" and not parse_label_set(values["labels"]):
        raise ConfigError(DEPLOYMENT_LABELS)
    settings = RunSettings.from_config(config)
    result = run_training(
        grid, settings, on_round=lambda record: log.info(record.summary(settings.rounds))
    )
    log.info("adapter: %s", result.adapter_dir)
    log.info("metrics: %s", result.metrics_path)
    log.info("MLflow run %s at %s", result.run_id, redact_uri(result.tracking_uri))
