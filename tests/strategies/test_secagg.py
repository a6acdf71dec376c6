"""SecAgg+ settings, the quantization bound and the cryptographic mask generator."""

from __future__ import annotations

import types

import numpy as np
import pytest

from clients.task.errors import ConfigError
from strategies.secagg import (
    SecAggSettings,
    aes_ctr_masks,
    compact_masked,
    expand_masked,
    mask_generator,
)


def test_error_bound_by_hand() -> None:
    # Arrange: c=1, Q=2**20 -> one level is 2**-19; weights 1 and 3 of max 4 -> scaled 0.25, 0.75.
    s = SecAggSettings(clipping_range=1.0, quantization_range=2**20, max_weight=4)
    # Act
    bound = s.error_bound([1.0, 3.0])
    # Assert: 2 levels / 1.0 + 2·c / (2·Q·0.25)
    assert bound == pytest.approx(2 * 2**-19 + 2 / (2 * 2**20 * 0.25))


def test_sites_that_cannot_run_the_protocol_are_named() -> None:
    s = SecAggSettings(num_shares=5, reconstruction_threshold=3, quantization_range=2**30)
    assert "< secagg.num-shares=5" in str(s.check_sites(4))
    assert "overflow" in str(s.check_sites(5))  # 2**32 / 2**30 - 1 = 3 sites at most
    assert SecAggSettings().check_sites(3) is None


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"num_shares": 2}, "secagg.num-shares=2"),
        ({"reconstruction_threshold": 1}, "secagg.reconstruction-threshold=1"),
        ({"clipping_range": 0.0}, "secagg.clipping-range=0.0"),
        ({"max_weight": 0}, "secagg.max-weight=0"),
        ({"prg": "mt"}, "secagg.prg='mt'"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        SecAggSettings(**kwargs)


def test_aes_ctr_masks_are_a_deterministic_uniform_stream() -> None:
    shapes = [(1,), (300, 200), ()]
    a = aes_ctr_masks(b"k" * 32, 2**32, shapes)
    assert [m.shape for m in a] == shapes and all(m.dtype == np.int64 for m in a)
    again = aes_ctr_masks(b"k" * 32, 2**32, shapes)
    assert all(np.array_equal(x, y) for x, y in zip(a, again, strict=True))
    other = aes_ctr_masks(b"j" * 32, 2**32, shapes)
    assert not np.array_equal(a[1], other[1])  # every key byte matters, not a 32-bit digest
    flat = a[1].ravel()
    assert flat.min() >= 0 and flat.max() < 2**32
    assert abs(flat.mean() / 2**32 - 0.5) < 0.01  # 60k uniform draws: sd of mean ~0.0012
    small = aes_ctr_masks(b"k" * 32, 2**16, shapes)
    assert np.array_equal(small[1], a[1] % 2**16)
    with pytest.raises(ValueError, match="power of two"):
        aes_ctr_masks(b"k", 1000, shapes)


def test_flowers_32_bit_seeding_collides_where_aes_ctr_does_not() -> None:
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    # Flower XORs the key down to 32 bits: keys differing by the same word twice collide.
    key_a, key_b = bytes(32), b"\x01\x00\x00\x00" * 2 + bytes(24)
    assert np.array_equal(
        pseudo_rand_gen(key_a, 2**32, [(8,)])[0], pseudo_rand_gen(key_b, 2**32, [(8,)])[0]
    )
    assert not np.array_equal(
        aes_ctr_masks(key_a, 2**32, [(8,)])[0], aes_ctr_masks(key_b, 2**32, [(8,)])[0]
    )


def test_mask_generator_swaps_and_restores() -> None:
    def original(*_: object) -> None:
        return None

    module = types.SimpleNamespace(pseudo_rand_gen=original)
    with mask_generator(module, "aes-ctr"):  # type: ignore[arg-type]
        assert module.pseudo_rand_gen is aes_ctr_masks
    assert module.pseudo_rand_gen is original
    with mask_generator(module, "flower"):  # type: ignore[arg-type]
        assert module.pseudo_rand_gen is original


def test_masked_vectors_travel_as_uint32_and_come_back_exact() -> None:
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes

    masked = [np.array([0, 1, 2**32 - 1], np.int64), np.arange(12, dtype=np.int64).reshape(3, 4)]
    blobs = [ndarray_to_bytes(a) for a in masked]
    compact = compact_masked(blobs)
    assert sum(map(len, compact)) < sum(map(len, blobs))
    back = [bytes_to_ndarray(b) for b in expand_masked(compact)]
    assert all(
        a.dtype == np.int64 and np.array_equal(a, b) for a, b in zip(masked, back, strict=True)
    )
    with pytest.raises(ValueError, match="not int64 in"):
        compact_masked([ndarray_to_bytes(np.array([-1], np.int64))])


def test_a_secure_mean_outside_the_clipping_range_is_refused() -> None:
    # Honest sites clip every coordinate to ±1 before masking, so their weighted mean
    # stays within ±1 (+ rounding); a site that adds to its masked vector (or to the
    # weight slot the server divides by) pushes the mean outside, or to NaN.
    settings = SecAggSettings(clipping_range=1.0)
    weights = [10.0, 20.0, 30.0]
    assert settings.check_mean({"w": np.array([1.0, -1.0, 0.3])}, weights) is None
    assert "outside ±secagg.clipping-range=1.0" in str(
        settings.check_mean({"w": np.array([0.2, -1.01])}, weights)
    )
    assert settings.check_mean({"w": np.array([np.nan])}, weights) is not None
