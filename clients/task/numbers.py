"""Reading a number out of a value of unknown type (a JSON or TOML field, a record)."""

from __future__ import annotations

import math


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
