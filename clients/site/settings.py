"""Site settings: the SuperNode's node config parsed once into a validated dataclass.

A site admin starts ``flower-supernode --node-config "data-path='/data/site.jsonl'
site-id='hospital-a'"``; the data path is the site's own and never comes from the server.
In local simulation the node config is looked up by partition id in `SIM_SITES_ENV`.

Everything that bounds the site's privacy is here, in the admin's hands, never in the
run config the server sends: the budget (``max-epsilon``), the δ every (ε, δ) of the
site is stated at (``delta``; a round plan asking for another δ is refused), and the
ledger's place (``state-dir``). The accountant is fixed in the site's code (RDP).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.task.choices import SIM_SITES_ENV
from clients.task.errors import ConfigError
from clients.task.numbers import finite_number
from strategies.protocol import SITE_ID_RULE, valid_site_id

# key: help
KEYS = {
    "data-path": "the site's private JSONL/CSV file (required)",
    "site-id": "name of the site in logs and metrics (default: the file's stem)",
    "eval-fraction": "share of local rows held out for federated evaluation (default 0.1)",
    "base-model": "local copy of the base model; its digest must match the run's",
    "device": "auto, cpu or cuda (default auto)",
    "state-dir": "the site's own state (privacy ledger); required with max-epsilon",
    "max-epsilon": "the site's total sample-level ε budget; refuses runs without DP-SGD",
    "delta": "δ of the site's (ε, δ); refuses a plan with another site-dp.delta (default 1e-5)",
    "worker-socket": "the site's warm worker (fedlora site worker --socket); default: none",
    "head-statistics": "false: refuse a run's head.init=lda query (sums over the site's rows "
    "of the head's input); the site then sends only adapter updates (default true)",
}
DEFAULT_DELTA = 1e-5
FLOWER_KEYS = ("partition-id", "num-partitions")  # set by Flower's simulation engine
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class SiteSettings:
    data_path: Path
    site_id: str
    eval_fraction: float = 0.1
    base_model: str | None = None
    device: str = "auto"
    state_dir: Path | None = None
    max_epsilon: float | None = None
    delta: float = DEFAULT_DELTA
    worker_socket: Path | None = None
    head_statistics: bool = True

    def __post_init__(self) -> None:
        if not valid_site_id(self.site_id):
            # Checked here too, so a site admin learns it at start, not from the server.
            raise ConfigError(
                f"site-id={self.site_id[:80]!r} (the data file's stem unless set) must be "
                f"{SITE_ID_RULE}; set site-id in the node config"
            )
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta={self.delta!r} must be in (0, 1)")
        if self.max_epsilon is not None:
            if not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
                raise ConfigError(f"max-epsilon={self.max_epsilon!r} must be > 0")
            if self.state_dir is None:
                raise ConfigError("max-epsilon needs state-dir (where the ledger is kept)")
        # At most half held out: an honest site then never evaluates on more rows than it
        # trains on, which is the bound the server holds evaluation counts to.
        if not 0.0 <= self.eval_fraction <= 0.5:
            raise ConfigError(f"eval-fraction={self.eval_fraction!r} must be in [0, 0.5]")
        if self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r} must be one of {', '.join(DEVICES)}")

    @property
    def torch_device(self) -> str | None:
        return None if self.device == "auto" else self.device

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteSettings:
        """Parse a SuperNode node config (or the simulated one for its partition).

        Raises:
            ConfigError: For a missing data path, an unknown key or a bad value.
        """
        config = dict(node_config)
        if "data-path" not in config and "partition-id" in config:
            config = _simulated(int(config["partition-id"]))
        unknown = sorted(set(config) - set(KEYS) - set(FLOWER_KEYS))
        if unknown:
            raise ConfigError(f"unknown node config key(s) {unknown}; known: {sorted(KEYS)}")
        data = _text(config, "data-path")
        if not data:
            raise ConfigError("node config has no data-path (the site's data file)")
        path = Path(data).expanduser()
        max_epsilon = config.get("max-epsilon")
        state_dir = _text(config, "state-dir")
        worker = _text(config, "worker-socket")
        share = config.get("head-statistics", True)
        if not isinstance(share, bool):
            raise ConfigError(f"head-statistics={share!r} must be true or false")
        return cls(
            data_path=path,
            site_id=_text(config, "site-id", numbers=True) or path.stem,
            eval_fraction=_number("eval-fraction", config.get("eval-fraction", 0.1)),
            base_model=_text(config, "base-model") or None,
            device=_text(config, "device") if "device" in config else "auto",
            state_dir=Path(state_dir).expanduser() if state_dir else None,
            max_epsilon=_number("max-epsilon", max_epsilon) if max_epsilon is not None else None,
            delta=_number("delta", config.get("delta", DEFAULT_DELTA)),
            worker_socket=Path(worker).expanduser() if worker else None,
            head_statistics=share,
        )


def _text(config: Mapping[str, Any], key: str, *, numbers: bool = False) -> str:
    """A node config path or name; empty when absent. The TOML of ``--node-config`` reads
    ``state-dir=true`` as a bool and ``base-model=1.5`` as a float, which as text would
    name a directory ``True`` or a base ``1.5`` nobody meant. With ``numbers``, an integer
    is its decimal text (``site-id=3`` is site ``3``, as it always was).

    Raises:
        ConfigError: Naming the key, unless the value is a string.
    """
    value = config.get(key, "")
    if numbers and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ConfigError(
            f"{key}={value!r} must be a string ({type(value).__name__} given); quote it: "
            f"{key}='...'"
        )
    return value


def _number(key: str, value: object) -> float:
    """A node config number; the TOML of ``--node-config`` reads ``1000…0`` as an int of
    any size and ``1e400`` as inf, neither of which a float check can hold.

    Raises:
        ConfigError: Naming the key, unless ``value`` is a finite int or float.
    """
    number = finite_number(value)
    if number is None:
        raise ConfigError(f"{key}={value!r} must be a finite number")
    return number


def _simulated(partition_id: int) -> dict[str, Any]:
    raw = os.environ.get(SIM_SITES_ENV)
    if not raw:
        raise ConfigError(
            f"simulated site {partition_id} has no node config: {SIM_SITES_ENV} is not set "
            "(run through `fedlora train`, or give each SuperNode --node-config data-path=...)"
        )
    sites = json.loads(raw)
    if not 0 <= partition_id < len(sites):
        raise ConfigError(f"partition-id={partition_id} has no entry in {SIM_SITES_ENV}")
    return dict(sites[partition_id])
