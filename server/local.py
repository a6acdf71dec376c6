"""``fedlora federation local``: rehearse a deployment with real Flower processes on loopback.

One ``flower-superlink`` and one ``flower-supernode`` per site file, each a separate OS
process on 127.0.0.1, set up as ``fedlora federation init``/``enroll`` would set them up
across machines: TLS on every API, SuperNode authentication with one registered key per
site, and the run's roster (``--insecure`` drops all three, for a trusted rehearsal). Each
site gets a warm worker (clients/site/worker.py) unless ``workers=False``. The app is
submitted with ``flwr run --stream``; its lines are passed to ``on_line`` as they come.
The run writes ``OUT/adapter``, ``OUT/metrics.json`` and its MLflow run as ``fedlora
train`` does, and every process started here is stopped when it ends, fails or is
interrupted (the harness's process groups, server/harness/process.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.task.errors import FedloraError
from server.federation import check_site_id
from server.harness.flower import LocalFederation, flwr_run, run_id_of
from server.tracking import resolve_tracking_uri
from server.train import checked_run

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app: this repository's root


class LocalRunFailed(FedloraError):
    """The rehearsal's run did not complete (the message holds the run's last lines)."""


@dataclass(frozen=True)
class LocalResult:
    out_dir: Path
    adapter_dir: Path
    metrics_path: Path
    run_id: str
    tracking_uri: str
    history: list[dict[str, Any]]
    flower_run_id: int
    secure: bool


def run_local(
    *,
    sites_dir: Path,
    rounds: int,
    out: Path,
    insecure: bool = False,
    overrides: dict[str, Any] | None = None,
    workers: bool = True,
    worker_pool: int | None = None,
    on_line: Callable[[str], None] | None = None,
    timeout: float = 3600.0,
    startup_timeout: float = 300.0,
) -> LocalResult:
    """Check the sites and the run config, start the federation, run, stop everything.

    Raises:
        FedloraError: For a bad site file or run config (before any process starts), a
            federation that does not start, or a run that does not complete.
    """
    out = out.resolve()  # the ServerApp runs in another working directory
    sites, config, settings = checked_run(
        sites_dir=sites_dir,
        rounds=rounds,
        out=out,
        eval_file=None,
        task=None,
        overrides=overrides or {},
        resume=False,
    )
    sites = [p.resolve() for p in sites]
    if not insecure:  # each site is enrolled under its id, by enrolment's rule
        for path in sites:
            check_site_id(path.stem)
    config["tracking-uri"] = resolve_tracking_uri(settings.tracking_uri, out)
    out.mkdir(parents=True, exist_ok=True)
    nodes = [
        {
            "data-path": str(path),
            "site-id": path.stem,
            "state-dir": str(out / "site-state" / path.stem),
        }
        for path in sites
    ]
    federation = LocalFederation(
        out / "federation",
        nodes,
        # Every site shares this machine's cores: one thread each avoids oversubscription.
        site_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        startup_timeout=startup_timeout,
        secure=not insecure,
        workers=workers,
        worker_pool=worker_pool,
    )
    with federation:
        if federation.roster_path is not None:
            config["roster"] = str(federation.roster_path)
        result = flwr_run(
            APP_DIR,
            federation,
            config,
            timeout=timeout,
            log_path=out / "federation" / "logs" / "flwr-run.log",
            on_line=on_line,
        )
        flower_run = run_id_of(result)
        status = federation.run_info(flower_run).get("status")
        if status != "finished:completed" or not (out / "metrics.json").is_file():
            tail = "\n".join(result.stdout.splitlines()[-30:])
            raise LocalRunFailed(
                f"run {flower_run} ended {status!r}; logs in {out / 'federation' / 'logs'}\n{tail}"
            )
    metrics = json.loads((out / "metrics.json").read_text())
    return LocalResult(
        out_dir=out,
        adapter_dir=out / "adapter",
        metrics_path=out / "metrics.json",
        run_id=str(metrics["mlflow_run_id"]),
        tracking_uri=str(config["tracking-uri"]),
        history=list(metrics["rounds"]),
        flower_run_id=flower_run,
        secure=not insecure,
    )


def progress_line(line: str) -> str | None:
    """What of ``flwr run --stream``'s output a user wants to see: fedlora's lines, problems."""
    if "fedlora: " in line:
        return line[line.index("fedlora: ") + len("fedlora: ") :]
    if any(word in line for word in ("ERROR", "Traceback", "Error:", "Successfully started run")):
        return line
    return None
