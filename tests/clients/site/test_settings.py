"""The site's node config, as a careless or hostile site admin writes it."""

from __future__ import annotations

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
