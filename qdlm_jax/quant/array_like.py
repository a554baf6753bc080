"""`PackedMatrix`: the array-like surface every quantized 2-D weight type shares;
`AffineCodes`: what the types on a scale / zero-point grid add to it.

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
