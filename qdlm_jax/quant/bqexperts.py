"""`BinaryPlanesExperts`: the routed experts of one MoE layer as DAQ binary planes, per expert.

A layer's experts are kernels ``[E, in, out]`` (`models/experts.py`). Each expert e is a
`BinaryPlanesArray` of its kernel (orientation "in_out", `bqarray.py`): its input axis cut
into blocks of `block` columns, block b holding K_{e,b} sign planes with a row and a column
scale each. ABMP moves planes between blocks but keeps the mean at exactly `bits` planes, so
every expert holds the same number of slots S = bits * G and the storage stacks:

    signs       uint8 [E, S, out, ceil(block / 8)]   sign bit-planes of w_e[out, in]
    row         fp16  [E, S, out]                    row scale of each slot
    col         fp16  [E, S, block]                  column scale of each slot
    slot_block  int32 [E, S]                         block of each slot (per expert)
    static: block, shape (E, in, out) (logical)

    w_hat[e, b * block + j, o] = sum_{s: slot_block[e, s] = b}
                                     row[e, s, o] * B_{e,s}[o, j] * col[e, s, j]

`expert(e)` is expert e's `BinaryPlanesArray`; dequantizing maps the 2-D operation over E.
`kernels/` registers `qexperts.experts_matmul` for the type (XLA path: each expert's w_hat
cast to x's dtype, then `models.experts.grouped_matmul` with fp32 accumulation), the
arithmetic of a float expert kernel holding w_hat.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdlm_jax.quant.array_like import StackedExperts
from qdlm_jax.quant.bqarray import BinaryPlanesArray


@flax.struct.dataclass
class BinaryPlanesExperts(StackedExperts):
    """DAQ binary planes of every expert of one layer (layout in the module docstring)."""

    signs: jax.Array
    row: jax.Array
    col: jax.Array
    slot_block: jax.Array
    block: int = flax.struct.field(pytree_node=False, default=128)
    shape: tuple[int, int, int] = flax.struct.field(pytree_node=False, default=(0, 0, 0))

    @classmethod
    def from_experts(cls, experts: list[BinaryPlanesArray]) -> "BinaryPlanesExperts":
        """Stacks per-expert `BinaryPlanesArray`s of kernels [in, out] ("in_out"), all of one
        shape, block and slot count."""
        if not experts:
            raise ValueError("BinaryPlanesExperts: no expert given")
        first = experts[0]
        for e, q in enumerate(experts):
            if q.orientation != "in_out" or q.shape != first.shape or q.block != first.block:
                raise ValueError(f"BinaryPlanesExperts: expert {e} is {q.shape} "
                                 f"{q.orientation} block {q.block}; expected {first.shape} "
                                 f"in_out block {first.block} like expert 0")
            if q.n_slots != first.n_slots:
                raise ValueError(f"BinaryPlanesExperts: expert {e} holds {q.n_slots} planes, "
                                 f"expert 0 {first.n_slots}; DAQ gives every expert the same "
                                 "mean (bits x blocks)")

        def stack(name):
            return jnp.stack([getattr(q, name) for q in experts])

        return cls(signs=stack("signs"), row=stack("row"), col=stack("col"),
                   slot_block=stack("slot_block"), block=first.block,
                   shape=(len(experts),) + tuple(first.shape))

    # ----- array-like (`StackedExperts`: ndim, num_experts, expert(e), dequantize) ----------

    @property
    def dtype(self):
        return self.row.dtype

    @property
    def mean_planes(self) -> float:
        """Planes per block, the same for every expert (DAQ's nominal bits)."""
        return self.row.shape[1] / (self.shape[1] // self.block)

    @property
    def nbytes(self) -> int:
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self)))

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / int(np.prod(self.shape))

    def per_expert(self) -> BinaryPlanesArray:
        """The experts as one `BinaryPlanesArray` whose leaves have a leading expert axis (for
        `jax.vmap`)."""
        return BinaryPlanesArray(signs=self.signs, row=self.row, col=self.col,
                                 slot_block=self.slot_block, block=self.block,
                                 shape=self.shape[1:], orientation="in_out")


# Module attributes and nnx.Param may hold it (like QuantizedExperts).
nnx.register_data_type(BinaryPlanesExperts)

__all__ = ["BinaryPlanesExperts"]
