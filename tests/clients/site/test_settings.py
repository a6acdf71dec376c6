"""The site's node config, as a careless or hostile site admin writes it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clients.site.settings import SiteSettings
from clients.task.errors import ConfigError


def repr_short(value: object) -> str:
    return repr(value)[:12]


@pytest.mark.parametrize("key", ["max-epsilon", "delta", "eval-fraction"])
@pytest.mark.parametrize("value", [10**400, 1e400, True, "0.1", [0.1]], ids=repr_short)
def test_a_number_key_that_is_not_a_float_sized_number_is_refused_naming_it(
    key: str, value: object
) -> None:
    """``--node-config "max-epsilon=1000…0"`` reaches here as an int past float range."""
    config = {"data-path": "site.jsonl", "state-dir": "state", key: value}

    with pytest.raises(ConfigError, match=f"^{key}="):
        SiteSettings.from_node_config(config)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (key, value)
        for key in ("data-path", "site-id", "state-dir", "worker-socket", "base-model", "device")
        for value in (True, 1.5, 7, ["x"])
        if (key, value) != ("site-id", 7)  # an integer site id is its text: the next test
    ],
    ids=repr_short,
)
def test_a_path_or_name_key_that_is_not_a_string_is_refused_naming_it(
    key: str, value: object
) -> None:
    """``--node-config "state-dir=true"`` reaches here as a bool, not as the text 'true'."""
    config = {"data-path": "site.jsonl", key: value}

    with pytest.raises(ConfigError, match=f"^{key}={re.escape(repr(value))} must be a string"):
        SiteSettings.from_node_config(config)


def test_an_integer_site_id_is_its_decimal_text_as_before() -> None:
    # Flower reads --node-config "site-id=3" as the int 3; such SuperNodes ran as site '3'.
    config = {"data-path": "site.jsonl", "site-id": 3}
    assert SiteSettings.from_node_config(config).site_id == "3"


def test_path_and_name_keys_given_as_strings_are_taken_as_given() -> None:
    config = {"data-path": "site.jsonl", "site-id": "true", "state-dir": "True", "device": "cpu"}

    site = SiteSettings.from_node_config(config)

    assert (site.site_id, site.state_dir, site.device) == ("true", Path("True"), "cpu")
    assert SiteSettings.from_node_config({"data-path": "ward.csv"}).site_id == "ward"
