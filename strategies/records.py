"""Conversion between adapter states ({name: ndarray}) and Flower ArrayRecords."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack tensors into an ArrayRecord (numpy .npy serialization, no pickle)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord; Flower loads each array with allow_pickle=False."""
    return {name: array.numpy() for name, array in record.items()}
