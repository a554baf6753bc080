"""Bit packing of unsigned integer codes into bytes (real low-bit storage).

Codes are packed along the last axis into ``uint8`` words, little-endian, first code in the
lowest bits. Every width uses whole bytes, so packed rows stay byte aligned:

    bits  codes per unit  unit        bits / weight
    1     8               1 byte      1   (sign bit-planes; bit j = code j)
    8     1               1 byte      8
    4     2               1 byte      4   (low nibble = first code)
    2     4               1 byte      2
    3     8               3 bytes     3   (24-bit little-endian word, code j at bits 3j..3j+2)

A row of ``n`` codes takes ``ceil(n / codes_per_unit) * unit_bytes`` bytes; the last unit is
zero-padded and ``unpack`` needs ``n`` to drop the padding. The round trip is exact for codes
in ``[0, 2**bits - 1]``. Both are jitted (bits and n static): called outside a jit, one
program per shape runs instead of a dozen single-op dispatches; inside one they inline.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, UInt8

# bits -> (codes per unit, bytes per unit)
_UNITS = {1: (8, 1), 2: (4, 1), 3: (8, 3), 4: (2, 1), 8: (1, 1)}


def _unit(bits: int) -> tuple[int, int]:
    if bits not in _UNITS:
        raise ValueError(f"bits={bits!r} cannot be packed; use one of {sorted(_UNITS)}")
    return _UNITS[bits]


def packed_length(n: int, bits: int) -> int:
    """Bytes that a row of `n` codes takes."""
    k, nbytes = _unit(bits)
    return -(-n // k) * nbytes


@functools.partial(jax.jit, static_argnames=("bits",))
def pack(codes: Int[Array, "... n"], bits: int) -> UInt8[Array, "... m"]:
    """Pack codes in [0, 2**bits) along the last axis into uint8 (layout in module doc)."""
    k, nbytes = _unit(bits)
    codes = jnp.asarray(codes)
    n = codes.shape[-1]
    pad = (-n) % k
    c = codes.astype(jnp.uint32) & jnp.uint32(2 ** bits - 1)
    if pad:
        c = jnp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, pad)])
    c = c.reshape(*c.shape[:-1], (n + pad) // k, k)
    shifts = jnp.arange(k, dtype=jnp.uint32) * jnp.uint32(bits)
    word = jnp.sum(c << shifts, axis=-1, dtype=jnp.uint32)  # disjoint bits: sum == or
    byte_shifts = jnp.arange(nbytes, dtype=jnp.uint32) * jnp.uint32(8)
    out = (word[..., None] >> byte_shifts) & jnp.uint32(0xFF)
    return out.astype(jnp.uint8).reshape(*codes.shape[:-1], ((n + pad) // k) * nbytes)


@functools.partial(jax.jit, static_argnames=("bits", "n"))
def unpack(packed: UInt8[Array, "... m"], bits: int, n: int) -> UInt8[Array, "... n"]:
    """Inverse of `pack`: the first `n` codes of each row, as uint8."""
    k, nbytes = _unit(bits)
    packed = jnp.asarray(packed)
    m = packed.shape[-1]
    if m != packed_length(n, bits):
        raise ValueError(f"unpack: a row of {n} {bits}-bit codes takes "
                         f"{packed_length(n, bits)} bytes, got {m}")
    b = packed.astype(jnp.uint32).reshape(*packed.shape[:-1], m // nbytes, nbytes)
    byte_shifts = jnp.arange(nbytes, dtype=jnp.uint32) * jnp.uint32(8)
    word = jnp.sum(b << byte_shifts, axis=-1, dtype=jnp.uint32)
    shifts = jnp.arange(k, dtype=jnp.uint32) * jnp.uint32(bits)
    codes = (word[..., None] >> shifts) & jnp.uint32(2 ** bits - 1)
    codes = codes.reshape(*packed.shape[:-1], (m // nbytes) * k)[..., :n]
    return codes.astype(jnp.uint8)
