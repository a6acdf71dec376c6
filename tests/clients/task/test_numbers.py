from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clients.task.errors import ConfigError
from clients.task.numbers import check_delta, finite_number, is_integer


@pytest.mark.parametrize(
    "value", [math.nan, math.inf, -math.inf, 10**400, -(10**400), True, "1.0", None, [1.0]]
)
def test_what_is_not_a_finite_number_is_none(value: object) -> None:
    assert finite_number(value) is None


@given(
    st.one_of(st.integers(-(2**1000), 2**1000), st.floats(allow_nan=False, allow_infinity=False))
)
def test_a_finite_int_or_float_is_that_float(value: int | float) -> None:
    assert finite_number(value) == float(value)


@pytest.mark.parametrize("value", [0, -3, 2**63, 10**400])
def test_an_int_is_an_integer(value: object) -> None:
    assert is_integer(value)


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None, math.nan])
def test_a_bool_float_or_string_is_not_an_integer(value: object) -> None:
    assert not is_integer(value)


@pytest.mark.parametrize("delta", [1e-5, 0.5, 1e-300])
def test_a_delta_inside_the_open_unit_interval_passes(delta: float) -> None:
    check_delta("dp.delta", delta)


@pytest.mark.parametrize("delta", [0, 0.0, 1, 1.0, -1e-5, math.nan, math.inf, True, "1e-5", None])
def test_a_delta_outside_the_open_unit_interval_is_refused_by_name(delta: object) -> None:
    with pytest.raises(ConfigError, match=r"^site-dp\.delta=.* must be in \(0, 1\)$"):
        check_delta("site-dp.delta", delta)
