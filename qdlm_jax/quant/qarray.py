"""`QuantizedArray`: one pytree type for a packed low-bit weight.

Storage (always the paper orientation ``[out, in]``, quantized along ``in``):

    packed  uint8 [out, packed_length(in, bits)]      codes, packed along `in` (packing.py)
    scale   float [out, groups]                       one per (output channel, group)
    zero    uint8 [out, packed_length(groups, bits)]  packed zero points; None if symmetric
                                                      (symmetric zero is 2**(bits-1))
    g_idx   int32 [in] or None                        group of each input column; None means
                                                      contiguous groups (j -> j // group_size)
    static: bits, group_size (resolved: the input width when per channel), shape (logical),
            orientation

    w_hat[o, j] = scale[o, g(j)] * (code[o, j] - zero[o, g(j)])

`orientation` says how the logical array relates to the storage: ``"in_out"`` (default) means
the array stands for a model kernel ``[in, out]`` (what `qdlm_jax.models.dllm` stores), so
`dequantize()` returns ``w_hat.T`` and `project(x, qarr)` computes ``x @ w_hat.T``;
``"out_in"`` means the logical array is ``[out, in]`` itself.

The matmul registered with `project` dequantizes in XLA and contracts the storage layout
directly (``einsum("...i,oi->...o")``), so no transposed copy is materialised.

qwix compatibility: `to_qwix()` / `from_qwix()` convert to and from
``qwix._src.core.qarray.QArray`` (qvalue unpacked and signed: ``qvalue = code - 2**(bits-1)``,
``zero_point = zero - 2**(bits-1)``, scale tiled along the logical input axis), so
``(qvalue - zero_point) * scale`` is the same ``w_hat``.
"""

from __future__ import annotations

import functools
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from qdlm_jax.quant import packing
from qdlm_jax.quant.array_like import AffineCodes, OrientedMatrix
from qdlm_jax.quant.quantizer_core import SUPPORTED_BITS, QuantSpec, resolve_group_size, rtn_codes

Orientation = Literal["in_out", "out_in"]
_ORIENTATIONS = ("in_out", "out_in")


@flax.struct.dataclass
class QuantizedArray(OrientedMatrix, AffineCodes):
    """A packed quantized 2-D weight (layout in the module docstring)."""

    packed: jax.Array
    scale: jax.Array
    zero: jax.Array | None = None
    g_idx: jax.Array | None = None
    bits: int = flax.struct.field(pytree_node=False, default=4)
    group_size: int = flax.struct.field(pytree_node=False, default=128)
    shape: tuple[int, int] = flax.struct.field(pytree_node=False, default=(0, 0))
    orientation: str = flax.struct.field(pytree_node=False, default="in_out")

    # ----- construction -------------------------------------------------------------------

    @classmethod
    def from_codes(cls, codes: Int[Array, "out in"], scale: Float[Array, "out groups"],
                   zero: Float[Array, "out groups"] | None, *, bits: int,
                   group_size: int, sym: bool, orientation: Orientation = "in_out",
                   g_idx: Int[Array, "in"] | None = None,
                   scale_dtype=None) -> "QuantizedArray":
        """Pack integer codes of ``w[out, in]`` with their grid.

        `zero` is ignored (may be None) when `sym`; symmetric codes must use the zero point
        2**(bits-1) (AutoGPTQ's symmetric grid). `g_idx` (act-order GPTQ without static
        groups) maps each input column to its group; scale/zero columns are indexed by it.
        """
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"QuantizedArray: bits={bits!r} is not supported; use one of "
                             f"{SUPPORTED_BITS}")
        if orientation not in _ORIENTATIONS:
            raise ValueError(f"QuantizedArray: orientation={orientation!r}; use one of "
                             f"{_ORIENTATIONS}")
        out, n_in = codes.shape
        gs = resolve_group_size(group_size, n_in)
        n_groups = n_in // gs
        if scale.shape != (out, n_groups):
            raise ValueError(f"QuantizedArray: scale has shape {scale.shape}, expected "
                             f"{(out, n_groups)} for codes {codes.shape} and group size {gs}")
        scale = scale.astype(scale_dtype) if scale_dtype is not None else scale
        zero_packed = None
        if not sym:
            if zero is None:
                raise ValueError("QuantizedArray: asymmetric (sym=False) needs zero points")
            zero_packed = packing.pack(jnp.round(zero).astype(jnp.int32), bits)
        if g_idx is not None:
            g_idx = jnp.asarray(g_idx, jnp.int32)
        shape = (n_in, out) if orientation == "in_out" else (out, n_in)
        return cls(packed=packing.pack(codes, bits), scale=scale, zero=zero_packed,
                   g_idx=g_idx, bits=bits, group_size=gs, shape=shape,
                   orientation=orientation)

    @classmethod
    def quantize(cls, w: Float[Array, "a b"], spec: QuantSpec, *,
                 orientation: Orientation = "in_out", scale_dtype=None) -> "QuantizedArray":
        """Round-to-nearest quantization of a logical 2-D array (a `[in, out]` kernel by
        default) on the AutoGPTQ grid of `spec`."""
        spec.check_width(w.shape[0] if orientation == "in_out" else w.shape[1])
        return _quantize_rtn(w, spec, orientation, jnp.dtype(scale_dtype or w.dtype))

    # ----- array-like ---------------------------------------------------------------------

    @property
    def n_groups(self) -> int:
        return self.storage_shape[1] // self.group_size

    def codes(self) -> jax.Array:
        """Unpacked codes, uint8 [out, in]."""
        return packing.unpack(self.packed, self.bits, self.storage_shape[1])

    def zeros(self) -> jax.Array:
        """Zero points as floats [out, groups] (2**(bits-1) everywhere if symmetric)."""
        if self.zero is None:
            return jnp.full(self.scale.shape, 2.0 ** (self.bits - 1), jnp.float32)
        return packing.unpack(self.zero, self.bits, self.scale.shape[1]).astype(jnp.float32)

    def _column_params(self):
        """Scale and zero point expanded to every stored element, [out, in] fp32."""
        n_in = self.storage_shape[1]
        scale, zero = self.scale.astype(jnp.float32), self.zeros()
        if self.g_idx is not None:
            return scale[:, self.g_idx], zero[:, self.g_idx]
        reps = self.group_size
        return (jnp.repeat(scale, reps, axis=1, total_repeat_length=n_in),
                jnp.repeat(zero, reps, axis=1, total_repeat_length=n_in))

    def dequantize_storage(self, dtype=None) -> jax.Array:
        """w_hat in the storage layout [out, in]: scale * (code - zero), fp32, cast."""
        return _dequantize_storage(self, jnp.dtype(dtype or self.dtype))

    def dequantize(self, dtype=None) -> jax.Array:
        """w_hat in the logical layout (`shape`), in `dtype` (default: the scale dtype)."""
        w = self.dequantize_storage(dtype)
        return w.T if self.orientation == "in_out" else w

    # ----- qwix ---------------------------------------------------------------------------

    def to_qwix(self):
        """The same weight as a qwix `QArray` in the logical layout (needs `qwix`)."""
        from qwix._src.core import qarray as qwix_qarray

        if self.g_idx is not None:
            raise ValueError("to_qwix: act-order groups (g_idx) have no qwix equivalent; "
                             "quantize with static_groups=True or act_order=False")
        qtype = {8: jnp.int8, 4: jnp.int4}.get(self.bits, f"int{self.bits}")
        store = jnp.int8 if self.bits == 8 else jnp.int4
        offset = 2 ** (self.bits - 1)
        qvalue = (self.codes().astype(jnp.int32) - offset).astype(store)
        scale = self.scale
        zero_point = None
        if self.zero is not None:
            zero_point = (self.zeros().astype(jnp.int32) - offset).astype(store)
        if self.orientation == "in_out":
            qvalue, scale = qvalue.T, scale.T
            zero_point = None if zero_point is None else zero_point.T
        return qwix_qarray.QArray(qvalue=qvalue, scale=scale, zero_point=zero_point,
                                  qtype=qtype)

    @classmethod
    def from_qwix(cls, qa, *, orientation: Orientation = "in_out") -> "QuantizedArray":
        """From a qwix `QArray` holding a 2-D integer weight.

        `orientation="in_out"`: `qa` is a kernel [in, out] with scale tiles along axis 0;
        `"out_in"`: `qa` is [out, in] with scale tiles along axis 1.
        """
        qtype = qa.qtype
        bits = {jnp.dtype(jnp.int8): 8, jnp.dtype(jnp.int4): 4}.get(
            _as_dtype(qtype), None) if not isinstance(qtype, str) else None
        if isinstance(qtype, str) and qtype in ("int2", "int3"):
            bits = int(qtype[3:])
        if bits is None:
            raise ValueError(f"from_qwix: qtype {qtype!r} is not supported; expected int8, "
                             "int4, 'int3' or 'int2'")
        if qa.qvalue.ndim != 2:
            raise ValueError(f"from_qwix: expected a 2-D QArray, got shape {qa.qvalue.shape}")
        qvalue, scale, zp = qa.qvalue, qa.scale, qa.zero_point
        if orientation == "in_out":
            qvalue, scale = qvalue.T, scale.T
            zp = None if zp is None else zp.T
        out, n_in = qvalue.shape
        if scale.shape[0] not in (1, out):
            raise ValueError(f"from_qwix: scale {qa.scale.shape} is not per output channel "
                             f"for a weight of {qa.qvalue.shape} ({orientation})")
        scale = jnp.broadcast_to(scale, (out, scale.shape[1]))
        n_groups = scale.shape[1]
        if n_in % n_groups:
            raise ValueError(f"from_qwix: {n_groups} scale tiles do not divide width {n_in}")
        offset = 2 ** (bits - 1)
        codes = qvalue.astype(jnp.int32) + offset
        zero = None
        if zp is not None:
            zero = jnp.broadcast_to(zp.astype(jnp.int32) + offset, scale.shape)
        return cls.from_codes(codes, scale, zero, bits=bits, group_size=n_in // n_groups,
                              sym=zp is None, orientation=orientation)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize_rtn(w, spec: QuantSpec, orientation: str, scale_dtype) -> QuantizedArray:
    w_oi = w.T if orientation == "in_out" else w
    codes, scale, zero = rtn_codes(w_oi, bits=spec.bits, group_size=spec.group_size,
                                   sym=spec.sym, clip_ratio=spec.clip_ratio)
    return QuantizedArray.from_codes(codes, scale, zero, bits=spec.bits,
                                     group_size=spec.group_size, sym=spec.sym,
                                     orientation=orientation, scale_dtype=scale_dtype)


@functools.partial(jax.jit, static_argnums=1)
def _dequantize_storage(q: QuantizedArray, dtype) -> jax.Array:
    scale, zero = q._column_params()
    return (scale * (q.codes().astype(jnp.float32) - zero)).astype(dtype)


def _as_dtype(t):
    try:
        return jnp.dtype(t)
    except TypeError:
        return None


# Module attributes and nnx.Param may hold it (like qwix's QArray).
nnx.register_data_type(QuantizedArray)


def quantized_param_bytes(tree) -> int:
    """Bytes of all QuantizedArray and array leaves of a param tree."""
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, QuantizedArray)):
        if isinstance(leaf, QuantizedArray):
            total += leaf.nbytes
        else:
            total += leaf.size * leaf.dtype.itemsize
    return int(total)


__all__ = ["QuantizedArray", "quantized_param_bytes"]
