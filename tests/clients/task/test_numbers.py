from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clients.task.numbers import finite_number


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
