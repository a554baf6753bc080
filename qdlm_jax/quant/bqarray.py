"""`BinaryPlanesArray`: one pytree type for a packed sum-of-binary-planes weight (DAQ).

Storage (paper orientation ``[out, in]``; the input axis cut into G blocks of `block`
columns; block b holds K_b planes, S = sum_b K_b "slots" in block order):

    signs       uint8 [S, out, ceil(block / 8)]  sign bit-planes packed along the block's
                                                 columns (bit = 1 means +1; packing.py, 1 bit)
    row         fp16  [S, out]                   row scale of each slot
    col         fp16  [S, block]                 column scale of each slot
    slot_block  int32 [S]                        block of each slot
    static: block, shape (logical), orientation

    w_hat[o, b * block + j] = sum_{s: slot_block[s] = b} row[s, o] * B_s[o, j] * col[s, j]

`orientation` as `QuantizedArray`: ``"in_out"`` (default) stands for a model kernel
``[in, out]``; `dequantize()` returns the logical layout. `bits_per_weight` counts
everything stored (signs, scales, the slot map) per logical weight.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdlm_jax.quant import packing
from qdlm_jax.quant.array_like import OrientedMatrix


@flax.struct.dataclass
class BinaryPlanesArray(OrientedMatrix):
    """A packed sum of binary planes with row and column scales (layout in the docstring)."""

    signs: jax.Array
    row: jax.Array
    col: jax.Array
    slot_block: jax.Array
    block: int = flax.struct.field(pytree_node=False, default=128)
    shape: tuple[int, int] = flax.struct.field(pytree_node=False, default=(0, 0))
    orientation: str = flax.struct.field(pytree_node=False, default="in_out")

    @classmethod
    def from_planes(cls, signs, row, col, slot_block, *, orientation: str = "in_out",
                    scale_dtype=jnp.float16) -> "BinaryPlanesArray":
        """From +-1 planes [S, out, block] (any real array; >= 0 counts as +1), scales
        row [S, out] and col [S, block], and each slot's block [S]."""
        signs = jnp.asarray(signs)
        s, out, block = signs.shape
        slot_block = np.asarray(slot_block, np.int32)
        if slot_block.shape != (s,) or np.any(np.diff(slot_block) < 0):
            raise ValueError("BinaryPlanesArray: slot_block must list each slot's block in "
                             "block order")
        n_in = (int(slot_block.max()) + 1) * block if s else 0
        if row.shape != (s, out) or col.shape != (s, block):
            raise ValueError(f"BinaryPlanesArray: row {row.shape} / col {col.shape} do not "
                             f"match signs {signs.shape}")
        if orientation not in ("in_out", "out_in"):
            raise ValueError(f"BinaryPlanesArray: orientation={orientation!r}")
        bits = (signs >= 0).astype(jnp.int32)
        shape = (n_in, out) if orientation == "in_out" else (out, n_in)
        return cls(signs=packing.pack(bits, 1), row=jnp.asarray(row).astype(scale_dtype),
                   col=jnp.asarray(col).astype(scale_dtype),
                   slot_block=jnp.asarray(slot_block), block=block, shape=shape,
                   orientation=orientation)

    @property
    def dtype(self):
        return self.row.dtype

    @property
    def n_blocks(self) -> int:
        return self.storage_shape[1] // self.block

    @property
    def n_slots(self) -> int:
        return self.row.shape[0]

    @property
    def mean_planes(self) -> float:
        return self.n_slots / self.n_blocks

    @property
    def nbytes(self) -> int:
        return int(sum(x.size * x.dtype.itemsize
                       for x in (self.signs, self.row, self.col, self.slot_block)))

    @property
    def bits_per_weight(self) -> float:
        out, n_in = self.storage_shape
        return 8.0 * self.nbytes / (out * n_in)

    def planes(self) -> jax.Array:
        """+-1 planes, float32 [S, out, block]."""
        b = packing.unpack(self.signs, 1, self.block)
        return jnp.where(b > 0, 1.0, -1.0).astype(jnp.float32)

    def dequantize_storage(self, dtype=None) -> jax.Array:
        """w_hat [out, in] (fp32 sums, cast to `dtype`, default the scale dtype)."""
        return _dequantize_storage(self, jnp.dtype(dtype or self.dtype))

    def dequantize(self, dtype=None) -> jax.Array:
        w = self.dequantize_storage(dtype)
        return w.T if self.orientation == "in_out" else w


@functools.partial(jax.jit, static_argnums=1)
def _dequantize_storage(q: BinaryPlanesArray, dtype) -> jax.Array:
    slots = (q.row.astype(jnp.float32)[:, :, None] * q.planes()
             * q.col.astype(jnp.float32)[:, None, :])  # [S, out, block]
    blocks = jax.ops.segment_sum(slots, q.slot_block, num_segments=q.n_blocks,
                                 indices_are_sorted=True)  # [G, out, block]
    out = q.storage_shape[0]
    return jnp.transpose(blocks, (1, 0, 2)).reshape(out, -1).astype(dtype)


nnx.register_data_type(BinaryPlanesArray)

__all__ = ["BinaryPlanesArray"]
