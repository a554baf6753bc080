"""Bit packing: exact round trip and the real storage size of every width."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax.quant import packing


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_is_exact(bits):
    lengths = [1, 5, 8, 13, 64, 129]
    rng = np.random.default_rng(bits)
    codes = {n: rng.integers(0, 2 ** bits, size=(3, 2, n)) for n in lengths}

    @jax.jit
    def round_trips(cs):
        packed = {n: packing.pack(c, bits) for n, c in cs.items()}
        return packed, {n: packing.unpack(p, bits, n) for n, p in packed.items()}

    packed, unpacked = round_trips({n: jnp.asarray(c) for n, c in codes.items()})
    for n in lengths:
        assert packed[n].dtype == jnp.uint8
        assert packed[n].shape == (3, 2, packing.packed_length(n, bits))
        np.testing.assert_array_equal(np.asarray(unpacked[n]), codes[n])


@pytest.mark.parametrize("bits, bytes_per_1024", [(2, 256), (3, 384), (4, 512), (8, 1024)])
def test_storage_is_bits_per_weight(bits, bytes_per_1024):
    assert packing.packed_length(1024, bits) == bytes_per_1024
    assert packing.pack(jnp.zeros((1, 1024), jnp.int32), bits).nbytes == bytes_per_1024


def test_layout_is_little_endian_first_code_lowest():
    assert packing.pack(jnp.array([1, 2]), 4).tolist() == [0x21]
    assert packing.pack(jnp.array([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    # 3-bit: 8 codes -> a 24-bit word, code j at bits 3j..3j+2, stored as 3 bytes LE.
    word = sum(c << (3 * j) for j, c in enumerate([7, 1, 2, 3, 4, 5, 6, 0]))
    assert packing.pack(jnp.array([7, 1, 2, 3, 4, 5, 6, 0]), 3).tolist() == [
        word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]


def test_under_jit_and_errors():
    codes = jnp.arange(40) % 8
    f = jax.jit(lambda c: packing.unpack(packing.pack(c, 3), 3, 40))
    np.testing.assert_array_equal(np.asarray(f(codes)), np.asarray(codes))
    with pytest.raises(ValueError, match="bits=5"):
        packing.pack(codes, 5)
    with pytest.raises(ValueError, match="takes 15 bytes"):
        packing.unpack(jnp.zeros((16,), jnp.uint8), 3, 40)
