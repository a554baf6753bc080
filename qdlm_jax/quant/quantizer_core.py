"""Uniform affine weight quantization on AutoGPTQ's grid (pure, jittable).

Orientation: every function here takes a weight as ``w[out, in]`` (the paper / PyTorch
``nn.Linear.weight`` orientation). Quantization runs along the input axis: groups are
``group_size`` consecutive input channels and there is one (scale, zero) per
(output channel, group). ``group_size=-1`` means one group spanning the whole input axis
(per output channel). The model stores kernels ``[in, out]``; drivers transpose.

The grid (AutoGPTQ ``Quantizer.find_params`` / ``quantize``, ``maxq = 2**bits - 1``)::

    xmin = min(min(w_g), 0) * clip_ratio        xmax = max(max(w_g), 0) * clip_ratio
    symmetric:  xmax = max(|xmin|, xmax);  xmin = -xmax  (only where xmin < 0, as AutoGPTQ)
    xmin = xmax = 0  ->  xmin = -1, xmax = +1    (all-zero group)
    scale = (xmax - xmin) / maxq
    zero  = (maxq + 1) / 2                (symmetric)
          = round(-xmin / scale)          (asymmetric)
    q     = clamp(round(w / scale) + zero, 0, maxq)      (round half to even, like torch)
    w_hat = scale * (q - zero)

Note the AutoGPTQ quirk kept for code parity: in symmetric mode a group with no negative
weight keeps ``xmin = 0``, so its scale is ``xmax / maxq`` rather than ``2 xmax / maxq``.
Zero points are integers held in floats (as AutoGPTQ does); codes are int32 in ``[0, maxq]``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = "-1 (per output channel) or a positive integer dividing the input width"


class QuantParams(NamedTuple):
    """Per-(output channel, group) grid: ``w_hat = scale * (q - zero)``."""

    scale: Float[Array, "out groups"]
    zero: Float[Array, "out groups"]  # integer-valued


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How a weight is quantized. Validated once, at construction.

    Widths are only known when a weight arrives; `check_width` validates the group size
    against it (and says which widths work).
    """

    bits: int = 4  # code width: one of 2, 3, 4, 8
    group_size: int = 128  # consecutive input channels per scale; -1 = per output channel
    sym: bool = False  # True: zero point fixed at 2**(bits-1); False: per-group zero point
    clip_ratio: float = 1.0  # shrink of the [min, max] range before the grid, in (0, 1]

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"QuantSpec.bits={self.bits!r} is not supported; "
                             f"use one of {SUPPORTED_BITS}")
        if (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                or not (self.group_size == -1 or self.group_size > 0)):
            raise ValueError(f"QuantSpec.group_size={self.group_size!r} is not supported; "
                             f"use {SUPPORTED_GROUP_SIZES} (e.g. 32, 64, 128)")
        if not isinstance(self.sym, bool):
            raise ValueError(f"QuantSpec.sym={self.sym!r}: expected True or False")
        ratio = self.clip_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"QuantSpec.clip_ratio={ratio!r} is out of range; use a value in "
                             "(0, 1] (1.0 = no clipping)")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def check_width(self, in_features: int) -> int:
        """The group size for a weight with `in_features` inputs (raises if it does not fit)."""
        return resolve_group_size(self.group_size, in_features)

    def n_groups(self, in_features: int) -> int:
        return in_features // self.check_width(in_features)


def resolve_group_size(group_size: int, in_features: int) -> int:
    """`group_size`, or `in_features` for -1; ValueError if it does not divide the width."""
    if group_size == -1:
        return in_features
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide the input width "
                         f"{in_features}; use -1 (per channel) or a divisor of {in_features}")
    return group_size


def exact_div(a, b):
    """a / b as an IEEE division, elementwise after broadcasting.

    XLA rewrites ``x / c`` (constant) and ``x / broadcast(b)`` into ``x * (1/b)``, which is
    off by an ulp and flips exact ties such as the symmetric grid's ``min / scale = -(maxq+1)/2
    + 1/2``; the barrier hides the divisor so codes match torch's true division bit for bit.
    """
    a, b = jnp.broadcast_arrays(a, b)
    return a / lax.optimization_barrier(b)


def params_from_minmax(xmin: Float[Array, "..."], xmax: Float[Array, "..."], *, bits: int,
                       sym: bool, clip_ratio: float = 1.0) -> QuantParams:
    """AutoGPTQ's `find_params` on raw group minima/maxima (any matching shapes).

    xmin <- min(xmin, 0) * r, xmax <- max(xmax, 0) * r; symmetric: xmax <- max(|xmin|, xmax),
    xmin <- -xmax where xmin < 0; an all-zero group gets [-1, 1];
    scale = (xmax - xmin) / maxq; zero = (maxq + 1) / 2 (sym) or round(-xmin / scale).
    """
    maxq = 2 ** bits - 1
    xmin = jnp.minimum(xmin, 0.0) * clip_ratio
    xmax = jnp.maximum(xmax, 0.0) * clip_ratio
    if sym:
        xmax = jnp.maximum(jnp.abs(xmin), xmax)
        xmin = jnp.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = jnp.where(dead, -1.0, xmin)
    xmax = jnp.where(dead, 1.0, xmax)
    scale, zero = affine_grid(xmin, xmax, maxq=maxq)
    if sym:
        zero = jnp.full_like(scale, (maxq + 1) / 2)
    return QuantParams(scale, zero)


def affine_grid(xmin: Float[Array, "..."], xmax: Float[Array, "..."], *, maxq: int,
                min_range: float | None = None) -> QuantParams:
    """The asymmetric grid AutoGPTQ and llm-awq share, with true divisions:

        scale = max(xmax - xmin, min_range) / maxq        zero = round(-xmin / scale)

    AutoGPTQ (`params_from_minmax`) calls it on [min(w, 0), max(w, 0)] with no floor;
    llm-awq (`awq_core.awq_params`) on the raw [min(w), max(w)] with ``min_range=1e-5`` and
    then clamps the zero to [0, maxq]. ``round(-a)`` equals llm-awq's ``-round(a)`` (round half
    to even is odd-symmetric). Both divisions are `exact_div`: XLA's reciprocal rewrite is one
    ulp off and moves codes and zero points (exact ties are common after clipping).
    """
    rng = xmax - xmin
    if min_range is not None:
        rng = jnp.maximum(rng, jnp.float32(min_range))
    scale = exact_div(rng, jnp.float32(maxq))
    return QuantParams(scale, jnp.round(exact_div(-xmin, scale)))


def _grouped(w: Float[Array, "out in"], group_size: int) -> Float[Array, "out groups g"]:
    out, n_in = w.shape
    g = resolve_group_size(group_size, n_in)
    return w.reshape(out, n_in // g, g)


def compute_params(w: Float[Array, "out in"], *, bits: int, group_size: int, sym: bool,
                   clip_ratio: float = 1.0) -> QuantParams:
    """Grid of each (output channel, group) of ``w[out, in]`` from its min/max.

    Returns scale and zero of shape ``[out, in // group_size]`` (``[out, 1]`` per channel).
    """
    wg = _grouped(w.astype(jnp.float32), group_size)
    return params_from_minmax(wg.min(-1), wg.max(-1), bits=bits, sym=sym,
                              clip_ratio=clip_ratio)


def _expand(p: Float[Array, "out groups"], n_in: int) -> Float[Array, "out in"]:
    """Repeat per-group values over the group's consecutive input channels."""
    return jnp.repeat(p, n_in // p.shape[-1], axis=-1, total_repeat_length=n_in)


def quantize_codes(w: Float[Array, "out in"], scale: Float[Array, "out groups"],
                   zero: Float[Array, "out groups"], *, bits: int) -> Int[Array, "out in"]:
    """q = clamp(round(w / scale) + zero, 0, maxq) as int32, groups of in // groups columns."""
    n_in = w.shape[-1]
    s, z = _expand(scale, n_in), _expand(zero, n_in)
    q = jnp.clip(jnp.round(exact_div(w.astype(jnp.float32), s)) + z, 0, 2 ** bits - 1)
    return q.astype(jnp.int32)


def dequantize_codes(q: Int[Array, "out in"], scale: Float[Array, "out groups"],
                     zero: Float[Array, "out groups"],
                     dtype=jnp.float32) -> Float[Array, "out in"]:
    """w_hat = scale * (q - zero), computed in fp32 then cast to `dtype`."""
    n_in = q.shape[-1]
    s = _expand(scale.astype(jnp.float32), n_in)
    z = _expand(zero.astype(jnp.float32), n_in)
    return (s * (q.astype(jnp.float32) - z)).astype(dtype)


def quantize_dequantize(w: Float[Array, "rows ..."], scale, zero, *, bits: int):
    """Fake-quantize with a grid broadcastable to `w`: scale * (clamp(round(w/s)+z) - z)."""
    q = jnp.clip(jnp.round(exact_div(w, scale)) + zero, 0, 2 ** bits - 1)
    return scale * (q - zero)


def rtn(w: Float[Array, "out in"], *, bits: int, group_size: int, sym: bool,
        clip_ratio: float = 1.0) -> Float[Array, "out in"]:
    """Round-to-nearest fake quantization: dequantize(quantize(w)) on the min/max grid."""
    scale, zero = compute_params(w, bits=bits, group_size=group_size, sym=sym,
                                 clip_ratio=clip_ratio)
    q = quantize_codes(w, scale, zero, bits=bits)
    return dequantize_codes(q, scale, zero, dtype=w.dtype)


def rtn_codes(w: Float[Array, "out in"], *, bits: int, group_size: int, sym: bool,
              clip_ratio: float = 1.0):
    """(codes int32 [out, in], scale [out, groups], zero [out, groups]) by round-to-nearest."""
    scale, zero = compute_params(w, bits=bits, group_size=group_size, sym=sym,
                                 clip_ratio=clip_ratio)
    return quantize_codes(w, scale, zero, bits=bits), scale, zero


def rtn_spec(w: Float[Array, "out in"], spec: QuantSpec) -> Float[Array, "out in"]:
    """`rtn` with the settings of a validated `QuantSpec`."""
    spec.check_width(w.shape[-1])
    return rtn(w, bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
               clip_ratio=spec.clip_ratio)


__all__ = ["QuantParams", "QuantSpec", "SUPPORTED_BITS", "affine_grid", "compute_params",
           "dequantize_codes", "exact_div", "params_from_minmax", "quantize_codes",
           "quantize_dequantize", "resolve_group_size", "rtn", "rtn_codes", "rtn_spec"]
