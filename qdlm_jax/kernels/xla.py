"""The XLA implementation of `qmatmul`: unpack, dequantize, dot. Runs on every backend and
takes every QuantizedArray; it defines the semantics the Pallas kernels are tested against.

Weight-only (act_bits None), any bits / groups / g_idx / orientation:

    y = x @ w_hat_logical        w_hat = (scale * (code - zero)) cast to x.dtype,
                                 dot accumulated in float32, result cast to x.dtype

Activation-quantized (act_bits 8 or 4; orientation "in_out", contiguous groups):

    x_q, s_x = quantize_activations(x, act_bits)          (common.py: per token, symmetric)
    acc_g[m, n] = sum_{k in group g} x_q[m, k] * (code[n, k] - zero[n, g])    (int32, exact)
    y[m, n] = (sum_g acc_g[m, n] * scale[n, g]) * s_x[m]                      (float32)

With one group per channel (group_size == K) that is ``y = (acc * s_w) * s_x``, the order
the kernels use, so integer-accumulating kernels match it bit for bit. It equals the
fake-quant formula ``(x_q * s_x) @ w_hat.T`` up to float rounding.

Per-group activation scales (`act_group_size` = ga: s_x[m, a] per group a of ga columns,
common.py) need the activation and weight groups to nest (one size divides the other); the
sums run over the finer of the two, u (size min(ga, gs)), in order:

    acc_u[m, n] = sum_{k in u} x_q[m, k] * (code[n, k] - zero[n, g(u)])         (int32)
    y[m, n] = sum_u (acc_u[m, n] * scale[n, g(u)]) * s_x[m, a(u)]              (float32)

the order the kernels use for per-channel weights (u = a; each act group's integer dot
scaled by s_w then by its s_x, added group after group).

A `BinaryPlanesArray` (DAQ's sum of sign planes with row and column scales) is served here
only (weight-only): ``y = x @ w_hat`` with ``w_hat = sum_k diag(r_k) B_k diag(c_k)`` summed
in fp32 and cast to x.dtype, then the same fp32-accumulated dot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from qdlm_jax.kernels.common import Support, check_operands, quantize_activations
from qdlm_jax.quant.bqarray import BinaryPlanesArray
from qdlm_jax.quant.qarray import QuantizedArray


def supports(x, w, act_bits=None, act_group_size=None) -> Support:
    """XLA takes every QuantizedArray, except act_bits with g_idx or "out_in" weights or with
    activation groups that do not nest with the weight groups, and every BinaryPlanesArray
    without act_bits."""
    if isinstance(w, BinaryPlanesArray):
        return Support(act_bits is None, "" if act_bits is None else
                       "a BinaryPlanesArray is weight-only")
    if act_bits is not None and w.orientation != "in_out":
        return Support(False, "act_bits needs an 'in_out' weight (scales along the "
                              "contraction axis)")
    if act_bits is not None and w.g_idx is not None:
        return Support(False, "act_bits with an act-order group map (g_idx)")
    if act_group_size is not None and (max(act_group_size, w.group_size)
                                       % min(act_group_size, w.group_size)):
        return Support(False, f"act_group_size={act_group_size} and the weight's group_size="
                              f"{w.group_size} do not nest (one must divide the other)")
    return Support(True)


def after_input(x: jax.Array, w):
    """`w` with its float leaves (scales) made to depend on `x`, values unchanged, so that
    unpacking the weight cannot be scheduled before `x` exists.

    Unpacking depends on the weight alone: in a whole-model jit XLA's CPU scheduler otherwise
    unpacks every layer's weight at the start and holds all of them at once (0.41 GiB a layer
    at LLaDA-8B's shapes in bf16: 13 GiB of temporaries for the 32 layers, against 6 GiB of
    packed model). An optimization barrier does not hold there (the CPU pipeline removes
    barriers before scheduling), so the dependency is a real one: ``scale + min(|x_0|, 0)``,
    which adds exactly 0 for any finite or infinite x_0 (NaN stays NaN).
    """
    zero = jnp.minimum(jnp.abs(x.reshape(-1)[0]), 0).astype(jnp.float32)
    return jax.tree.map(lambda a: (a + zero.astype(a.dtype)) if jnp.issubdtype(
        a.dtype, jnp.floating) else a, w)


def weight_only_matmul(x: Float[Array, "... k"],
                       w: QuantizedArray | BinaryPlanesArray) -> Float[Array, "... n"]:
    """x[..., k] @ w_logical[k, n] via dequantize-then-matmul (fp32 accumulation).

    Contracts the storage layout directly (``einsum("...i,oi->...o")`` for "in_out"), so no
    transposed copy of the weight is materialised; the weight is unpacked only once `x` is
    computed (`after_input`).
    """
    w_s = after_input(x, w).dequantize_storage(x.dtype)  # [out, in]
    eq = "...i,oi->...o" if w.orientation == "in_out" else "...o,oi->...i"
    return jnp.einsum(eq, x, w_s, preferred_element_type=jnp.float32).astype(x.dtype)


def act_quant_matmul(x: Float[Array, "... k"], w: QuantizedArray, act_bits: int,
                     act_group_size: int | None = None) -> Float[Array, "... n"]:
    """Integer matmul of quantized activations with the codes (module docstring)."""
    ok, reason = supports(x, w, act_bits, act_group_size)
    if not ok:
        raise ValueError(f"qmatmul(act_bits={act_bits}): {reason} is not supported")
    if act_group_size is not None:
        return _act_group_matmul(x, after_input(x, w), act_bits, act_group_size)
    k, n = w.shape
    w = after_input(x, w)
    x_q, s_x = quantize_activations(x.reshape(-1, k), act_bits)
    rows, n_groups, gs = x_q.shape[0], w.n_groups, w.group_size
    zero = jnp.round(w.zeros()).astype(jnp.int32)  # [n, groups]
    w_int = (w.codes().astype(jnp.int32).reshape(n, n_groups, gs) - zero[:, :, None])
    x_g = x_q.reshape(rows, n_groups, gs).transpose(1, 0, 2)  # [groups, rows, gs]
    w_g = w_int.astype(jnp.int32).transpose(1, 0, 2)  # [groups, n, gs]
    s_w = w.scale.astype(jnp.float32).T  # [groups, n]

    def add_group(acc, group):
        xq_g, wq_g, s_g = group
        acc_g = lax.dot_general(xq_g, wq_g, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.int32)
        return acc + acc_g.astype(jnp.float32) * s_g[None, :], None

    acc, _ = lax.scan(add_group, jnp.zeros((rows, n), jnp.float32), (x_g, w_g, s_w))
    y = acc * s_x
    return y.astype(x.dtype).reshape(*x.shape[:-1], n)


def _act_group_matmul(x, w: QuantizedArray, act_bits: int, ga: int):
    """Per-group activation scales: sums over the finer of the nested groups, in order."""
    k, n = w.shape
    x_q, s_x = quantize_activations(x.reshape(-1, k), act_bits, ga)  # s_x [rows, k / ga]
    rows, gs = x_q.shape[0], w.group_size
    unit = min(ga, gs)
    units = k // unit
    zero = jnp.round(w.zeros()).astype(jnp.int32)  # [n, k / gs]
    w_int = (w.codes().astype(jnp.int32).reshape(n, k // gs, gs) - zero[:, :, None])
    w_u = w_int.reshape(n, units, unit).transpose(1, 0, 2)  # [units, n, unit]
    x_u = x_q.reshape(rows, units, unit).transpose(1, 0, 2)  # [units, rows, unit]
    s_w = jnp.repeat(w.scale.astype(jnp.float32).T, gs // unit, axis=0)  # [units, n]
    s_a = jnp.repeat(s_x.T, ga // unit, axis=0)[:, :, None]  # [units, rows, 1]

    def add_unit(acc, part):
        xq_u, wq_u, sw_u, sx_u = part
        acc_u = lax.dot_general(xq_u, wq_u, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.int32)
        return acc + (acc_u.astype(jnp.float32) * sw_u[None, :]) * sx_u, None

    y, _ = lax.scan(add_unit, jnp.zeros((rows, n), jnp.float32), (x_u, w_u, s_w, s_a))
    return y.astype(x.dtype).reshape(*x.shape[:-1], n)


def qmatmul(x: Float[Array, "... k"], w: QuantizedArray, *, act_bits: int | None = None,
            act_group_size: int | None = None) -> Float[Array, "... n"]:
    """The XLA implementation (module docstring)."""
    check_operands(x, w, act_bits, act_group_size)
    if act_bits is None:
        return weight_only_matmul(x, w)
    return act_quant_matmul(x, w, act_bits, act_group_size)

