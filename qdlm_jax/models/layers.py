"""Numerics every model family shares: RMS normalisation, RoPE, masked GQA attention.

    rms_normalize(x) = x * rsqrt(mean(x^2) + eps)                    (over the last axis)
    RoPE (half-rotated): x' = x*cos + rotate_half(x)*sin, rotate_half([a, b]) = [-b, a],
        cos/sin of angle_j = position * inv_freq_j for j < D/2, repeated for both halves,
        inv_freq_j = theta^(-2j/D), or 0 for j >= rotated_pairs (those pairs stay as they are).
    attention(q, k, v) = softmax(scale * q k^T + bias) v, fp32 scores and softmax, each k/v
        head shared by H / KV consecutive query heads (GQA).
    mask_bias(allowed) = 0 where allowed, finfo(float32).min elsewhere: a large negative bias,
        not -inf, so a row with no allowed key gets uniform weights instead of NaN.

The families differ around these (where the norm weight is applied and in which dtype, which
dtype RoPE rotates in, the attention scale); those choices stay in each family's module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def rms_normalize(x32: Float[Array, "... D"], eps: float) -> Float[Array, "... D"]:
    """x * (mean(x^2) + eps)^-1/2 over the last axis, in x's dtype (callers pass fp32)."""
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def rope_angles(positions: Int[Array, "B T"], head_dim: int, theta: float,
                rotated_pairs: int | None = None):
    """cos, sin of shape [B, T, head_dim] in fp32 (the frequencies repeated twice).

    `rotated_pairs=r` keeps inv_freq_j = theta^(-2j/head_dim) for j < r and sets the rest to 0
    (cos 1, sin 0: dims j and j + head_dim/2 pass unrotated), Gemma's proportional RoPE.
    """
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if rotated_pairs is not None:
        inv_freq = jnp.where(jnp.arange(head_dim // 2) < rotated_pairs, inv_freq, 0.0)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Float[Array, "B T N D"], cos, sin, *, full_precision: bool) -> jax.Array:
    """Half-rotated RoPE. full_precision rotates in fp32 (LLaDA); else in x's dtype with cos/sin
    cast to it (Dream, Gemma)."""
    dtype = jnp.float32 if full_precision else x.dtype
    xr = x.astype(dtype)
    cos = cos[:, :, None, :].astype(dtype)
    sin = sin[:, :, None, :].astype(dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    return (xr * cos + rotated * sin).astype(x.dtype)


def mask_bias(allowed: Bool[Array, "..."]) -> Float[Array, "..."]:
    """Additive fp32 attention bias: 0 where `allowed`, finfo(float32).min elsewhere."""
    return jnp.where(allowed.astype(bool), 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def attention(q: Float[Array, "B Tq H D"], k: Float[Array, "B S KV D"],
              v: Float[Array, "B S KV Dv"], bias: Float[Array, "B S"] | Float[Array, "B Tq S"]
              | None, *, scale, dtype) -> Float[Array, "B Tq H*Dv"]:
    """softmax(scale * q k^T + bias) v with GQA, heads flattened: [B, Tq, H * Dv] in `dtype`.

    `bias` is a key bias [B, S] (the same for every query) or a per-query bias [B, Tq, S];
    `scale=None` skips the multiply (a scale of 1).
    """
    b, tq, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, tq, kv, h // kv, d)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    if scale is not None:
        scores = scores * scale
    if bias is not None:
        scores = scores + (bias[:, None, None, None, :] if bias.ndim == 2
                           else bias[:, None, None, :, :])
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(dtype).reshape(b, tq, h * v.shape[-1])
