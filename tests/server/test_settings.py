"""Run config parsing: every bad key or value is refused with its name and value."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from clients.task.errors import ConfigError
from server.settings import KEYS, RunSettings, parse_overrides
from strategies.fedavg import FedAvg, FedProx

OK = {"labels": "a,b"}


def test_defaults_match_pyproject() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    flat: dict = {}
    for key, value in pyproject["tool"]["flwr"]["app"]["config"].items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    assert flat == {k: default for k, (_, default, _) in KEYS.items()}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"num-rounds": 3}, "unknown config key 'num-rounds'; did you mean 'num-server-rounds'"),
        ({"lora.rank": 4}, "did you mean 'lora.r'"),
        ({"num-server-rounds": "3"}, "num-server-rounds='3' must be an integer"),
        ({"num-server-rounds": 0}, "num-server-rounds=0 must be >= 1"),
        ({"learning-rate": True}, "learning-rate=True must be a number"),
        ({"resume": "yes"}, "resume='yes' must be true or false"),
        ({"fraction-train": 1.5}, "fraction-train=1.5 must be in"),
        ({"min-fit-clients": 3, "min-available-clients": 2}, "min-available-clients=2 must be >="),
        ({"on-round-failure": "retry"}, "on-round-failure='retry'"),
        ({"eval-file": "/no/such/file.jsonl"}, "eval-file='/no/such/file.jsonl' does not exist"),
        ({"server.momentum": 1.0}, "server.momentum=1.0 must be in [0, 1"),
        ({"server.learning-rate": 0}, "server.learning-rate=0.0 must be > 0"),
        ({"server.optimizer": "yogi"}, "server.optimizer='yogi' must be one of sgd, adam"),
        ({"aggregation": "mean"}, "aggregation='mean'"),
        ({"labels": ""}, "needs at least 2 labels"),
    ],
)
def test_bad_config_names_the_key(config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        RunSettings.from_config({**OK, **config})


def test_overrides_are_typed_like_toml() -> None:
    assert parse_overrides(["a=3", "b=0.5", "c=true", 'd="x"', "e=plain words"]) == {
        "a": 3,
        "b": 0.5,
        "c": True,
        "d": "x",
        "e": "plain words",
    }
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_overrides(["novalue"])


def test_strategy_follows_proximal_mu() -> None:
    assert type(RunSettings.from_config(OK).strategy()) is FedAvg
    prox = RunSettings.from_config({**OK, "proximal-mu": 0.1}).strategy()
    assert isinstance(prox, FedProx) and prox.proximal_mu == 0.1


def test_fingerprint_ignores_bookkeeping_only() -> None:
    a = RunSettings.from_config({**OK, "out-dir": "x", "round-timeout": 5.0})
    b = RunSettings.from_config({**OK, "out-dir": "y", "resume": True})
    c = RunSettings.from_config({**OK, "learning-rate": 0.1})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
