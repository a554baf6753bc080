"""`QuantizedExperts`: the routed experts of one MoE layer as one packed pytree.

A layer's experts are kernels ``[E, in, out]`` (`models/experts.py`: ``gate_up`` [E, H, 2I],
``down`` [E, I, H]). Each expert e is quantized exactly as a dense kernel is
(`QuantizedArray`, orientation "in_out"): along its input axis, one (scale, zero) per
(expert, output channel, group of `group_size` consecutive inputs). Storage stacks the E
per-expert `QuantizedArray` leaves:

    packed  uint8 [E, out, packed_length(in, bits)]       codes of w_e[out, in]
    scale   float [E, out, groups]
    zero    uint8 [E, out, packed_length(groups, bits)]   packed zero points; None if symmetric
    static: bits, group_size (resolved), shape (E, in, out) (logical)

    w_hat[e, j, o] = scale[e, o, g(j)] * (code[e, o, j] - zero[e, o, g(j)]),  g(j) = j // gs

Quantizing runs the 2-D pass on the experts side by side (rows are independent, so each
expert gets the codes and grid of its kernel quantized alone); unpacking and dequantizing are
the 2-D operations mapped over E with `jax.vmap` (`expert(e)` is the e-th `QuantizedArray`).

`experts_matmul(x, q, group_sizes)` is the grouped matmul `kernels/` registers with
`models.experts.register_expert_kernel_type`: ``w_hat`` of every expert cast to x's dtype,
then `models.experts.grouped_matmul` (fp32 accumulation), the result in x's dtype, the same
arithmetic as a float expert kernel holding ``w_hat``.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from qdlm_jax.models.experts import grouped_matmul_fetched
from qdlm_jax.quant.array_like import AffineCodes, StackedExperts
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.quantizer_core import QuantSpec


@flax.struct.dataclass
class QuantizedExperts(StackedExperts, AffineCodes):
    """The packed experts of one layer (layout in the module docstring)."""

    packed: jax.Array
    scale: jax.Array
    zero: jax.Array | None = None
    bits: int = flax.struct.field(pytree_node=False, default=4)
    group_size: int = flax.struct.field(pytree_node=False, default=128)
    shape: tuple[int, int, int] = flax.struct.field(pytree_node=False, default=(0, 0, 0))

    # ----- construction -------------------------------------------------------------------

    @classmethod
    def quantize(cls, kernels: Float[Array, "E In Out"], spec: QuantSpec, *,
                 scale_dtype=None) -> "QuantizedExperts":
        """Round-to-nearest per expert on the AutoGPTQ grid of `spec`: each expert's codes and
        grid are those `QuantizedArray.quantize` gives its kernel alone."""
        if kernels.ndim != 3:
            raise ValueError(f"QuantizedExperts: expected kernels [E, in, out], got shape "
                             f"{kernels.shape}")
        e, n_in, n_out = kernels.shape
        side_by_side = jnp.transpose(kernels, (1, 0, 2)).reshape(n_in, e * n_out)
        return cls.from_rows(QuantizedArray.quantize(side_by_side, spec,
                                                     scale_dtype=scale_dtype), e)

    @classmethod
    def from_codes(cls, codes: Int[Array, "E Out In"], scale: Float[Array, "E Out G"],
                   zero: Float[Array, "E Out G"] | None, *, bits: int, group_size: int,
                   sym: bool, scale_dtype=None) -> "QuantizedExperts":
        """Pack per-expert integer codes of ``w_e[out, in]`` with their grids (e.g. from a
        per-expert GPTQ); `zero` is ignored when `sym` (as `QuantizedArray.from_codes`)."""
        e, n_out, n_in = codes.shape

        def rows(a):
            return None if a is None else a.reshape(e * n_out, a.shape[-1])

        return cls.from_rows(QuantizedArray.from_codes(
            rows(codes), rows(scale), None if sym else rows(zero), bits=bits,
            group_size=group_size, sym=sym, scale_dtype=scale_dtype), e)

    @classmethod
    def concatenate(cls, parts: list["QuantizedExperts"]) -> "QuantizedExperts":
        """The experts of `parts` (groups of consecutive experts, one grid) as one layer:
        every leaf concatenated along the expert axis (experts are packed independently, so
        this is the layer packed at once)."""
        first = parts[0]
        for q in parts:
            if (q.bits, q.group_size, q.shape[1:], q.sym) != (first.bits, first.group_size,
                                                               first.shape[1:], first.sym):
                raise ValueError("QuantizedExperts.concatenate: parts with different bits, "
                                 "group size, kernel shape or symmetry")
        leaves = {f: None if getattr(first, f) is None else
                  jnp.concatenate([getattr(q, f) for q in parts])
                  for f in ("packed", "scale", "zero")}
        return cls(**leaves, bits=first.bits, group_size=first.group_size,
                   shape=(sum(q.num_experts for q in parts),) + tuple(first.shape[1:]))

    @classmethod
    def from_rows(cls, q: QuantizedArray, num_experts: int) -> "QuantizedExperts":
        """From one `QuantizedArray` of the experts side by side (a kernel [in, E * out]):
        its storage rows are expert-major, so each leaf splits into [E, out, ...]. Every row
        is quantized on its own, so this is each expert quantized alone; the 2-D pass is
        used rather than a `jax.vmap` over experts, whose unbatched divisors would be
        broadcast after `exact_div`'s barrier and reopen XLA's reciprocal rewrite."""
        if q.g_idx is not None or q.orientation != "in_out":
            raise ValueError("QuantizedExperts: expects contiguous groups (no g_idx) and "
                             "'in_out' kernels")
        n_in, width = q.shape
        n_out = width // num_experts

        def split(a):
            return None if a is None else a.reshape(num_experts, n_out, a.shape[-1])

        return cls(packed=split(q.packed), scale=split(q.scale), zero=split(q.zero),
                   bits=q.bits, group_size=q.group_size, shape=(num_experts, n_in, n_out))

    # ----- array-like (`StackedExperts`: ndim, num_experts, expert(e), dequantize) ----------

    def per_expert(self) -> QuantizedArray:
        """The experts as one `QuantizedArray` whose leaves have a leading expert axis (for
        `jax.vmap`)."""
        return QuantizedArray(packed=self.packed, scale=self.scale, zero=self.zero,
                              bits=self.bits, group_size=self.group_size,
                              shape=self.shape[1:], orientation="in_out")

    def codes(self) -> jax.Array:
        """Unpacked codes, uint8 [E, out, in]."""
        return jax.vmap(QuantizedArray.codes)(self.per_expert())

    def zeros(self) -> jax.Array:
        """Zero points as floats [E, out, groups]."""
        return jax.vmap(QuantizedArray.zeros)(self.per_expert())


def experts_matmul(x: Float[Array, "N In"], q: StackedExperts,
                   group_sizes: Int[Array, " E"]) -> Float[Array, "N Out"]:
    """Row r of x (sorted by expert) times its expert's w_hat (module docstring): the XLA path
    of every stacked-experts type (`QuantizedExperts`, DAQ's `BinaryPlanesExperts`). On CPU
    each expert is dequantized once, when the sorted rows reach it
    (`models.experts.grouped_matmul_fetched`), never the whole layer at once."""
    return grouped_matmul_fetched(x, lambda g: q.expert(g).dequantize(x.dtype),
                                  lambda: q.dequantize(x.dtype), group_sizes).astype(x.dtype)


# Module attributes and nnx.Param may hold it (like QuantizedArray).
nnx.register_data_type(QuantizedExperts)

__all__ = ["QuantizedExperts", "experts_matmul"]
