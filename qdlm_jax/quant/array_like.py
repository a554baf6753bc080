"""`PackedMatrix`: the array-like surface every quantized 2-D weight type shares;
`AffineCodes`: what the types on a scale / zero-point grid add to it; `StackedExperts`: the
surface of a MoE layer's experts packed as E stacked 2-D kernels.

A quantized weight (`QuantizedArray`, `BinaryPlanesArray`, `ActKernel`) sits where a float
kernel [in, out] would, inside an `nnx.Param`. Flax and the model read it only as a whole
(`param[...]`) and ask for its rank; anything else (slicing, arithmetic) would silently
compute on packed codes, so it is refused. Subclasses give `shape` and `dtype`.
"""

from __future__ import annotations


class PackedMatrix:
    """Mixin for the quantized weight types (plain data; their ops live in `kernels/`)."""

    @property
    def ndim(self) -> int:
        return 2

    def __getitem__(self, key):
        if key is Ellipsis:  # nnx.Param(value)[...] reads the whole value
            return self
        raise TypeError(f"{type(self).__name__} only supports [...] indexing; dequantize() "
                        "first")


class OrientedMatrix(PackedMatrix):
    """A packed matrix stored [out, in] whatever its logical orientation (`orientation`
    "in_out": a kernel [in, out] as the model multiplies it)."""

    @property
    def storage_shape(self) -> tuple[int, int]:
        """(out, in) of the stored values."""
        a, b = self.shape
        return (b, a) if self.orientation == "in_out" else (a, b)


class AffineCodes:
    """Mixin for packed codes on an affine grid: leaves `scale` and `zero` (None when
    symmetric); every leaf is stored data."""

    @property
    def dtype(self):
        return self.scale.dtype

    @property
    def sym(self) -> bool:
        return self.zero is None

    @property
    def nbytes(self) -> int:
        """Bytes actually stored (every leaf: packed codes, scales, zero points, ...)."""
        import jax

        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self)))


class StackedExperts(PackedMatrix):
    """Mixin for the experts of one MoE layer held as one pytree: E packed kernels [in, out]
    stacked along a leading axis (`shape` (E, in, out)). Subclasses give `per_expert()`: the
    2-D packed type whose leaves carry the expert axis."""

    @property
    def ndim(self) -> int:
        return 3

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    def per_expert(self):
        raise NotImplementedError

    def expert(self, e: int):
        """Expert `e` as its 2-D packed type, standing for its kernel [in, out]."""
        import jax

        return jax.tree.map(lambda a: a[e], self.per_expert())

    def dequantize(self, dtype=None):
        """w_hat [E, in, out] in `dtype` (default: the scale dtype)."""
        import jax
        import jax.numpy as jnp

        dtype = jnp.dtype(dtype or self.dtype)
        return jax.vmap(lambda q: q.dequantize(dtype))(self.per_expert())
