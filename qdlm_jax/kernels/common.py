"""What every `qmatmul` implementation shares: operand checks, activation quantization,
capability results and the padded kernel operands.

Conventions (see docs/kernels.md):

    x        float [..., K]                       activations (bf16 or f32)
    w        QuantizedArray, orientation "in_out": logical kernel [K, N], stored [N, K]
             with uint8 codes packed along K (qdlm_jax.quant.packing)
    w_hat[n, k] = scale[n, g(k)] * (code[n, k] - zero[n, g(k)])      g(k) = k // group_size

Activation quantization (`act_bits` = 8 or 4): dynamic, symmetric, per token (row) or, with
`act_group_size` = ga, per group a of ga consecutive columns of a row (ga divides K):

    qmax  = 2**(act_bits - 1) - 1                (127, or 7: 4-bit values lie in [-7, 7])
    s_x[m, a] = max_{k in a} |x[m, k]| / qmax    (1 for an all-zero group; one group = K)
    x_q   = clip(round(x / s_x[m, k // ga]), -qmax, qmax)   (round half to even, IEEE div.)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int8

from qdlm_jax.quant.bqarray import BinaryPlanesArray
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.quantizer_core import exact_div

SUPPORTED_ACT_BITS = (4, 8)
KERNEL_BITS = (4, 8)  # weight code widths the Pallas kernels unpack


class Support(NamedTuple):
    """Answer of a capability predicate; truthy when the kernel handles the call."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def check_operands(x, w, act_bits, act_group_size=None) -> None:
    """ValueError unless `x @ w` is well formed (any implementation's precondition)."""
    if not isinstance(w, (QuantizedArray, BinaryPlanesArray)):
        raise ValueError(f"qmatmul: w must be a QuantizedArray or BinaryPlanesArray, got "
                         f"{type(w).__name__}")
    if isinstance(w, BinaryPlanesArray) and act_bits is not None:
        raise ValueError("qmatmul: a BinaryPlanesArray (DAQ) weight is weight-only; "
                         "act_bits must be None")
    if act_bits is not None and (isinstance(act_bits, bool)
                                 or act_bits not in SUPPORTED_ACT_BITS):
        raise ValueError(f"qmatmul: act_bits={act_bits!r} is not supported; use None "
                         f"(weight-only) or one of {SUPPORTED_ACT_BITS}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"qmatmul: x has dtype {x.dtype}; expected a float dtype "
                         "(bfloat16 or float32)")
    if len(x.shape) < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"qmatmul: x has shape {tuple(x.shape)}, expected [..., {w.shape[0]}] "
                         f"to contract with a weight of logical shape {w.shape} "
                         f"({w.orientation})")
    if act_group_size is not None:
        k = w.shape[0]
        if act_bits is None:
            raise ValueError(f"qmatmul: act_group_size={act_group_size!r} needs act_bits "
                             "(8 or 4): it groups the quantized activations")
        if (isinstance(act_group_size, bool) or not isinstance(act_group_size, int)
                or act_group_size <= 0 or k % act_group_size):
            raise ValueError(f"qmatmul: act_group_size={act_group_size!r} must be a positive "
                             f"divisor of K={k} (or None: one scale per token)")


def checked_dims(name: str, supports, x, w, act_bits, act_group_size=None
                 ) -> tuple[int, int, int]:
    """(M, N, K) of a call that `supports` accepts; ValueError naming the kernel otherwise."""
    check_operands(x, w, act_bits, act_group_size)
    ok, reason = supports(x, w, act_bits, act_group_size)
    if not ok:
        raise ValueError(f"{name}.qmatmul: unsupported call: {reason}")
    k, n = w.shape
    return math.prod(x.shape[:-1]), n, k


def quantize_activations(x: Float[Array, "*rows k"], bits: int, group_size: int | None = None
                         ) -> tuple[Int8[Array, "*rows k"], Float[Array, "*rows groups"]]:
    """Symmetric quantization per row, or per group of `group_size` consecutive columns of a
    row (module docstring): (x_q int8, s_x float32 with one column per group)."""
    qmax = 2 ** (bits - 1) - 1
    k = x.shape[-1]
    gs = k if group_size is None else group_size
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], k // gs, gs)
    amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
    s_x = jnp.where(amax > 0, exact_div(amax, jnp.full_like(amax, qmax)), 1.0)
    x_q = jnp.clip(jnp.round(exact_div(xf, s_x)), -qmax, qmax).astype(jnp.int8)
    return x_q.reshape(x.shape), s_x[..., 0]


def basic_support(x, w, act_bits, *, dtypes, act_group_size=None) -> Support:
    """Rules shared by the Pallas kernels (bits, orientation, groups map, dtypes)."""
    if not isinstance(w, QuantizedArray):
        return Support(False, f"w is a {type(w).__name__}, not a QuantizedArray")
    if w.orientation != "in_out":
        return Support(False, f"orientation {w.orientation!r}: kernels read 'in_out' weights "
                              "(stored [N, K], packed along the contraction axis)")
    if w.g_idx is not None:
        return Support(False, "act-order group map (g_idx)")
    if w.bits not in KERNEL_BITS:
        return Support(False, f"{w.bits}-bit codes (kernels unpack {KERNEL_BITS})")
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in dtypes]:
        return Support(False, f"x dtype {jnp.dtype(x.dtype)} (kernels take "
                              f"{[jnp.dtype(d).name for d in dtypes]})")
    if len(x.shape) < 1 or x.shape[-1] != w.shape[0]:
        return Support(False, f"x shape {tuple(x.shape)} does not contract with {w.shape}")
    if math.prod(x.shape[:-1]) == 0:
        return Support(False, "no rows")
    if act_bits is not None and (w.n_groups != 1 or not w.sym):
        return Support(False, "act_bits needs per-channel (group_size == K) symmetric weights; "
                              f"got {w.n_groups} groups, sym={w.sym}")
    if act_group_size is not None and (act_bits is None or x.shape[-1] % act_group_size):
        return Support(False, f"act_group_size={act_group_size} needs act_bits and must "
                              f"divide K={x.shape[-1]}")
    return Support(True)


def split_codes(p: jax.Array, bits: int) -> tuple:
    """Codes of a packed uint8 block, widened to int32 (Mosaic shifts in 32 bits): the low
    and high nibbles (even and odd K columns) for 4 bits, the bytes themselves for 8."""
    p = p.astype(jnp.int32)
    return (p & 15, (p >> 4) & 15) if bits == 4 else (p,)


def round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def pad_to(a: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pad `a` along `axis` to `size` (no-op when already that size)."""
    extra = size - a.shape[axis]
    if extra == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


class Operands(NamedTuple):
    """Kernel operands, padded to whole blocks.

    xs       activations [Mp, Kp] (x, or x_q int8 when act_bits), split into its even and
             odd columns ([Mp, Kp/2] each) when bits == 4 so they meet the low and high
             nibbles of each packed byte
    s_x      [Mp, 1] float32 per-token activation scales, or [Mp, Kp / act_group_size] per
             group (group a covers x columns a*ga .. (a+1)*ga - 1; padded rows and groups
             are 0); None for weight-only
    packed   uint8 [Np, Kp * bits / 8]
    scale    float32 [Np, Gp]; padded rows/groups are 0 so padded weights dequantize to 0
    zero     float32 [Np, Gp], None when symmetric (zero point 2**(bits-1))
    """

    xs: tuple
    s_x: jax.Array | None
    packed: jax.Array
    scale: jax.Array
    zero: jax.Array | None
    rows: int  # M before padding
    lead: tuple  # x.shape[:-1]
    n: int  # N before padding


def prepare(x, w: QuantizedArray, act_bits, *, m_pad: int, n_pad: int, k_pad: int,
            act_group_size: int | None = None) -> Operands:
    """Flatten x to rows, quantize it if act_bits, pad M/N/K, split even/odd for 4 bits."""
    k, n = w.shape
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    s_x = None
    if act_bits is not None:
        x2, s_x = quantize_activations(x2, act_bits, act_group_size)
        s_x = pad_to(s_x, 0, m_pad)
        if act_group_size is not None:
            s_x = pad_to(s_x, 1, k_pad // act_group_size)
    x2 = pad_to(pad_to(x2, 0, m_pad), 1, k_pad)
    xs = (x2[:, 0::2], x2[:, 1::2]) if w.bits == 4 else (x2,)
    packed, scale, zero = prepare_weight(w, n_pad=n_pad, k_pad=k_pad)
    return Operands(xs=xs, s_x=s_x, packed=packed, scale=scale, zero=zero, rows=rows,
                    lead=lead, n=n)


def prepare_weight(w: QuantizedArray, *, n_pad: int, k_pad: int):
    """(packed uint8 [Np, Kp * bits / 8], scale f32 [Np, Gp], zero f32 [Np, Gp] or None when
    symmetric): w's storage padded to whole blocks (padded scales are 0, so padded weights
    dequantize to 0)."""
    per_byte = 8 // w.bits
    packed = pad_to(pad_to(w.packed, 0, n_pad), 1, k_pad // per_byte)
    g_pad = 1 if w.n_groups == 1 else k_pad // w.group_size
    scale = pad_to(pad_to(w.scale.astype(jnp.float32), 0, n_pad), 1, g_pad)
    zero = None if w.sym else pad_to(pad_to(w.zeros(), 0, n_pad), 1, g_pad)
    return packed, scale, zero


def finish(y: jax.Array, ops: Operands) -> jax.Array:
    """Drop the padding of a kernel result [Mp, Np] and restore x's leading shape."""
    return y[:ops.rows, :ops.n].reshape(*ops.lead, ops.n)
