"""Reading a number out of a value of unknown type (a JSON or TOML field, a record)."""

from __future__ import annotations

import math

from clients.task.errors import ConfigError


def is_integer(value: object) -> bool:
    """Whether ``value`` is an ``int`` and not a ``bool`` (Python's bools are ints, and a
    JSON or TOML ``true`` must not pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_delta(setting: str, delta: object) -> None:
    """Refuse a DP δ outside the open interval (0, 1): NaN, 0, 1, a bool or a non-number.

    Raises:
        ConfigError: ``"{setting}={delta!r} must be in (0, 1)"``.
    """
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 < delta < 1:
        raise ConfigError(f"{setting}={delta!r} must be in (0, 1)")


def finite_number(value: object) -> float | None:
    """``value`` as a float if it is a finite int or float (a bool is not), else None.

    An integer too large for a float (``10**400``, which JSON and TOML readers return as
    an ``int``) is None rather than the OverflowError ``float()`` and ``math.isfinite``
    raise on it, so a caller's check fails closed with its own message.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None
