"""The run-config keys: defaults filled in, values typed, unknown keys refused with a hint."""

from __future__ import annotations

import pytest

from clients.task.errors import ConfigError
from server.run_config import KEYS, coerce, read_config, split_list


def test_read_config_fills_every_default_and_types_the_given_values() -> None:
    values = read_config({"learning-rate": 1, "labels": "a,b"})
    assert set(values) == set(KEYS)
    assert values["learning-rate"] == 1.0 and isinstance(values["learning-rate"], float)
    assert values["labels"] == "a,b"
    assert values["num-server-rounds"] == KEYS["num-server-rounds"][1]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("batch-size", 16.0, "batch-size=16.0 must be an integer"),
        ("batch-size", True, "batch-size=True must be an integer"),
        ("resume", 1, "resume=1 must be true or false"),
        ("task", 3, "task=3 must be a string"),
    ],
)
def test_coerce_names_the_key_and_value(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        coerce(key, value)


def test_an_unknown_key_without_a_close_one_gets_no_hint() -> None:
    with pytest.raises(ConfigError, match=r"^unknown config key 'zzz'$"):
        read_config({"zzz": 1})


def test_split_list_drops_blanks() -> None:
    assert split_list(" a, b,,c ,") == ("a", "b", "c")
    assert split_list("") == ()


def test_an_integer_past_float_range_is_a_config_error_naming_the_key() -> None:
    # `--set update.max-norm=1000…0` (TOML integers have no size limit in tomllib) ended
    # in "error: OverflowError: int too large to convert to float".
    from server.run_config import parse_overrides

    with pytest.raises(ConfigError, match=r"update\.max-norm: an integer of 401 digits"):
        read_config(parse_overrides(["update.max-norm=1" + "0" * 400]))
    # Past Python's 4,300-digit limit of str(int) the message itself raised ValueError.
    from server.run_config import coerce

    with pytest.raises(ConfigError, match=r"update\.max-norm: an integer of 5001 digits"):
        coerce("update.max-norm", 10**5000)


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**400], ids=["2^63", "-2^63-1", "10^400"])
def test_an_integer_past_flowers_range_is_a_config_error_naming_the_key(value: int) -> None:
    # Flower carries a config integer as a signed 64-bit one. Past it,
    # `--set secagg.enabled=true --set min-available-clients=1000…0` ended in
    # "OverflowError: int too large to convert to float" (sampling's fraction × count),
    # and any other integer key in Flower's "Value out of range" when the run was sent.
    with pytest.raises(ConfigError, match=r"^min-available-clients: an integer of \d+ digits"):
        coerce("min-available-clients", value)
    assert coerce("seed", 2**63 - 1) == 2**63 - 1
    assert coerce("seed", -(2**63)) == -(2**63)


def test_a_set_value_past_pythons_digit_limit_is_a_config_error_naming_the_key() -> None:
    # tomllib raised ValueError ("Exceeds the limit (4300 digits) ...") out of --set.
    from server.run_config import parse_overrides

    with pytest.raises(ConfigError, match=r"^--set seed: a number of more than 4300 digits"):
        parse_overrides(["seed=1" + "0" * 5000])
    with pytest.raises(ConfigError, match=r"^--set labels: arrays nested too deep to read"):
        parse_overrides(["labels=" + "[" * 100_000])  # tomllib raised RecursionError


def test_a_key_set_twice_with_different_values_is_refused() -> None:
    # `--set lora.r=4 ... --set lora.r=16` (a line grown in the shell's history) ran with
    # 16 alone, and nothing said the 4 was dropped.
    from server.run_config import parse_overrides

    with pytest.raises(ConfigError, match=r"^--set lora\.r is given twice: 4, then 16$"):
        parse_overrides(["lora.r=4", "seed=1", " lora.r = 16"])
    assert parse_overrides(["lora.r=4", "lora.r=4"]) == {"lora.r": 4}
