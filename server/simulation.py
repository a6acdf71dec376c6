"""Local simulation: every site on this machine, through Flower's Simulation Engine.

The ClientApp is named by its component reference, as pyproject.toml names it for
``flwr run``, so the server package never imports site code.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients.task.choices import SIM_SITES_ENV
from server.app import TrainingResult, run_training
from server.record import RoundRecord
from server.settings import RunSettings

CLIENT_APP = "clients.site.app:app"  # same reference as [tool.flwr.app.components]


@dataclass(frozen=True)
class SimSite:
    """A simulated site; ``node_config`` adds SuperNode node-config keys (e.g. max-epsilon).

    Without a ``state-dir`` a simulated site keeps its state (the privacy ledger) in
    ``OUT/site-state/SITE``.
    """

    site_id: str
    data_path: Path
    node_config: Mapping[str, Any] = field(default_factory=dict)


class _HideRunSimulationDeprecation(logging.Filter):
    """Flower 1.41 marks `run_simulation` deprecated in favour of `flwr run`.

    fedlora keeps it for ``fedlora train`` because it runs the ServerApp in this process,
    which gives the progress bar and typed errors; ``flwr run .`` works as well (README).
    The warning would only confuse users of ``fedlora train``, so it is hidden here.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def load_component(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def simulate(
    settings: RunSettings,
    sites: Sequence[SimSite],
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    cpus_per_site: float = 1.0,
    client_app: str = CLIENT_APP,
    verbose: bool = False,
) -> TrainingResult:
    """Run a training run with one simulated SuperNode per site.

    With ``verbose``, the sites' own output (Ray actors' stdout and stderr) is forwarded
    to this process and Flower logs at DEBUG; otherwise a site's failure reaches the run
    only as its error reply, recorded by the round loop.

    Args:
        client_app: The ClientApp's component reference (tests and benchmarks put
            hostile sites in with one that wraps fedlora's).

    Raises:
        FedloraError: Whatever the run raised (bad config, failed round, ...).
    """
    from flwr.simulation import run_simulation

    flwr_logger = logging.getLogger("flwr")
    if not any(isinstance(f, _HideRunSimulationDeprecation) for f in flwr_logger.filters):
        flwr_logger.addFilter(_HideRunSimulationDeprecation())

    # Ray's worker processes inherit the environment: keep library deprecation noise out
    # of the user's terminal (fedlora's own errors are logged, not warned).
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    os.environ[SIM_SITES_ENV] = json.dumps(
        [
            {
                "data-path": str(s.data_path.resolve()),
                "site-id": s.site_id,
                "state-dir": str((settings.out_dir / "site-state" / s.site_id).resolve()),
                **s.node_config,
            }
            for s in sites
        ]
    )
    outcome: dict[str, object] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            outcome["result"] = run_training(grid, settings, on_round=on_round)
        except BaseException as exc:  # re-raised in the caller's thread below
            outcome["error"] = exc

    run_simulation(
        server_app=server_app,
        client_app=load_component(client_app),
        num_supernodes=len(sites),
        backend_config={
            "client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
            "init_args": {"logging_level": logging.ERROR, "log_to_driver": verbose},
        },
        verbose_logging=verbose,
    )
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    if "result" not in outcome:
        raise RuntimeError("the simulation ended without a result (see the Flower log above)")
    return outcome["result"]  # type: ignore[return-value]
