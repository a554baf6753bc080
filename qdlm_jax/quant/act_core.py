"""Activation quantization: uniform fake quantization of a linear layer's input.

For a tensor x [..., K] quantized to b bits along groups g, with clipping ratio c:

    per_token   g = one token (a row of K input channels)
    per_group   g = `group_size` consecutive input channels of one token: the row is cut into
                K / group_size groups, each with its own scale (and zero point); group_size
                must divide K, and group_size = K is `per_token` bit for bit
    per_tensor  g = the whole tensor

    symmetric:   s_g = c * max_g |x| / (2^(b-1) - 1)
                 q = clamp(round(x / s_g), -2^(b-1), 2^(b-1) - 1),   x_hat = s_g * q
    asymmetric:  s_g = c * (max_g x - min_g x) / (2^b - 1),   z_g = round(-c * min_g x / s_g)
                 q = clamp(round(x / s_g) + z_g, 0, 2^b - 1),   x_hat = s_g * (q - z_g)

`per_token` and `per_group` ranges are computed on the fly (dynamic; per token is QDLM's
default for SmoothQuant, DuQuant and QuaRot); `per_tensor` ranges are static, taken from
calibration (`static_range`) and stored with the layer. Ranges below 1e-5 are raised to 1e-5
so an all-zero group stays zero. The error of a value inside the clipping range is at most
s_g / 2. Per group, an outlier channel coarsens the grid of its own group only, not of the
whole token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

GRANULARITIES = ("per_token", "per_group", "per_tensor")
_MIN_RANGE = 1e-5


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActSpec:
    """How a linear layer's input is quantized (hashable: it is static under jit)."""

    bits: int = 8
    granularity: str = "per_token"  # per_token | per_group (dynamic) | per_tensor (static)
    sym: bool = True
    clip_ratio: float = 1.0
    group_size: int = 128  # per_group: consecutive input channels sharing a scale

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 5, 6, 7, 8):
            raise ValueError(f"ActSpec.bits={self.bits!r}: expected an integer in 2..8")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"ActSpec.granularity={self.granularity!r}: expected one of "
                             f"{GRANULARITIES}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"ActSpec.clip_ratio={self.clip_ratio!r}: expected a value in "
                             "(0, 1]")
        if (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                or self.group_size < 2):
            raise ValueError(f"ActSpec.group_size={self.group_size!r}: expected an integer "
                             ">= 2 (input channels per scale, e.g. 32, 64, 128)")

    def check_width(self, width: int, what: str = "the input") -> None:
        """ValueError unless `per_group`'s group size divides an input of `width` channels."""
        if self.granularity == "per_group" and width % self.group_size:
            raise ValueError(f"ActSpec.group_size={self.group_size} does not divide the width "
                             f"{width} of {what}; use a divisor of {width}")


def group_view(x: Float[Array, "... K"], spec: ActSpec) -> jax.Array:
    """x as [..., K / group_size, group_size] for `per_group`, else x itself: the last axis
    of the view is what one scale covers (or, per tensor, part of it)."""
    if spec.granularity != "per_group":
        return x
    k = x.shape[-1]
    spec.check_width(k)
    return x.reshape(*x.shape[:-1], k // spec.group_size, spec.group_size)


def qrange(x: Float[Array, "... K"], spec: ActSpec) -> tuple[jax.Array, jax.Array]:
    """(lo, hi) of the quantization range: per token [..., 1], per group [..., K / g, 1] or
    per tensor (scalars)."""
    x = group_view(x.astype(jnp.float32), spec)
    keep = spec.granularity != "per_tensor"
    axis = -1 if keep else None
    if spec.sym:
        hi = jnp.max(jnp.abs(x), axis=axis, keepdims=keep)
        return -hi, hi
    return (jnp.min(x, axis=axis, keepdims=keep), jnp.max(x, axis=axis, keepdims=keep))


def scale_zero(lo, hi, spec: ActSpec) -> tuple[jax.Array, jax.Array]:
    """Scale and zero point of a range (the formulas in the module docstring)."""
    c = spec.clip_ratio
    if spec.sym:
        hi = jnp.maximum(c * jnp.maximum(jnp.abs(lo), jnp.abs(hi)), _MIN_RANGE)
        return hi / (2 ** (spec.bits - 1) - 1), jnp.zeros_like(hi)
    lo = jnp.minimum(c * lo, 0.0)
    hi = jnp.maximum(c * hi, 0.0)
    scale = jnp.maximum(hi - lo, _MIN_RANGE) / (2 ** spec.bits - 1)
    return scale, jnp.round(-lo / scale)


def _grouped_codes(x, spec: ActSpec, static_range):
    """(codes, scale, zero) on `group_view(x)`: codes float32 integer values."""
    lo, hi = static_range if static_range is not None else qrange(x, spec)
    scale, zero = scale_zero(jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32), spec)
    if spec.sym:
        qmin, qmax = -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    else:
        qmin, qmax = 0, 2 ** spec.bits - 1
    q = jnp.clip(jnp.round(group_view(x.astype(jnp.float32), spec) / scale) + zero, qmin, qmax)
    return q, scale, zero


def quantize(x: Float[Array, "... K"], spec: ActSpec, *,
             static_range: tuple[jax.Array, jax.Array] | None = None):
    """Integer codes (int32, x's shape), scale and zero point of x (per token [..., 1], per
    group [..., K / g, 1], per tensor scalars). `static_range` = calibrated (lo, hi) for
    `per_tensor`; without it the range is taken from x itself."""
    q, scale, zero = _grouped_codes(x, spec, static_range)
    return q.reshape(x.shape).astype(jnp.int32), scale, zero


def fake_quant(x: Float[Array, "... K"], spec: ActSpec | None, *,
               static_range: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """x_hat = s * (q - z) in x's dtype (identity when `spec` is None)."""
    if spec is None:
        return x
    if spec.granularity == "per_tensor" and static_range is None:
        raise ValueError("fake_quant: per_tensor activation quantization needs the calibrated "
                         "static_range (lo, hi)")
    q, scale, zero = _grouped_codes(x, spec, static_range)
    return (scale * (q - zero)).reshape(x.shape).astype(x.dtype)
